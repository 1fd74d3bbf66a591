"""Hugging Face interoperability: GPT-2 (`GPT2LMHeadModel`) and the rotary families (Llama with
its rope scaling, Qwen2, Qwen3, Mistral, Gemma, Gemma 2: see `SUPPORTED`), weights and configs
in the Hugging Face layout (`config.json` + `*.safetensors`, one file or sharded with
`model.safetensors.index.json`), to and from flaxgpt parameters, and LoRA adapters in PEFT's
format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

One table per family lists which Hugging Face tensor feeds which flaxgpt parameter and how it is
laid out (torch `Linear` [out, in], GPT-2's `Conv1D` [in, out], or as is); import and export both
read it, so they cannot disagree. Safetensors files are read and written with the safetensors
library (the format's reference implementation, numpy API: no torch in the core install),
lazily through memory maps, one tensor at a time, and each parameter goes straight onto its
shards of the mesh (`jax.make_array_from_callback`): no device ever holds more than its own
shards.

Nothing in a model directory is trusted: config.json's fields are typed and bounded
(`HF_LIMITS`), every safetensors header is checked against its file (offsets inside the data,
byte counts matching shapes and dtypes), every tensor the model needs is checked against the
config on the headers alone, and every file read resolves inside the directory
(`flaxgpt.modeldir.inside`). Each problem is an `HFFormatError` naming the file and the field,
raised before any parameter is allocated.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy

from flaxgpt.checkpoint import MEANING_FIELDS, STRUCTURAL_FIELDS
from flaxgpt.config import LORA_TARGETS, ModelConfig
from flaxgpt.data.tokenizers import ImportedTokenizer
from flaxgpt.lora import LORA_SETTINGS
from flaxgpt.model import layer_windows
from flaxgpt.modeldir import HFFormatError, inside, read_json, require_directory

SUPPORTED = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}
# The dtypes flaxgpt reads (safetensors' names): every one numpy holds, bfloat16 through
# ml_dtypes, which safetensors' numpy API uses for it. Others (float8, complex...) are refused
# by name before any tensor is read.
_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")

# Upper bounds of config.json sizes, so that a lying config fails at once instead of building a
# model for minutes: each is several times the largest public model of the family (Llama 3.1
# 405B: 126 layers, hidden 16384, intermediate 53248, 128 heads; vocabularies up to ~256k;
# contexts up to 128k, while rotary models cap theirs at model.block_size anyway). The
# weights themselves are then checked tensor by tensor against the safetensors headers, which
# bounds everything by the files on disk before a single parameter is allocated.
HF_LIMITS = {
    "vocab_size": 2**22,
    "n_layer": 1024,
    "n_head": 1024,
    "d_model": 2**17,
    "d_ff": 2**19,
    "head_dim": 2**12,
    "context": 2**24,
}


# ----------------------------------------------------------------------------- safetensors


class SafetensorsReader:
    """Every tensor of a Hugging Face directory, by name, read lazily (one tensor at a time)
    through the safetensors library, which validates each header against its file (offsets
    inside the data, byte counts matching shapes and dtypes, no overlaps) when it is opened."""

    def __init__(self, directory: str):
        self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        self._files: dict[str, Any] = {}
        for file in _weight_files(directory):
            handle = _open_safetensors(file)
            self._files[file] = handle
            for name in handle.keys():
                if name in self.entries:
                    raise HFFormatError(f"{file}: tensor {name} is also in {self.entries[name][0]}")
                part = handle.get_slice(name)
                if part.get_dtype() not in _DTYPES:
                    raise HFFormatError(
                        f"{file}: tensor {name}: dtype {part.get_dtype()!r}, which flaxgpt does not read "
                        f"(it reads {sorted(_DTYPES)})"
                    )
                self.entries[name] = (file, part.get_dtype(), tuple(part.get_shape()))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str) -> np.ndarray:
        return self._files[self.entries[name][0]].get_tensor(name)


def _weight_files(directory: str) -> list[str]:
    """The safetensors files of a model directory: those its index names, else every
    *.safetensors in it, each resolved inside the directory."""
    require_directory(directory)
    index_file = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_file):
        index = read_json(inside(directory, "model.safetensors.index.json", index_file))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFormatError(f"{index_file}: weight_map is missing or empty (expected tensor name -> file)")
        bad = next((v for v in weight_map.values() if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise HFFormatError(f"{index_file}: weight_map maps a tensor to {str(bad)[:100]!r} (expected a file name)")
        names = sorted(set(weight_map.values()))
        files = [inside(directory, name, f"{index_file}: weight_map") for name in names]
        for name, file in zip(names, files):
            if not os.path.isfile(file):
                raise HFFormatError(f"{index_file}: weight_map names {name!r}, which is not a file in {directory}")
        return files
    files = [
        inside(directory, os.path.basename(f), f)
        for f in sorted(glob.glob(os.path.join(glob.escape(directory), "*.safetensors")))
    ]
    if not files:
        pickles = sorted(os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(directory), "*.bin")))
        found = f"only {pickles[0]}, a pickle that could run any code when loaded: it is not read" if pickles else ""
        raise HFFormatError(
            f"{directory} holds no *.safetensors weights{' (' + found + ')' if found else ''}; convert it "
            "where you trust it with transformers' save_pretrained(..., safe_serialization=True)"
        )
    return files


def _open_safetensors(file: str) -> Any:
    """safe_open of one file (numpy, memory-mapped), its validation errors as one line naming
    the file."""
    if os.path.isdir(file):
        raise HFFormatError(f"{file}: is a directory, expected a safetensors file")
    try:
        return safetensors.safe_open(file, framework="numpy")
    except safetensors.SafetensorError as e:
        detail = str(e).removeprefix("Error while deserializing header: ")
        raise HFFormatError(f"{file}: not a valid safetensors file: {detail}") from None
    except OSError as e:
        raise HFFormatError(f"{file}: cannot be read ({e.strerror or e})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file (the library's numpy writer, bfloat16 included), written under a
    temporary name and renamed: never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        safetensors.numpy.save_file(
            {name: np.ascontiguousarray(value) for name, value in tensors.items()}, tmp, metadata={"format": "pt"}
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- configs


def read_hf_config(directory: str) -> dict:
    require_directory(directory)
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        raise HFFormatError(f"{directory} has no config.json: is it a Hugging Face model directory?")
    return read_json(inside(directory, "config.json", config_file))


def family(hf: dict) -> str:
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    for arch in architectures:
        if isinstance(arch, str) and arch in SUPPORTED:
            return SUPPORTED[arch]
    raise HFFormatError(
        f"unsupported architecture {architectures or hf.get('model_type')!r}; flaxgpt imports {sorted(SUPPORTED)}"
    )


def _require(hf: dict, key: str, allowed: tuple, default: Any, where: str = "config.json") -> None:
    value = hf.get(key, default)
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise HFFormatError(f"{where}: {key}={value!r} is not supported (supported: {list(allowed)})")


class _Fields:
    """Typed, range-checked reads of a config.json: every error names the file and the key."""

    def __init__(self, hf: dict, where: str):
        self.hf, self.where = hf, where

    def _error(self, key: str, value: Any, expected: str) -> HFFormatError:
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        return HFFormatError(f"{self.where}: {key}={shown} is not {expected}")

    def integer(self, key: str, low: int, high: int, default: Any = None) -> int:
        if key not in self.hf or self.hf[key] is None:
            if default is None:
                raise HFFormatError(f"{self.where}: {key} is missing (expected an integer in [{low}, {high}])")
            return default
        value = self.hf[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not _is_int(value) or not low <= value <= high:
            raise self._error(key, self.hf[key], f"an integer in [{low}, {high}]")
        return value

    def number(self, key: str, low: float, high: float, default: float) -> float:
        value = self.hf.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            raise self._error(key, value, f"a number in ({low}, {high})")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.hf.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._error(key, value, "true or false")
        return value

    def token_id(self, key: str, vocab: int) -> int | None:
        """An optional token id (or the first of a list, as transformers allows)."""
        value = self.hf.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if value is None or value == []:
            return None
        if not _is_int(value) or not 0 <= value < vocab:
            raise self._error(key, self.hf[key], f"a token id in [0, {vocab})")
        return value


def model_config_from_hf(hf: dict, block_size: int | None = None, where: str = "config.json") -> ModelConfig:
    """The flaxgpt model of a Hugging Face config (vocabulary as the checkpoint has it), every
    size checked against `HF_LIMITS`. `block_size` caps the context of rotary models (Llama's
    max_position_embeddings is often far longer than a fine-tuning run needs); learned
    positions always keep theirs."""
    if not isinstance(hf, dict):
        raise HFFormatError(f"{where}: expected a JSON object")
    kind = family(hf)
    f, L = _Fields(hf, where), HF_LIMITS
    vocab = f.integer("vocab_size", 1, L["vocab_size"])
    if kind == "gpt2":
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new", where)
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False, where)
        _require(hf, "scale_attn_weights", (True,), True, where)
        d_model = f.integer("n_embd", 1, L["d_model"])
        n_head = f.integer("n_head", 1, L["n_head"])
        if d_model % n_head:
            raise HFFormatError(f"{where}: n_embd={d_model} is not a multiple of n_head={n_head}")
        return ModelConfig(
            recipe="gpt2",
            vocab_size=vocab,
            block_size=f.integer("n_positions", 1, L["context"]),
            n_layer=f.integer("n_layer", 1, L["n_layer"]),
            n_head=n_head,
            d_model=d_model,
            d_ff=f.integer("n_inner", 1, L["d_ff"], 4 * d_model),
            norm_eps=f.number("layer_norm_epsilon", 0.0, 1.0, 1e-5),
            tie_embeddings=f.flag("tie_word_embeddings", True),
        ).resolved()
    if kind == "qwen2":  # q/k/v biases only
        use_bias, qkv_bias = False, True
    else:
        use_bias = f.flag("attention_bias", False)
        if kind == "llama" and use_bias != f.flag("mlp_bias", False):
            raise HFFormatError(f"{where}: attention_bias and mlp_bias differ; flaxgpt's use_bias covers both")
        if kind != "llama" and use_bias:
            raise HFFormatError(f"{where}: attention_bias=true is not supported for {kind} (no MLP biases)")
        qkv_bias = use_bias
    n_head = f.integer("num_attention_heads", 1, L["n_head"])
    n_kv = f.integer("num_key_value_heads", 1, n_head, n_head)
    if n_head % n_kv:
        raise HFFormatError(f"{where}: num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_kv}")
    d_model = f.integer("hidden_size", 1, L["d_model"])
    if "head_dim" not in hf and d_model % n_head:
        raise HFFormatError(f"{where}: hidden_size={d_model} is not a multiple of num_attention_heads={n_head}")
    context = f.integer("max_position_embeddings", 1, L["context"], 2048)
    n_layer = f.integer("num_hidden_layers", 1, L["n_layer"])
    head_dim = f.integer("head_dim", 1, L["head_dim"], max(d_model // n_head, 1))
    return ModelConfig(
        recipe="llama",
        vocab_size=vocab,
        block_size=min(context, block_size or context),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_heads=n_kv,
        d_model=d_model,
        head_dim=head_dim,
        d_ff=f.integer("intermediate_size", 1, L["d_ff"]),
        norm_eps=f.number("rms_norm_eps", 0.0, 1.0, 1e-6),
        use_bias=use_bias,
        qkv_bias=qkv_bias,
        qk_norm=kind == "qwen3",
        tie_embeddings=f.flag("tie_word_embeddings", kind.startswith("gemma")),
        **_rope_fields(hf, where, context),
        **_window_fields(hf, kind, n_layer, where),
        **_gemma_fields(hf, kind, head_dim, where),
    ).resolved()


def _window_fields(hf: dict, kind: str, n_layer: int, where: str) -> dict:
    """sliding_window and global_every: Mistral's window on every layer, or `layer_types` whose
    full-attention layers are every k-th (Gemma 2: sliding, full, sliding, ...)."""
    f = _Fields(hf, where)
    if kind == "mistral":
        return {"sliding_window": f.integer("sliding_window", 1, HF_LIMITS["context"], 0)}
    types = hf.get("layer_types")
    if types is None:
        if hf.get("use_sliding_window"):
            raise HFFormatError(f"{where}: use_sliding_window=true without layer_types is not supported")
        return {}
    if not isinstance(types, list) or len(types) != n_layer:
        raise HFFormatError(f"{where}: layer_types is not a list of num_hidden_layers={n_layer} names")
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        raise HFFormatError(f"{where}: layer_types {types!r} has names other than full_attention, sliding_attention")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if len(full) == n_layer:
        return {}
    every = full[0] + 1 if full else 0
    if full != [i for i in range(n_layer) if every and i % every == every - 1]:
        raise HFFormatError(f"{where}: layer_types {types!r}: flaxgpt's global layers are every k-th one")
    return {"sliding_window": f.integer("sliding_window", 1, HF_LIMITS["context"]), "global_every": every}


def _gemma_fields(hf: dict, kind: str, head_dim: int, where: str) -> dict:
    """The activation, and Gemma's (1 + w) norms, embedding scale, GeGLU and (Gemma 2)
    post-branch norms, soft-capping and query scale."""
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if not kind.startswith("gemma"):
        _require({"hidden_act": act}, "hidden_act", ("silu",), "silu", where)
        return {}
    _require({"hidden_activation": act}, "hidden_activation", ("gelu_pytorch_tanh",), None, where)
    out: dict[str, Any] = dict(mlp="geglu", norm_plus_one=True, embed_scale=True)
    if kind == "gemma2":
        f = _Fields(hf, where)
        out.update(
            post_norms=True,
            attn_softcap=f.number("attn_logit_softcapping", 0.0, 1e6, 0.0),
            logit_softcap=f.number("final_logit_softcapping", 0.0, 1e6, 0.0),
            query_pre_attn_scalar=f.integer("query_pre_attn_scalar", 1, 2**20, head_dim),
        )
    return out


def _rope_fields(hf: dict, where: str, context: int) -> dict:
    """rope_theta and rope scaling of a config.json. `dynamic` (NTK) scaling changes nothing
    within max_position_embeddings, which caps a rotary model's block_size: it imports as plain."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise HFFormatError(f"{where}: rope_scaling={rope!r} is not an object")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    out = {"rope_theta": _Fields({"rope_theta": theta}, where).number("rope_theta", 0.0, float("inf"), 10000.0)}
    kind = rope.get("rope_type", rope.get("type", "default"))
    f = _Fields(rope, f"{where}: rope_scaling")
    _require(rope, "partial_rotary_factor", (1.0, 1), 1.0, f"{where}: rope_scaling")
    if kind in ("default", "dynamic"):
        return out
    if kind not in ("linear", "llama3", "yarn"):
        raise HFFormatError(f"{where}: rope_type={kind!r} is not supported (default, linear, llama3, dynamic, yarn)")
    original = f.integer("original_max_position_embeddings", 1, HF_LIMITS["context"], context)
    # YaRN without a factor stretches the original context to max_position_embeddings (DeepSeek-V3)
    default = context / original if kind == "yarn" else 1.0
    out.update(rope_scaling=kind, rope_factor=f.number("factor", 0.0, 1e6, default))
    if kind != "linear":
        out["rope_original_context"] = original
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=f.number("low_freq_factor", 0.0, 1e6, 1.0),
            rope_high_freq_factor=f.number("high_freq_factor", 0.0, 1e6, 4.0),
        )
    if kind == "yarn":
        out.update(_yarn_fields(rope, f, out["rope_factor"]))
    return out


