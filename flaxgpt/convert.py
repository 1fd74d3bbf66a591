"""Hugging Face checkpoints in and out.

`python -m flaxgpt.convert import --hf HF_DIR --workdir OUT [--set model.scan_layers=true ...]`
    writes a flaxgpt run (config.json, the model's own tokenizer, a step-0 checkpoint of the
    parameters) that `sample`, `chat` and `train.init_from` use like any other run.
`python -m flaxgpt.convert export --workdir RUN --hf OUT_DIR [--step N] [--dtype bfloat16]`
    writes config.json, model.safetensors (sharded with an index past --max-shard-gb) and the
    tokenizer, loadable by `transformers`. LoRA adapters are merged in; a PPO run exports its policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from flaxgpt import hf, lora
from flaxgpt import runs as inference
from flaxgpt.chat_template import stop_tokens
from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, ConfigError, apply_overrides, to_dict, to_json
from flaxgpt.data.tokenizers import SPECIAL_TOKENS, ImportedTokenizer, SentencePieceTokenizer, Tokenizer
from flaxgpt.model import unstack_layers
from flaxgpt.sharding import host_value, logical_rules, logical_shardings, make_mesh, unbox_shapes

# The chat format of `flaxgpt.chat_template` as a Jinja template, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def import_hf(hf_dir: str, workdir: str, overrides: Sequence[str] = ()) -> Config:
    """A Hugging Face model directory -> a flaxgpt run in `workdir` (parameters at step 0)."""
    cfg = apply_overrides(Config(name="imported"), list(overrides))
    model_cfg, tokenizer, hf_vocab = hf.import_model(hf_dir, cfg.model)
    cfg = dataclasses.replace(cfg, model=model_cfg).validate()
    os.makedirs(workdir, exist_ok=True)
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
    boxed = inference._boxed_params(model_cfg)
    shardings = unbox_shapes(logical_shardings(boxed, mesh, rules))
    params = inference.params_from_hf(hf_dir, model_cfg, hf_vocab, mesh, rules, cfg.train.seed)(shardings)

    if jax.process_index() == 0:
        tokenizer.save(workdir)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(to_json(cfg))
    checkpointer = Checkpointer(workdir, cfg.checkpoint)
    checkpointer.save(
        0, {"params": params}, {"step": 0, "model": to_dict(model_cfg), "imported_from": hf_dir}, force=True
    )
    checkpointer.close()
    return cfg


def export_hf(
    workdir: str, out_dir: str, step: int | None = None, dtype: str = "float32", max_shard_gb: float = 5.0
) -> dict:
    """A flaxgpt run -> a Hugging Face model directory; returns the config.json written."""
    loaded = inference.load(workdir, step)
    model_cfg = loaded.model.cfg
    params = host_value(loaded.params)
    if model_cfg.scan_layers:
        params = unstack_layers(params)
    params, model_cfg = lora.merge(params, model_cfg)
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    tok = loaded.tokenizer
    hf_config = hf.hf_config_from_model(model_cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
    hf_config["torch_dtype"] = dtype
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tensors = hf.export_tensors(params, model_cfg, np_dtype)
    os.makedirs(out_dir, exist_ok=True)
    _write_weights(out_dir, tensors, int(max_shard_gb * 2**30))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": stop_tokens(tok), "pad_token_id": tok.pad_id}, f, indent=2)
    _write_tokenizer(tok, out_dir)
    return hf_config


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
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(
            {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}, f, indent=2
        )


def _write_tokenizer(tok: Tokenizer, out_dir: str) -> None:
    """The tokenizer with flaxgpt's special tokens at flaxgpt's ids, and the chat template."""
    names = {i: t for t, i in _special_ids(tok).items()}
    # an alias of the model's own token (GPT-2's <|endoftext|> as <|eos|>) keeps the model's own text
    own = {i: tok.own_token(i) for i in names} if isinstance(tok, ImportedTokenizer) else {}
    names.update({i: t for i, t in own.items() if t is not None})
    added = {i: t for i, t in names.items() if own.get(i) is None}
    base_config: dict[str, Any] = {
        "eos_token": names[tok.eos_id],
        "pad_token": names[tok.pad_id],
        "chat_template": CHAT_TEMPLATE,
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
        with open(tok.file) as f:
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
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            json.dump(spec, f, ensure_ascii=False)
        base_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif isinstance(tok, (ImportedTokenizer, SentencePieceTokenizer)):
        source = tok.file if isinstance(tok, ImportedTokenizer) else tok.model_file
        with open(source, "rb") as src, open(os.path.join(out_dir, "tokenizer.model"), "wb") as dst:
            dst.write(src.read())
        base_config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=False)
    else:
        print(
            "note: a character tokenizer has no Hugging Face counterpart; only the model was exported "
            "(flaxgpt's tokenizer.json stays in the run's workdir)",
            file=sys.stderr,
        )
        return
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(base_config, f, indent=2)


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    if isinstance(tok, ImportedTokenizer):
        return dict(tok.specials)
    return {t: tok.encode(t)[0] for t in SPECIAL_TOKENS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxgpt.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> flaxgpt run")
    imp.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--workdir", "-w", required=True)
    imp.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. model.scan_layers=true model.block_size=2048 mesh.fsdp=8",
    )
    exp = sub.add_parser("export", help="flaxgpt run -> Hugging Face directory")
    exp.add_argument("--workdir", "-w", required=True)
    exp.add_argument("--hf", required=True, help="output directory")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    exp.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            cfg = import_hf(args.hf, args.workdir, args.set)
            m = cfg.model
            print(
                f"imported {args.hf} ({m.recipe}: {m.n_layer} layers, d_model {m.d_model}, vocab {m.vocab_size}) "
                f"-> {args.workdir}"
            )
        else:
            hf_config = export_hf(args.workdir, args.hf, args.step, args.dtype, args.max_shard_gb)
            print(
                f"exported {args.workdir} -> {args.hf} ({hf_config['architectures'][0]}, "
                f"vocab {hf_config['vocab_size']})"
            )
    except (hf.HFFormatError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
