"""Runs as a library: a trained workdir's config, tokenizer and checkpointed parameters, for
inference (sample, chat, score) and as the start of a fine-tuning run (`train.init_from`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt import fileio, hf, lora
from flaxgpt.checkpoint import (
    MEANING_FIELDS,
    STRUCTURAL_FIELDS,
    Checkpointer,
    CheckpointMismatch,
    check_model_compatible,
)
from flaxgpt.cli import one_line, ranged
from flaxgpt.config import Config, ConfigError, ModelConfig, from_dict, to_dict
from flaxgpt.data.tokenizers import Tokenizer, load_tokenizer
from flaxgpt.errors import UserError
from flaxgpt.generate import DecodeConfig
from flaxgpt.lora import BASE_RECORD, LORA_FIELDS, LORA_SETTINGS
from flaxgpt.model import Transformer
from flaxgpt.modeldir import HFFormatError, read_json
from flaxgpt.sharding import logical_rules, make_mesh, mesh_context, sharded_abstract, unbox_shapes


@dataclass
class LoadedModel:
    cfg: Config
    model: Transformer
    params: Any
    tokenizer: Tokenizer
    step: int
    rules: tuple
    mesh: Any


def read_run(workdir: str) -> tuple[Config, Tokenizer]:
    """A run's config (model fields resolved) and tokenizer, checked to fit each other: a damaged
    or foreign file is a one-line error naming it, never a crash later in the model."""
    config_file = os.path.join(workdir, "config.json")
    if not fileio.exists(config_file):
        raise FileNotFoundError(f"{workdir} has no config.json: is it a flaxgpt workdir?")
    try:
        cfg = from_dict(read_json(config_file))
        cfg = dataclasses.replace(cfg, model=cfg.model.resolved())
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {one_line(e)}") from None
    tokenizer = load_tokenizer(workdir)
    if tokenizer is None:
        raise FileNotFoundError(f"{workdir} has no tokenizer.json or tokenizer.model")
    _check_vocab(cfg.model, tokenizer.vocab_size, workdir)
    return cfg, tokenizer


def _check_vocab(model: ModelConfig, ids: int, workdir: str) -> None:
    """The tokenizer's `ids` must fit the embedding (model.vocab_size) and cover every id the model
    can predict (all of them, or the first model.valid_vocab when the vocabulary is padded)."""
    predicted = model.valid_vocab or model.vocab_size
    if model.vocab_size and not predicted <= ids <= model.vocab_size:
        padded = f" (of which {model.valid_vocab} valid)" if model.valid_vocab else ""
        raise HFFormatError(
            f"{workdir}: its tokenizer has {ids} ids but config.json's model.vocab_size is {model.vocab_size}"
            f"{padded}: expected a tokenizer of {_ids_range(predicted, model.vocab_size)} (is it this model's?)"
        )


def _ids_range(low: int, high: int) -> str:
    return f"{low} ids" if low == high else f"between {low} and {high} ids"


def restore_params(
    workdir: str, cfg: Config, step: int | None, model_cfg: ModelConfig, mesh: Any, rules: tuple
) -> tuple[Any, int]:
    """(params of `model_cfg`'s shape sharded over `mesh`, step) from a run's checkpoint (default:
    the latest). Only the parameters are read, never the optimizer state, and nothing in the run's
    directory is written or removed (a trainer may be saving there). An adapter-only checkpoint
    gets its base rebuilt from the source it records (`with_base`)."""
    checkpointer = Checkpointer(workdir, cfg.checkpoint, read_only=True)
    step = _checkpoint_step(checkpointer, workdir, step)
    abstract, shardings = sharded_abstract(boxed_params(Transformer(model_cfg)), mesh, rules)
    # a PPO (or GRPO) run's checkpoint holds {"policy", "value"} ({"policy"}): its model is the policy
    path = ("policy",) if cfg.train.trainer in ("ppo", "grpo") else ()
    records = []  # the step's record, read once by restore_params

    def target(record: dict) -> Any:
        records.append(record)
        return lora.trained_part(abstract) if record.get(BASE_RECORD) else abstract

    params = checkpointer.restore_params(step, target, model_cfg, path)
    base = records[0].get(BASE_RECORD)
    checkpointer.close()
    if base:
        params = with_base(params, base, model_cfg, shardings, mesh, rules, f"{checkpointer.directory} step {step}")
    return params, step


def _checkpoint_step(checkpointer: Checkpointer, workdir: str, step: int | None) -> int:
    """`step` (default: the latest) after checking the run has a checkpoint there."""
    steps = checkpointer.manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
    return step


def with_base(
    trained: Any, base: dict, model_cfg: ModelConfig, shardings: Any, mesh: Any, rules: tuple, where: str
) -> Any:
    """The whole parameters of an adapter-only checkpoint at `where`: the frozen base rebuilt
    from the source `base` records (a run and step, or a Hugging Face directory), checked
    against the fingerprint recorded with it, with the `trained` leaves put in. A base that went
    missing or changed is a `CheckpointMismatch`: never a silently different model."""
    source = base.get("init_from") or base.get("init_from_hf")
    what = f"run {source} step {base['step']}" if "init_from" in base else f"Hugging Face model {source}"
    fix = "put that base back there (or train with checkpoint.adapters_only=false for checkpoints that stand alone)"
    try:
        full = base_params(base, model_cfg, mesh, rules)(shardings)
    except (OSError, UserError) as e:
        raise CheckpointMismatch(
            f"checkpoint {where} holds LoRA adapters only, and its base, the {what}, cannot be read "
            f"({one_line(e)}): {fix}"
        ) from None
    found = lora.base_fingerprint(full)
    if found != base["fingerprint"]:
        raise CheckpointMismatch(
            f"checkpoint {where} holds LoRA adapters only, trained on the {what} with fingerprint "
            f"{base['fingerprint']}; that base now has fingerprint {found} (it changed since): {fix}"
        )
    return lora.with_trained(full, trained)


def load(workdir: str, step: int | None = None, generates: bool = False) -> LoadedModel:
    """The latest (or the given) checkpoint of a workdir, placed on this host's devices. With
    `generates` (sample, chat) a reward model, whose scalar head gives no next-token logits, is
    refused in one line before its checkpoint is read."""
    cfg, tokenizer = read_run(workdir)
    if generates and cfg.model.output != "logits":
        raise ConfigError(
            f"{workdir} holds a reward model (model.output={cfg.model.output!r}): generate with a language model"
        )
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
    params, step = restore_params(workdir, cfg, step, cfg.model, mesh, rules)
    return LoadedModel(cfg, Transformer(cfg.model), params, tokenizer, step, rules, mesh)


# Fields a fine-tuning run takes from the run it starts from (they fix parameter shapes or
# their meaning); dropout, dtypes, remat, init_std and `output` stay the experiment's own.
_INHERITED = tuple(f for f in STRUCTURAL_FIELDS + MEANING_FIELDS if f not in ("output", "lora_alpha") + LORA_FIELDS) + (
    "vocab_multiple",
    "valid_vocab",
)


def inherit_model(own: ModelConfig, source: ModelConfig, source_dir: str) -> ModelConfig:
    """`own` with the structure of `source`. A structural field that `own` sets away from its
    default and that disagrees with the source is a mismatch, reported by name."""
    defaults, theirs, mine = to_dict(ModelConfig()), to_dict(source), to_dict(own)
    conflicts = [
        f"model.{k}: {source_dir} has {theirs[k]!r}, this experiment sets {mine[k]!r}"
        for k in _INHERITED
        if mine[k] != defaults[k] and mine[k] != theirs[k]
    ]
    if conflicts:
        raise CheckpointMismatch(
            "train.init_from: the model does not fit the run it starts from:\n  "
            + "\n  ".join(conflicts)
            + "\n(leave those fields unset: they are taken from the run)"
        )
    return dataclasses.replace(own, **{k: getattr(source, k) for k in _INHERITED}).resolved()


@dataclass(frozen=True)
class BaseParams:
    """A fine-tuning run's `init_params` (param shardings -> params) with `source`, the pinned
    record of where they come from (JSON): an adapter-only checkpoint rebuilds its base from it."""

    source: dict
    build: Callable[[Any], Any]

    def __call__(self, shardings: Any) -> Any:
        return self.build(shardings)


def base_params(source: dict, model_cfg: ModelConfig, mesh: Any, rules: tuple) -> BaseParams:
    """The `BaseParams` a `BaseParams.source` record describes, again."""
    if "init_from" in source:
        return params_from_run(source["init_from"], source["step"], model_cfg, mesh, rules, source["seed"])
    return params_from_hf(source["init_from_hf"], model_cfg, source["hf_vocab"], mesh, rules, source["seed"])


def params_from_run(
    source_dir: str, step: int | None, model_cfg: ModelConfig, mesh: Any, rules: tuple, seed: int
) -> BaseParams:
    """For `fit(init_params=...)`: the source run's parameters in `model_cfg`'s tree. A source's
    LoRA adapters are folded into its weights first (a run's model is its merged model).
    Parameters the source lacks (a new `score` head, new adapters) are initialised; ones it has
    and the target lacks (the vocabulary head of an LM turned reward model) are dropped."""
    source_cfg, _ = read_run(source_dir)
    source_model = dataclasses.replace(
        model_cfg,
        output=source_cfg.model.output,
        dropout=source_cfg.model.dropout,
        **{k: getattr(source_cfg.model, k) for k in LORA_SETTINGS},
    )
    check_model_compatible(to_dict(source_cfg.model), source_model, source_dir)
    checkpointer = Checkpointer(source_dir, source_cfg.checkpoint, read_only=True)
    step = _checkpoint_step(checkpointer, source_dir, step)  # pinned: the source may train on
    checkpointer.close()

    def init_params(shardings: Any) -> Any:
        source, _ = restore_params(source_dir, source_cfg, step, source_model, mesh, rules)
        source, _ = lora.merge(source, source_model)
        known = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
        return complete_params(known, model_cfg, shardings, mesh, rules, seed)

    return BaseParams({"init_from": fileio.absolute(source_dir), "step": step, "seed": seed}, init_params)


def params_from_hf(
    directory: str, model_cfg: ModelConfig, hf_vocab: int, mesh: Any, rules: tuple, seed: int
) -> BaseParams:
    """For `fit(init_params=...)`: a Hugging Face checkpoint's weights, each placed straight onto
    its shards; what it lacks (adapters, a score head) is initialised."""

    def init_params(shardings: Any) -> Any:
        abstract = unbox_shapes(boxed_params(Transformer(model_cfg)))
        known = hf.place_from_host(hf.hf_leaf_sources(directory, model_cfg, hf_vocab), shardings, abstract)
        return complete_params(known, model_cfg, shardings, mesh, rules, seed)

    source = {"init_from_hf": fileio.absolute(directory), "hf_vocab": hf_vocab, "seed": seed}
    return BaseParams(source, init_params)


def complete_params(
    known: dict[str, Any], model_cfg: ModelConfig, shardings: Any, mesh: Any, rules: tuple, seed: int
) -> Any:
    """`model_cfg`'s parameter tree (on `shardings`): the `known` leaves (by keystr), the rest
    freshly initialised."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(shardings)]
    fresh = None
    if any(p not in known for p in paths):
        model = Transformer(model_cfg)
        tokens = jnp.zeros((1, model_cfg.block_size), jnp.int32)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            fresh = jax.jit(
                lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"]), out_shardings=shardings
            )()
    pick = lambda path, leaf: known.get(jax.tree_util.keystr(path), leaf)
    return jax.tree_util.tree_map_with_path(pick, fresh if fresh is not None else shardings)


def boxed_params(model: nn.Module) -> Any:
    """The model's parameter tree as boxed shapes (no memory): what shardings are derived from."""
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.cfg.block_size), jnp.int32))["params"]
    )


def logical_context(loaded: LoadedModel) -> contextlib.ExitStack:
    """The mesh and axis rules under which the model's sharding constraints resolve."""
    return mesh_context(loaded.mesh, loaded.rules)


def add_decode_flags(parser, *, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The decoding flags shared by the sample and chat CLIs."""
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--max-new-tokens", type=ranged(int, ">= 1"), default=max_new_tokens, help="tokens to generate, >= 1"
    )
    group.add_argument("--temperature", type=ranged(float, ">= 0"), default=temperature, help=">= 0; 0: greedy")
    group.add_argument("--top-k", type=ranged(int, ">= 0"), default=0, help=">= 0; 0: off")
    group.add_argument("--top-p", type=ranged(float, "(0, 1]"), default=top_p, help="in (0, 1]; 1: off")
    group.add_argument("--num-beams", type=ranged(int, ">= 1"), default=1, help=">= 1; > 1: beam search")
    group.add_argument("--length-penalty", type=ranged(float, "any"), default=1.0, help="beam score exponent")
    group.add_argument("--seed", type=ranged(int, ">= 0"), default=0, help="sampling seed, >= 0")


def decode_config(args) -> DecodeConfig:
    return DecodeConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
    )