def _yarn_fields(rope: dict, f: _Fields, factor: float) -> dict:
    """YaRN's ramp bounds and attention factor (given, or from mscale / mscale_all_dim as
    transformers derives it)."""
    _require(rope, "truncate", (True,), True, f.where)

    def mscale(scale: float) -> float:
        return 0.1 * scale * math.log(factor) + 1.0 if factor > 1 else 1.0

    attention = f.number("attention_factor", 0.0, 1e6, 0.0)
    m, m_all = f.number("mscale", 0.0, 1e6, 0.0), f.number("mscale_all_dim", 0.0, 1e6, 0.0)
    if not attention and m and m_all:
        attention = mscale(m) / mscale(m_all)
    return dict(
        rope_beta_fast=f.number("beta_fast", 0.0, 1e6, 32.0),
        rope_beta_slow=f.number("beta_slow", 0.0, 1e6, 1.0),
        rope_attention_factor=attention,
    )


def hf_config_from_model(cfg: ModelConfig, eos_id: int, pad_id: int) -> dict:
    """config.json for an export; the model must be exactly one of the two families."""
    cfg = cfg.resolved()
    expect = {
        "gpt2": dict(
            position="learned",
            norm="layernorm",
            mlp="gelu",
            use_bias=True,
            qkv_bias=True,
            tie_embeddings=True,
            qk_norm=False,
            sliding_window=0,
        ),
        "llama": dict(position="rope", norm="rmsnorm"),
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
    arch, extra = _rotary_architecture(cfg)
    return {
        "architectures": [arch],
        "model_type": arch.removesuffix("ForCausalLM").lower(),
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_parameters(cfg),
        "max_position_embeddings": cfg.block_size,
        **extra,
        **common,
    }


def _rotary_architecture(cfg: ModelConfig) -> tuple[str, dict]:
    """The Hugging Face architecture of a rotary model (Qwen3: q/k norm; Qwen2: q/k/v biases
    only; Mistral: a sliding window; Gemma; Llama otherwise) and its own config keys."""
    gemma = (cfg.mlp == "geglu", cfg.norm_plus_one, cfg.embed_scale, cfg.post_norms)
    if any(gemma) or cfg.attn_softcap or cfg.logit_softcap or cfg.query_pre_attn_scalar or cfg.global_every:
        return _gemma_architecture(cfg)
    silu = {"hidden_act": "silu"}
    if cfg.qk_norm or (cfg.qkv_bias and not cfg.use_bias) or cfg.sliding_window:
        if cfg.use_bias or (cfg.qk_norm and cfg.qkv_bias) or (cfg.qkv_bias and cfg.sliding_window):
            raise HFFormatError(
                "this model has no Hugging Face counterpart: model.qk_norm, model.qkv_bias, model.use_bias and "
                "model.sliding_window combine as Qwen3 (qk_norm only), Qwen2 (qkv_bias only) or Mistral "
                "(sliding_window only)"
            )
        if cfg.qk_norm:
            return "Qwen3ForCausalLM", {"attention_bias": False, "sliding_window": cfg.sliding_window or None, **silu}
        if cfg.qkv_bias:
            return "Qwen2ForCausalLM", silu
        return "MistralForCausalLM", {"sliding_window": cfg.sliding_window, **silu}
    return "LlamaForCausalLM", {"attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, **silu}


def _gemma_architecture(cfg: ModelConfig) -> tuple[str, dict]:
    """Gemma (GeGLU, (1 + w) norms, scaled embeddings, no biases) or, with post_norms, Gemma 2."""
    base = cfg.mlp == "geglu" and cfg.norm_plus_one and cfg.embed_scale and not (cfg.qkv_bias or cfg.qk_norm)
    gemma2_only = cfg.attn_softcap or cfg.logit_softcap or cfg.sliding_window or cfg.global_every
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    if not base or (not cfg.post_norms and (gemma2_only or scalar != cfg.head_dim)):
        raise HFFormatError(
            "this model has no Hugging Face counterpart: Gemma needs model.mlp='geglu', norm_plus_one and "
            "embed_scale without biases or qk_norm; soft-capping, query_pre_attn_scalar and sliding windows "
            "need Gemma 2's post_norms"
        )
    act = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
    if not cfg.post_norms:
        return "GemmaForCausalLM", act
    return "Gemma2ForCausalLM", {
        **act,
        "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": cfg.attn_softcap or None,
        "final_logit_softcapping": cfg.logit_softcap or None,
        "sliding_window": cfg.sliding_window or cfg.block_size,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in layer_windows(cfg)],
    }


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor}
    if cfg.rope_scaling != "linear":
        out["original_max_position_embeddings"] = cfg.rope_original_context
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_scaling == "yarn":
        out.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor:
            out["attention_factor"] = cfg.rope_attention_factor
    return out


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
            if cfg.qkv_bias if ours in ("attn.query", "attn.key", "attn.value") else cfg.use_bias:
                entries.append(Entry(o + ours + ".bias", h + theirs + ".bias", n_in=0))
        if cfg.qk_norm:
            entries += [
                Entry(o + "attn.query_norm.scale", h + "self_attn.q_norm.weight", n_in=0),
                Entry(o + "attn.key_norm.scale", h + "self_attn.k_norm.weight", n_in=0),
            ]
        norms = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
        if cfg.post_norms:  # Gemma 2: a norm before and after each branch
            norms = [
                ("attn_norm", "input_layernorm"),
                ("attn_post_norm", "post_attention_layernorm"),
                ("mlp_norm", "pre_feedforward_layernorm"),
                ("mlp_post_norm", "post_feedforward_layernorm"),
            ]
        entries += [Entry(o + f"{ours}.scale", h + f"{theirs}.weight", n_in=0) for ours, theirs in norms]
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


