"""Hugging Face checkpoints in and out.

`python -m flaxgpt.convert import --hf HF_DIR --workdir OUT [--peft ADAPTER_DIR] [--set model.scan_layers=true ...]`
    writes a flaxgpt run (config.json, the model's own tokenizer and chat template, a step-0
    checkpoint of the parameters) that `sample`, `chat` and `train.init_from` use like any other
    run; with --peft, a PEFT LoRA adapter on that base (a LoRA run with its rank and targets).
`python -m flaxgpt.convert export --workdir RUN --hf OUT_DIR [--step N] [--dtype bfloat16]`
    writes config.json, model.safetensors (sharded with an index past --max-shard-gb) and the
    tokenizer, loadable by `transformers`. LoRA adapters are merged in; a PPO run exports its policy.
    `--peft ADAPTER_DIR` (with or instead of --hf) writes a LoRA run's adapters alone in PEFT's
    format, for `peft.PeftModel.from_pretrained` on the export of the model the run started from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from flaxgpt import cli, fileio, hf, lora, runs
from flaxgpt.chat_template import stop_tokens
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, apply_overrides, to_dict, to_json
from flaxgpt.data.tokenizers import SPECIAL_TOKENS, ImportedTokenizer, SentencePieceTokenizer, Tokenizer, copy_file
from flaxgpt.model import Transformer, unstack_layers
from flaxgpt.sharding import host_value, logical_rules, logical_shardings, make_mesh, unbox_shapes
from flaxgpt.workdir import LOCK_FILE, WorkdirLock

# The chat format of `flaxgpt.chat_template` as a Jinja template, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# What a flaxgpt run and a Hugging Face model directory hold: an import or export with --force
# removes these (and only these) first, so that no stale checkpoint, shard or tokenizer of the
# directory's previous content is mixed with the new one.
RUN_FILES = ("checkpoints", "config.json", "tokenizer.json", "tokenizer.model", "tokenizer.vocab")
HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _refuse_non_empty(directory: str, force: bool, what: str, flag: str, owned: Sequence[str]) -> None:
    """Refuse to write into a directory that already holds something, unless `force`; with it,
    remove what the write would otherwise mix with (the `owned` names, *.safetensors,
    imported_*). A workdir lock file alone does not count as content."""
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise hf.HFFormatError(f"{flag} {directory} is not a directory")
    entries = sorted(e for e in os.listdir(directory) if not e.startswith(LOCK_FILE))
    if not entries:
        return
    if not force:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise hf.HFFormatError(
            f"{flag} {directory} is not empty (it holds {shown}): {what} would replace its files; "
            "choose an empty or new directory, or pass --force to replace them"
        )
    for name in entries:
        path = os.path.join(directory, name)
        if name in owned or name.endswith(".safetensors") or name.startswith("imported_"):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _refuse_overlap(source: str, source_flag: str, target: str, target_flag: str) -> None:
    """Refuse a target that is the source directory, lies inside it or holds it: writing there
    (and --force's removal) would replace or mix with the very files being converted."""
    remote = fileio.is_remote(source) or fileio.is_remote(target)
    a, b = (p.rstrip("/") if remote else os.path.realpath(p) for p in (source, target))
    if a == b or b.startswith(a.rstrip("/") + "/") or a.startswith(b.rstrip("/") + "/"):
        raise hf.HFFormatError(
            f"{target_flag} {target} is {'the same directory as' if a == b else 'nested with'} {source_flag} "
            f"{source}: write the conversion to a separate directory"
        )


def import_hf(
    hf_dir: str, workdir: str, overrides: Sequence[str] = (), force: bool = False, peft: str | None = None
) -> Config:
    """A Hugging Face model directory -> a flaxgpt run in `workdir` (parameters at step 0); with
    `peft`, a PEFT LoRA adapter directory whose adapters (and LoRA settings) the run carries on
    that base. Everything is checked (the target directory, the config, every tensor header,
    the tokenizer, the adapter) and the weights are read before anything is written or removed;
    a non-empty `workdir` is refused unless `force`, and one a running process holds always."""
    for source, flag in ((hf_dir, "--hf"), (peft, "--peft")):
        if source is not None:
            _refuse_overlap(source, flag, workdir, "--workdir")
    if not force:
        _refuse_non_empty(workdir, False, "the import", "--workdir", RUN_FILES)
    cfg = apply_overrides(Config(name="imported"), list(overrides))
    model_cfg, tokenizer, hf_vocab = hf.import_model(hf_dir, cfg.model)
    if peft is not None:
        model_cfg = dataclasses.replace(model_cfg, **hf.adapter_settings(peft, model_cfg)).resolved()
        adapters = hf.adapter_leaf_sources(peft, model_cfg)
    cfg = dataclasses.replace(cfg, model=model_cfg).validate()
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
    boxed = runs.boxed_params(Transformer(model_cfg))
    shardings = unbox_shapes(logical_shardings(boxed, mesh, rules))
    params = runs.params_from_hf(hf_dir, model_cfg, hf_vocab, mesh, rules, cfg.train.seed)(shardings)
    if peft is not None:
        placed = hf.place_from_host(adapters, shardings, unbox_shapes(boxed))
        params = jax.tree_util.tree_map_with_path(lambda p, v: placed.get(jax.tree_util.keystr(p), v), params)
    with WorkdirLock(workdir):  # a training run there is refused before any of its files go
        if jax.process_index() == 0:
            _refuse_non_empty(workdir, force, "the import", "--workdir", RUN_FILES)
            tokenizer.save(workdir)
            fileio.write_atomic(os.path.join(workdir, "config.json"), to_json(cfg))
        checkpointer = Checkpointer(workdir, cfg.checkpoint)
        meta = {"step": 0, "model": to_dict(model_cfg), "imported_from": hf_dir}
        checkpointer.save(0, {"params": params}, meta | ({"adapter_from": peft} if peft else {}), force=True)
        checkpointer.close()
    return cfg


def export_hf(
    workdir: str,
    out_dir: str,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_gb: float = 5.0,
    force: bool = False,
) -> dict:
    """A flaxgpt run -> a Hugging Face model directory; returns the config.json written. An
    `out_dir` that already holds files is refused unless `force`."""
    _refuse_overlap(workdir, "--workdir", out_dir, "--hf")
    if not force:
        _refuse_non_empty(out_dir, False, "the export", "--hf", HF_FILES)
    tok, params, model_cfg = _host_model(workdir, step)
    params, model_cfg = lora.merge(params, model_cfg)
    hf_config = hf.hf_config_from_model(model_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
    hf_config["torch_dtype"] = dtype
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tensors = hf.export_tensors(params, model_cfg, np_dtype)
    _refuse_non_empty(out_dir, force, "the export", "--hf", HF_FILES)
    os.makedirs(out_dir, exist_ok=True)
    _write_weights(out_dir, tensors, int(max_shard_gb * 2**30))
    _write_json(os.path.join(out_dir, "config.json"), hf_config)
    _write_json(
        os.path.join(out_dir, "generation_config.json"), {"eos_token_id": stop_tokens(tok), "pad_token_id": tok.pad_id}
    )
    _write_tokenizer(tok, out_dir)
    return hf_config


def _host_model(workdir: str, step: int | None) -> tuple[Tokenizer, dict, Any]:
    """(tokenizer, parameters on the host with unrolled layers, their model config) of a run."""
    loaded = runs.load(workdir, step)
    params = host_value(loaded.params)
    if loaded.model.cfg.scan_layers:
        params = unstack_layers(params)
    return loaded.tokenizer, params, dataclasses.replace(loaded.model.cfg, scan_layers=False)


def export_peft_adapter(workdir: str, out_dir: str, step: int | None = None, force: bool = False) -> dict:
    """A LoRA run's adapters alone, as PEFT's adapter_model.safetensors + adapter_config.json
    (`peft.PeftModel.from_pretrained` loads them onto the export of the run the LoRA run started
    from); returns the adapter config written."""
    _refuse_overlap(workdir, "--workdir", out_dir, "--peft")
    _, params, model_cfg = _host_model(workdir, step)
    return write_peft_adapter(out_dir, params, model_cfg, force)


def write_peft_adapter(out_dir: str, params: dict, model_cfg: Any, force: bool = False) -> dict:
    """`hf.export_adapter` of host parameters with unrolled layers, written into `out_dir`."""
    owned = ("adapter_model.safetensors", "adapter_config.json")
    _refuse_non_empty(out_dir, force, "the adapter export", "adapter directory", owned)
    tensors, config = hf.export_adapter(params, model_cfg)
    os.makedirs(out_dir, exist_ok=True)
    hf.write_safetensors(os.path.join(out_dir, owned[0]), tensors)
    _write_json(os.path.join(out_dir, owned[1]), config)
    return config


def _write_json(path: str, value: Any, **kwargs: Any) -> None:
    fileio.write_atomic(path, json.dumps(value, indent=kwargs.pop("indent", 2), **kwargs))


def _write_weights(out_dir: str, tensors: dict[str, np.ndarray], max_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        hf.write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        hf.write_safetensors(os.path.join(out_dir, file), shard)
        weight_map.update({name: file for name in shard})
    _write_json(
        os.path.join(out_dir, "model.safetensors.index.json"),
        {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map},
    )


def _write_tokenizer(tok: Tokenizer, out_dir: str) -> None:
    """The tokenizer with flaxgpt's special tokens at flaxgpt's ids, and the chat template."""
    names = {i: t for t, i in _special_ids(tok).items()}
    # an alias of the model's own token (GPT-2's <|endoftext|> as <|eos|>) keeps the model's own text
    own = {i: tok.own_token(i) for i in names} if isinstance(tok, ImportedTokenizer) else {}
    names.update({i: t for i, t in own.items() if t is not None})
    added = {i: t for i, t in names.items() if own.get(i) is None}
    base_config: dict[str, Any] = {
        **getattr(tok, "template_tokens", {}),  # what an imported template reads (bos_token...)
        "eos_token": names[tok.eos_id],
        "pad_token": names[tok.pad_id],
        "chat_template": getattr(tok, "chat_template", None) or CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, t in added.items()
        },
    }
    if isinstance(tok, ImportedTokenizer) and tok.kind == "tokenizers":
        with open(tok.file, encoding="utf-8") as f:
            spec = json.load(f)
        taken = {entry["id"] for entry in spec.get("added_tokens", [])}
        spec.setdefault("added_tokens", []).extend(
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in sorted(added.items())
            if i not in taken
        )
        _write_json(os.path.join(out_dir, "tokenizer.json"), spec, indent=None, ensure_ascii=False)
        base_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif isinstance(tok, (ImportedTokenizer, SentencePieceTokenizer)):
        source = tok.file if isinstance(tok, ImportedTokenizer) else tok.model_file
        copy_file(source, os.path.join(out_dir, "tokenizer.model"))
        prefix, suffix = (tok.prefix_ids, tok.suffix_ids) if isinstance(tok, ImportedTokenizer) else ([], [])
        base_config.update(
            tokenizer_class="LlamaTokenizer", add_bos_token=bool(prefix), add_eos_token=bool(suffix), legacy=False
        )
        if prefix:  # the imported model's own BOS convention goes out with it
            base_config["bos_token"] = tok.own_token(prefix[0])
    else:
        print(
            "note: a character tokenizer has no Hugging Face counterpart; only the model was exported "
            "(flaxgpt's tokenizer.json stays in the run's workdir)",
            file=sys.stderr,
        )
        return
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), base_config)


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    if isinstance(tok, ImportedTokenizer):
        return dict(tok.specials)
    return {t: tok.special_id(t) for t in SPECIAL_TOKENS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> flaxgpt run", description=__doc__)
    imp.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--workdir", "-w", required=True)
    imp.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. model.scan_layers=true model.block_size=2048 mesh.fsdp=8",
    )
    imp.add_argument("--peft", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter to carry on the --hf base model")
    imp.add_argument("--force", action="store_true", help="import into a non-empty workdir, replacing its run")
    exp = sub.add_parser("export", help="flaxgpt run -> Hugging Face directory", description=__doc__)
    exp.add_argument("--workdir", "-w", required=True)
    exp.add_argument("--hf", help="output directory of the whole model (LoRA adapters merged in)")
    exp.add_argument("--peft", metavar="ADAPTER_DIR", help="output directory of a LoRA run's adapters alone, for peft")
    exp.add_argument("--step", type=cli.ranged(int, ">= 0"), help="checkpoint step (default: the latest)")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="of the weights")
    exp.add_argument("--max-shard-gb", type=cli.ranged(float, "> 0"), default=5.0, help="size of each weights file")
    exp.add_argument("--force", action="store_true", help="export into a non-empty directory, replacing its model")
    args = parser.parse_args(argv)
    if args.command == "import":
        cfg = import_hf(args.hf, args.workdir, args.set, args.force, args.peft)
        m = cfg.model
        adapter = f" with the LoRA adapter {args.peft} (rank {m.lora_rank})" if args.peft else ""
        print(
            f"imported {args.hf}{adapter} ({m.recipe}: {m.n_layer} layers, d_model {m.d_model}, "
            f"vocab {m.vocab_size}) -> {args.workdir}"
        )
        return 0
    if not (args.hf or args.peft):
        parser.error("export needs --hf OUT_DIR (the whole model), --peft ADAPTER_DIR (the adapters alone), or both")
    if args.peft:
        config = export_peft_adapter(args.workdir, args.peft, args.step, args.force)
        print(
            f"exported the adapters of {args.workdir} -> {args.peft} (rank {config['r']}, {config['target_modules']})"
        )
    if args.hf:
        hf_config = export_hf(args.workdir, args.hf, args.step, args.dtype, args.max_shard_gb, args.force)
        print(
            f"exported {args.workdir} -> {args.hf} ({hf_config['architectures'][0]}, vocab {hf_config['vocab_size']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
