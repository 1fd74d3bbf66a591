"""Hugging Face interoperability: GPT-2 (`GPT2LMHeadModel`) and Llama-family (`LlamaForCausalLM`)
weights and configs in the Hugging Face layout (`config.json` + `*.safetensors`, one file or
sharded with `model.safetensors.index.json`), to and from flaxgpt parameters.

One table per family lists which Hugging Face tensor feeds which flaxgpt parameter and how it is
laid out (torch `Linear` [out, in], GPT-2's `Conv1D` [in, out], or as is); import and export both
read it, so they cannot disagree. Safetensors files are read through memory maps, one tensor at a
time, and each parameter goes straight onto its shards of the mesh
(`jax.make_array_from_callback`): no device ever holds more than its own shards. Safetensors is a
documented, trivially simple format (8-byte header length, JSON header, raw little-endian data);
reading it here keeps torch out of the core install and handles bfloat16 through ml_dtypes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np

from flaxgpt.config import ModelConfig
from flaxgpt.data.tokenizers import ImportedTokenizer
from flaxgpt.errors import UserError

SUPPORTED = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class HFFormatError(UserError):
    """A Hugging Face directory this importer cannot read: unsupported architecture, a missing
    tensor, or a tensor of the wrong shape (named, with what was expected)."""


# ----------------------------------------------------------------------------- safetensors


class SafetensorsReader:
    """Every tensor of a Hugging Face directory, by name, read lazily through memory maps."""

    def __init__(self, directory: str):
        index_file = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_file):
            with open(index_file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(directory, f) for f in files]
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise HFFormatError(
                f"{directory} holds no *.safetensors weights (pytorch_model.bin is not read: "
                "save the model with safe_serialization=True)"
            )
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for file in files:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.entries[name] = (file, info, 8 + header_len)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        file, info, data_start = self.entries[name]
        if info["dtype"] not in _DTYPES:
            raise HFFormatError(f"{file}: tensor {name} has dtype {info['dtype']}, which flaxgpt does not read")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = (end - begin) // dtype.itemsize
        data = np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,))
        return np.asarray(data).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, value in tensors.items():
        nbytes = value.size * value.dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for value in tensors.values():
            f.write(np.ascontiguousarray(value).tobytes())


# ----------------------------------------------------------------------------- configs


def read_hf_config(directory: str) -> dict:
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        raise HFFormatError(f"{directory} has no config.json: is it a Hugging Face model directory?")
    with open(config_file) as f:
        return json.load(f)


def family(hf: dict) -> str:
    architectures = hf.get("architectures") or []
    for arch in architectures:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    raise HFFormatError(
        f"unsupported architecture {architectures or hf.get('model_type')!r}; flaxgpt imports {sorted(SUPPORTED)}"
    )


def _require(hf: dict, key: str, allowed: tuple, default: Any) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFFormatError(f"config.json {key}={value!r} is not supported (supported: {list(allowed)})")


def model_config_from_hf(hf: dict, block_size: int | None = None) -> ModelConfig:
    """The flaxgpt model of a Hugging Face config (vocabulary as the checkpoint has it).
    `block_size` caps the context of rotary models (Llama's max_position_embeddings is often
    far longer than a fine-tuning run needs); learned positions always keep theirs."""
    kind = family(hf)
    if kind == "gpt2":
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        _require(hf, "scale_attn_weights", (True,), True)
        d_model = hf["n_embd"]
        return ModelConfig(
            recipe="gpt2",
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            d_model=d_model,
            d_ff=hf.get("n_inner") or 4 * d_model,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        ).resolved()
    _require(hf, "hidden_act", ("silu",), "silu")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFFormatError(f"config.json rope scaling {rope!r} is not supported (plain RoPE only)")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise HFFormatError("config.json: attention_bias and mlp_bias differ; flaxgpt's use_bias covers both")
    n_head = hf["num_attention_heads"]
    context = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        recipe="llama",
        vocab_size=hf["vocab_size"],
        block_size=min(context, block_size or context),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_heads=hf.get("num_key_value_heads") or n_head,
        d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        d_ff=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        use_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    ).resolved()


def hf_config_from_model(cfg: ModelConfig, eos_id: int, pad_id: int) -> dict:
    """config.json for an export; the model must be exactly one of the two families."""
    cfg = cfg.resolved()
    expect = {
        "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True),
        "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu"),
    }[cfg.recipe]
    wrong = [
        f"model.{k}={getattr(cfg, k)!r} (the {cfg.recipe} family has {v!r})"
        for k, v in expect.items()
        if getattr(cfg, k) != v
    ]
    if cfg.output != "logits":
        wrong.append(f"model.output={cfg.output!r} (a causal LM has logits)")
    if wrong:
        raise HFFormatError("this model has no Hugging Face counterpart: " + "; ".join(wrong))
    common = {
        "vocab_size": cfg.vocab_size,
        "eos_token_id": eos_id,
        "bos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.recipe == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": cfg.block_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.block_size,
        "hidden_act": "silu",
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        **common,
    }


# ----------------------------------------------------------------------------- the tensor tables


@dataclass(frozen=True)
class Entry:
    """flaxgpt parameter `ours` (dotted path, unrolled layers) <- Hugging Face tensor `hf`.

    layout: "torch" ([out, in], transposed), "conv1d" ([in, out]) or "plain"; `n_in` leading
    dims of ours form the input side; `part` of `parts` slices a fused tensor (GPT-2's c_attn)
    along its output side; `vocab_axis` is where the imported vocabulary may be extended."""

    ours: str
    hf: str
    layout: str = "plain"
    n_in: int = 1
    part: int = 0
    parts: int = 1
    vocab_axis: int | None = None


def tensor_table(cfg: ModelConfig, hf_names: set | None = None) -> list[Entry]:
    """The entries of `cfg`'s family. `hf_names`, when given, decides between the two naming
    conventions of GPT-2 checkpoints (with or without the `transformer.` prefix)."""
    entries: list[Entry] = []
    if cfg.recipe == "gpt2":
        p = "transformer." if hf_names is None or any(n.startswith("transformer.") for n in hf_names) else ""
        entries += [
            Entry("token_embed.embedding", f"{p}wte.weight", vocab_axis=0),
            Entry("position_embed.embedding", f"{p}wpe.weight"),
            Entry("final_norm.scale", f"{p}ln_f.weight", n_in=0),
            Entry("final_norm.bias", f"{p}ln_f.bias", n_in=0),
        ]
        for i in range(cfg.n_layer):
            h, o = f"{p}h.{i}.", f"layers_{i}."
            for j, name in enumerate(("query", "key", "value")):
                entries += [
                    Entry(o + f"attn.{name}.kernel", h + "attn.c_attn.weight", "conv1d", 1, j, 3),
                    Entry(o + f"attn.{name}.bias", h + "attn.c_attn.bias", n_in=0, part=j, parts=3),
                ]
            entries += [
                Entry(o + "attn.out.kernel", h + "attn.c_proj.weight", "conv1d", 2),
                Entry(o + "attn.out.bias", h + "attn.c_proj.bias", n_in=0),
                Entry(o + "mlp.up.kernel", h + "mlp.c_fc.weight", "conv1d"),
                Entry(o + "mlp.up.bias", h + "mlp.c_fc.bias", n_in=0),
                Entry(o + "mlp.down.kernel", h + "mlp.c_proj.weight", "conv1d"),
                Entry(o + "mlp.down.bias", h + "mlp.c_proj.bias", n_in=0),
            ]
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                entries += [
                    Entry(o + f"{ours}.scale", h + f"{theirs}.weight", n_in=0),
                    Entry(o + f"{ours}.bias", h + f"{theirs}.bias", n_in=0),
                ]
        return entries
    entries += [
        Entry("token_embed.embedding", "model.embed_tokens.weight", vocab_axis=0),
        Entry("final_norm.scale", "model.norm.weight", n_in=0),
    ]
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head.kernel", "lm_head.weight", "torch", vocab_axis=1))
    for i in range(cfg.n_layer):
        h, o = f"model.layers.{i}.", f"layers_{i}."
        projections = [
            ("attn.query", "self_attn.q_proj", 1),
            ("attn.key", "self_attn.k_proj", 1),
            ("attn.value", "self_attn.v_proj", 1),
            ("attn.out", "self_attn.o_proj", 2),
            ("mlp.gate", "mlp.gate_proj", 1),
            ("mlp.up", "mlp.up_proj", 1),
            ("mlp.down", "mlp.down_proj", 1),
        ]
        for ours, theirs, n_in in projections:
            entries.append(Entry(o + ours + ".kernel", h + theirs + ".weight", "torch", n_in))
            if cfg.use_bias:
                entries.append(Entry(o + ours + ".bias", h + theirs + ".bias", n_in=0))
        entries += [
            Entry(o + "attn_norm.scale", h + "input_layernorm.weight", n_in=0),
            Entry(o + "mlp_norm.scale", h + "post_attention_layernorm.weight", n_in=0),
        ]
    return entries


def _flat2(shape: tuple, n_in: int) -> tuple:
    """Our parameter as the 2-D (or 1-D) matrix Hugging Face stores."""
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[:n_in]), math.prod(shape[n_in:]))


def _expected_hf_shape(entry: Entry, shape: tuple, hf_vocab: int) -> tuple:
    flat = list(_flat2(shape, entry.n_in))
    if entry.vocab_axis is not None:
        flat[entry.vocab_axis] = hf_vocab
    flat[-1] *= entry.parts
    return tuple(reversed(flat)) if entry.layout == "torch" else tuple(flat)


def import_leaf(reader: SafetensorsReader, entry: Entry, shape: tuple, hf_vocab: int, where: str) -> np.ndarray:
    """One flaxgpt parameter of `shape` from its Hugging Face tensor (float32 on the host)."""
    if entry.hf not in reader:
        raise HFFormatError(f"{where}: tensor {entry.hf} is missing (it feeds flaxgpt parameter {entry.ours})")
    expected = _expected_hf_shape(entry, shape, hf_vocab)
    if reader.shape(entry.hf) != expected:
        raise HFFormatError(
            f"{where}: tensor {entry.hf} has shape {reader.shape(entry.hf)}, expected {expected} "
            f"(for flaxgpt parameter {entry.ours} {tuple(shape)})"
        )
    value = reader.read(entry.hf).astype(np.float32)
    if entry.layout == "torch":
        value = value.T
    if entry.parts > 1:
        value = np.split(value, entry.parts, axis=-1)[entry.part]
    if entry.vocab_axis is not None and value.shape[entry.vocab_axis] < shape[entry.vocab_axis]:
        # tokens the import appended (chat markers, pad): the mean row, as HF's resize does
        extra = shape[entry.vocab_axis] - value.shape[entry.vocab_axis]
        mean = value.mean(axis=entry.vocab_axis, keepdims=True)
        value = np.concatenate([value, np.repeat(mean, extra, axis=entry.vocab_axis)], axis=entry.vocab_axis)
    return value.reshape(shape)


def export_tensors(params: dict, cfg: ModelConfig, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Hugging Face tensors of (host, unrolled-layer, LoRA-merged) flaxgpt parameters."""
    flat = {
        ".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    grouped: dict[str, list[tuple[Entry, np.ndarray]]] = {}
    for entry in tensor_table(cfg):
        value = flat[entry.ours].astype(np.float32).reshape(_flat2(flat[entry.ours].shape, entry.n_in))
        grouped.setdefault(entry.hf, []).append((entry, value))
    out = {}
    for name, parts in grouped.items():
        parts.sort(key=lambda item: item[0].part)
        value = np.concatenate([v for _, v in parts], axis=-1) if len(parts) > 1 else parts[0][1]
        out[name] = np.ascontiguousarray(value.T if parts[0][0].layout == "torch" else value).astype(dtype)
    return out


# ----------------------------------------------------------------------------- onto the mesh


def _keystr(dotted: str) -> str:
    return "".join(f"['{k}']" for k in dotted.split("."))


def hf_leaf_sources(directory: str, cfg: ModelConfig, hf_vocab: int) -> dict[str, Callable[[tuple], np.ndarray]]:
    """keystr of each flaxgpt parameter the checkpoint provides -> (shape -> host value). With
    scanned layers, the per-layer tensors are stacked on a leading axis."""
    reader = SafetensorsReader(directory)
    entries = tensor_table(cfg, set(reader.entries))
    sources: dict[str, Callable[[tuple], np.ndarray]] = {}
    by_stacked: dict[str, list[Entry]] = {}
    for entry in entries:
        if cfg.scan_layers and entry.ours.startswith("layers_"):
            by_stacked.setdefault("layers." + entry.ours.split(".", 1)[1], []).append(entry)
        else:
            sources[_keystr(entry.ours)] = lambda shape, e=entry: import_leaf(reader, e, shape, hf_vocab, directory)
    for stacked, layer_entries in by_stacked.items():
        sources[_keystr(stacked)] = lambda shape, es=layer_entries: np.stack(
            [import_leaf(reader, e, shape[1:], hf_vocab, directory) for e in es]
        )
    return sources


def place_from_host(
    sources: dict[str, Callable[[tuple], np.ndarray]], shardings: Any, dtypes: Any
) -> dict[str, jax.Array]:
    """Each source onto its sharding, one parameter at a time: a device only receives its shards."""
    placed = {}
    flat_shardings = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    flat_dtypes = {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(dtypes)}
    for key, source in sources.items():
        if key not in flat_shardings:
            continue  # e.g. an untied head the target model does not have
        struct = flat_dtypes[key]
        host = source(tuple(struct.shape)).astype(struct.dtype)
        placed[key] = jax.make_array_from_callback(host.shape, flat_shardings[key], lambda index: host[index])
    return placed


def import_model(directory: str, own: ModelConfig) -> tuple[ModelConfig, ImportedTokenizer, int]:
    """(model config, tokenizer, the checkpoint's own vocabulary size) of a Hugging Face model
    directory. The config is `own` (dropout, dtypes, remat, LoRA, output, block_size for rotary
    models...) with the structure of the Hugging Face model and the vocabulary grown by the chat
    tokens the tokenizer appends."""
    hf_cfg = read_hf_config(directory)
    base = model_config_from_hf(hf_cfg, own.block_size)
    eos = hf_cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    tokenizer = ImportedTokenizer.from_hf(directory, base.vocab_size, eos, hf_cfg.get("pad_token_id"))
    structural = (
        "recipe",
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
        "norm_eps",
        "rope_theta",
    )
    model_cfg = dataclasses.replace(
        own,
        vocab_size=tokenizer.vocab_size,
        vocab_multiple=1,
        valid_vocab=0,
        **{k: getattr(base, k) for k in structural},
    ).resolved()
    return model_cfg, tokenizer, base.vocab_size