def _flatten(params: dict) -> dict[str, np.ndarray]:
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(params)
    }


def export_tensors(params: dict, cfg: ModelConfig, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Hugging Face tensors of (host, unrolled-layer, LoRA-merged) flaxgpt parameters."""
    flat = _flatten(params)
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


def export_adapter(params: dict, cfg: ModelConfig, dtype: Any = np.float32) -> tuple[dict[str, np.ndarray], dict]:
    """(adapter_model.safetensors tensors, adapter_config.json) in PEFT's LoRA format, from the
    (host, unrolled-layer, unmerged) parameters of a LoRA model of a rotary family: PEFT's
    lora_A is our A transposed [rank, in], lora_B our B transposed [out, rank], and its
    scaling lora_alpha / r is ours."""
    if cfg.recipe != "llama" or not cfg.lora_rank:
        raise HFFormatError(
            "a PEFT adapter is exported from a LoRA run (model.lora_rank > 0) of a rotary family "
            f"(model.recipe='llama'); this one has recipe={cfg.recipe!r}, lora_rank={cfg.lora_rank}"
        )
    flat, tensors, modules = _flatten(params), {}, set()
    for entry in tensor_table(cfg):
        ours = entry.ours.removesuffix(".kernel")
        if f"{ours}.lora_a" not in flat:
            continue
        theirs = "base_model.model." + entry.hf.removesuffix(".weight")
        a = flat[f"{ours}.lora_a"].astype(np.float32).reshape(-1, cfg.lora_rank)
        b = flat[f"{ours}.lora_b"].astype(np.float32).reshape(cfg.lora_rank, -1)
        tensors[f"{theirs}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
        tensors[f"{theirs}.lora_B.weight"] = np.ascontiguousarray(b.T).astype(dtype)
        modules.add(theirs.rsplit(".", 1)[1])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return tensors, config


# ----------------------------------------------------------------------------- onto the mesh


def _keystr(dotted: str) -> str:
    return "".join(f"['{k}']" for k in dotted.split("."))


def hf_leaf_sources(directory: str, cfg: ModelConfig, hf_vocab: int) -> dict[str, Callable[[tuple], np.ndarray]]:
    """keystr of each flaxgpt parameter the checkpoint provides -> (shape -> host value). With
    scanned layers, the per-layer tensors are stacked on a leading axis."""
    reader = SafetensorsReader(directory)
    loaders = {
        entry.ours: lambda shape, e=entry: import_leaf(reader, e, shape, hf_vocab, directory)
        for entry in tensor_table(cfg, set(reader.entries))
    }
    return _stacked_sources(loaders, cfg)


def _stacked_sources(
    loaders: dict[str, Callable[[tuple], np.ndarray]], cfg: ModelConfig
) -> dict[str, Callable[[tuple], np.ndarray]]:
    """Loaders of unrolled-layer parameters (dotted names) as keystr -> loader of the model's
    own tree: with scanned layers, each layer's loads stacked on a leading axis."""
    sources: dict[str, Callable[[tuple], np.ndarray]] = {}
    by_stacked: dict[str, list[Callable[[tuple], np.ndarray]]] = {}
    for ours, load in loaders.items():
        if cfg.scan_layers and ours.startswith("layers_"):
            by_stacked.setdefault("layers." + ours.split(".", 1)[1], []).append(load)
        else:
            sources[_keystr(ours)] = load
    for stacked, layer_loads in by_stacked.items():
        sources[_keystr(stacked)] = lambda shape, ls=layer_loads: np.stack([load(shape[1:]) for load in ls])
    return sources


# PEFT adapter_config.json settings flaxgpt's LoRA has no counterpart for, and their only accepted value
_PEFT_FIXED = {
    "peft_type": ("LORA",),
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "use_rslora": (False,),
    "use_dora": (False,),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "rank_pattern": ({},),
    "alpha_pattern": ({},),
}


def adapter_settings(directory: str, cfg: ModelConfig) -> dict:
    """flaxgpt's LoRA settings (lora_rank, lora_alpha, lora_targets, lora_dropout) of a PEFT
    adapter directory for a model of `cfg`'s family; HFFormatError naming the key for what
    flaxgpt's LoRA cannot hold (DoRA, rsLoRA, per-module ranks, other target modules...)."""
    where = os.path.join(directory, "adapter_config.json")
    if not os.path.exists(where):
        raise HFFormatError(f"{directory} has no adapter_config.json: is it a PEFT adapter directory?")
    config = read_json(inside(directory, "adapter_config.json", where))
    for key, allowed in _PEFT_FIXED.items():
        value = config.get(key, allowed[0])
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise HFFormatError(f"{where}: {key}={value!r} is not supported (flaxgpt's LoRA: {allowed[0]!r})")
    f = _Fields(config, where)
    targets = config.get("target_modules")
    names = _adapter_modules(cfg)
    if not isinstance(targets, list) or not targets or not set(targets) <= set(names):
        raise HFFormatError(f"{where}: target_modules={targets!r} is not a list of some of {sorted(names)}")
    ours = {names[t] for t in targets}
    return dict(
        lora_rank=f.integer("r", 1, 2**16),
        lora_alpha=f.number("lora_alpha", 0.0, 1e9, 8.0),
        lora_targets=tuple(t for t in LORA_TARGETS if t in ours),
        lora_dropout=f.number("lora_dropout", -1e-9, 1.0, 0.0),
    )


def _adapter_modules(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face module name (q_proj...) -> flaxgpt LoRA target (query...) of a rotary family."""
    if cfg.recipe != "llama":
        raise HFFormatError(
            f"PEFT adapters are read for the rotary families (model.recipe='llama'), not {cfg.recipe!r}"
        )
    table = tensor_table(dataclasses.replace(cfg, n_layer=1))
    return {
        e.hf.split(".")[-2]: e.ours.split(".")[-2]
        for e in table
        if e.ours.endswith(".kernel") and e.ours.startswith("layers_")
    }


def adapter_leaf_sources(directory: str, cfg: ModelConfig) -> dict[str, Callable[[tuple], np.ndarray]]:
    """keystr of each adapter leaf (lora_a, lora_b) of a LoRA model `cfg` -> (shape -> host
    value) from a PEFT adapter_model.safetensors; every tensor checked for name and shape
    first, and a tensor flaxgpt would not read (an adapter on another module) refused."""
    reader = SafetensorsReader(directory)
    loaders: dict[str, Callable[[tuple], np.ndarray]] = {}
    expected = set()
    for entry in tensor_table(cfg):
        module = entry.ours.removesuffix(".kernel")
        if module.split(".")[-1] not in cfg.lora_targets or not entry.ours.endswith(".kernel"):
            continue
        theirs = "base_model.model." + entry.hf.removesuffix(".weight")
        for ours_leaf, suffix in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            name = f"{theirs}.{suffix}.weight"
            expected.add(name)
            if name not in reader:
                raise HFFormatError(f"{directory}: tensor {name} is missing (flaxgpt parameter {module}.{ours_leaf})")
            loaders[f"{module}.{ours_leaf}"] = lambda shape, n=name, a=ours_leaf: _adapter_leaf(reader, n, a, shape)
    extra = sorted(set(reader.entries) - expected)
    if extra:
        raise HFFormatError(f"{directory}: tensor {extra[0]} is not an adapter flaxgpt's LoRA holds")
    return _stacked_sources(loaders, cfg)


def _adapter_leaf(reader: SafetensorsReader, name: str, leaf: str, shape: tuple) -> np.ndarray:
    """PEFT's lora_A [rank, in] / lora_B [out, rank] as our lora_a [in.., rank] / lora_b [rank, out..]."""
    value = reader.read(name).astype(np.float32).T
    want = (math.prod(shape[:-1]), shape[-1]) if leaf == "lora_a" else (shape[0], math.prod(shape[1:]))
    if value.shape != want:
        raise HFFormatError(f"{name}: shape {reader.shape(name)} does not fit flaxgpt's {leaf} {tuple(shape)}")
    return value.reshape(shape)


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


def hf_tensor_shapes(cfg: ModelConfig, hf_vocab: int, hf_names: set | None = None) -> dict[str, tuple[Entry, tuple]]:
    """Hugging Face tensor name -> (the first table entry it feeds, the shape it must have), from
    the config alone: what the safetensors headers are checked against before anything is built."""
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
    q, kv = cfg.n_head * hd, cfg.n_kv_heads * hd
    if cfg.recipe == "gpt2":  # Conv1D: [in, out]
        by_suffix = {
            "wte.weight": (hf_vocab, d),
            "wpe.weight": (cfg.block_size, d),
            "attn.c_attn.weight": (d, 3 * q),
            "attn.c_attn.bias": (3 * q,),
            "attn.c_proj.weight": (q, d),
            "mlp.c_fc.weight": (d, ff),
            "mlp.c_fc.bias": (ff,),
            "mlp.c_proj.weight": (ff, d),
        }
    else:  # torch Linear: [out, in]
        by_suffix = {
            "embed_tokens.weight": (hf_vocab, d),
            "lm_head.weight": (hf_vocab, d),
            "q_proj.weight": (q, d),
            "q_proj.bias": (q,),
            "k_proj.weight": (kv, d),
            "k_proj.bias": (kv,),
            "v_proj.weight": (kv, d),
            "v_proj.bias": (kv,),
            "o_proj.weight": (d, q),
            "gate_proj.weight": (ff, d),
            "gate_proj.bias": (ff,),
            "up_proj.weight": (ff, d),
            "up_proj.bias": (ff,),
            "down_proj.weight": (d, ff),
            "q_norm.weight": (hd,),
            "k_norm.weight": (hd,),
        }
    out: dict[str, tuple[Entry, tuple]] = {}
    for entry in tensor_table(cfg, hf_names):
        if entry.hf not in out:
            suffix = next((k for k in by_suffix if entry.hf == k or entry.hf.endswith("." + k)), None)
            out[entry.hf] = (entry, by_suffix[suffix] if suffix else (d,))  # the rest: norms and biases of d
    return out


def check_tensors(directory: str, cfg: ModelConfig, hf_vocab: int) -> SafetensorsReader:
    """Every tensor the model needs is in the checkpoint with the shape its config implies:
    checked on the headers alone, before any parameter is allocated or any file is written."""
    reader = SafetensorsReader(directory)
    for name, (entry, expected) in hf_tensor_shapes(cfg, hf_vocab, set(reader.entries)).items():
        if name not in reader:
            raise HFFormatError(f"{directory}: tensor {name} is missing (it feeds flaxgpt parameter {entry.ours})")
        if reader.shape(name) != tuple(expected):
            raise HFFormatError(
                f"{directory}: tensor {name} has shape {reader.shape(name)}, expected {tuple(expected)} "
                f"(from config.json, for flaxgpt parameter {entry.ours})"
            )
    return reader


def import_model(directory: str, own: ModelConfig) -> tuple[ModelConfig, ImportedTokenizer, int]:
    """(model config, tokenizer, the checkpoint's own vocabulary size) of a Hugging Face model
    directory. The config is `own` (dropout, dtypes, remat, LoRA, output, block_size for rotary
    models...) with the structure of the Hugging Face model and the vocabulary grown by the chat
    tokens the tokenizer appends. The whole directory is checked first (config.json's fields and
    sizes, every safetensors header against them, the tokenizer): any problem is an
    HFFormatError before anything large is allocated."""
    hf_cfg = read_hf_config(directory)
    where = os.path.join(directory, "config.json")
    base = model_config_from_hf(hf_cfg, own.block_size, where)
    fields = _Fields(hf_cfg, where)
    eos = fields.token_id("eos_token_id", base.vocab_size)
    pad = fields.token_id("pad_token_id", base.vocab_size)
    check_tensors(directory, base, base.vocab_size)
    tokenizer = ImportedTokenizer.from_hf(directory, base.vocab_size, eos, pad)
    # the Hugging Face model's structure and meaning; vocabulary, dtypes, scan, output and LoRA stay own's
    own_fields = ("vocab_size", "scan_layers", "param_dtype", "output") + LORA_SETTINGS
    structural = [f for f in STRUCTURAL_FIELDS + MEANING_FIELDS if f not in own_fields]
    model_cfg = dataclasses.replace(
        own,
        vocab_size=tokenizer.vocab_size,
        vocab_multiple=1,
        valid_vocab=0,
        **{k: getattr(base, k) for k in structural},
    ).resolved()
    return model_cfg, tokenizer, base.vocab_size
