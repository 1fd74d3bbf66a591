"""The one checkpoint path: orbax `CheckpointManager` saving the whole train state
plus a JSON record (data position, model config) under WORKDIR/checkpoints.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save never leaves a half-written checkpoint that a restart
would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from flaxgpt import fileio
from flaxgpt.config import CheckpointConfig, ModelConfig, to_dict
from flaxgpt.errors import UserError

# Model fields that change parameter shapes or meaning; a restore must agree on all of them.
STRUCTURAL_FIELDS = (
    "recipe",
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_kv_heads",
    "d_model",
    "head_dim",
    "d_ff",
    "position",
    "norm",
    "mlp",
    "use_bias",
    "tie_embeddings",
    "scan_layers",
    "param_dtype",
    "output",
    "lora_rank",
    "lora_targets",
)


class CheckpointMismatch(UserError):
    """The checkpoint was written by a model of another shape or vocabulary."""


class Checkpointer:
    def __init__(self, workdir: str, cfg: CheckpointConfig):
        self.directory = fileio.absolute(os.path.join(workdir, "checkpoints"))
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.max_to_keep,
                create=True,
                enable_async_checkpointing=cfg.async_save,
                cleanup_tmp_directories=True,  # what a killed save left behind
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict, force: bool = False) -> bool:
        """Save if step is due (or force); `record` must be JSON-able."""
        if not self.cfg.enabled:
            return False
        if not force and step % self.cfg.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )

    def read_record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def restore(self, step: int, abstract_state: Any, model_cfg: ModelConfig) -> tuple[Any, dict]:
        """Restore onto the shardings in `abstract_state`, after checking the model agrees."""
        record = self.read_record(step)
        check_model_compatible(record.get("model", {}), model_cfg, f"{self.directory} step {step}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["record"]

    def restore_params(self, step: int, abstract_params: Any, model_cfg: ModelConfig, path: tuple = ()) -> Any:
        """Only the parameters of a saved train state (no optimizer state is read), or the
        subtree of them at `path` (e.g. ("policy",) of a PPO state)."""
        check_model_compatible(self.read_record(step).get("model", {}), model_cfg, f"{self.directory} step {step}")
        target = abstract_params
        for key in reversed(("params",) + tuple(path)):
            target = {key: target}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                )
            ),
        )
        params = restored["state"]
        for key in ("params",) + tuple(path):
            params = params[key]
        return params

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_model_compatible(saved: dict, model_cfg: ModelConfig, where: str) -> None:
    current = to_dict(model_cfg)
    diffs = [
        f"model.{k}: checkpoint has {saved[k]!r}, config has {current[k]!r}"
        for k in STRUCTURAL_FIELDS
        if k in saved and saved[k] != current[k]
    ]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {where} does not fit this model:\n  " + "\n  ".join(diffs))
