"""Each rotary Hugging Face family flaxgpt imports, against transformers itself: Llama 3.x rope
scaling (llama3, linear), Qwen2 (q/k/v biases), Qwen3 (q/k norm), Mistral (sliding window), Gemma
(GeGLU, (1 + w) norms, scaled embeddings) and Gemma 2 (post-branch norms, soft-capping, alternating
local/global layers, query_pre_attn_scalar).

A tiny random model of each is built by the family's own transformers config class, imported,
compared logit for logit, decoded greedily with the KV cache against transformers' `generate`,
exported and reloaded by transformers."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax.core import meta

pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

from flaxgpt import cli, convert, hf, runs  # noqa: E402
from flaxgpt.config import ModelConfig  # noqa: E402
from flaxgpt.convert import export_hf, import_hf  # noqa: E402
from flaxgpt.model import rope_frequencies  # noqa: E402
from flaxgpt.modeldir import HFFormatError  # noqa: E402
from tests import hf_fixtures  # noqa: E402

# long enough that Mistral's window (5) slides during the prompt and the decode
PROMPT = "What is two plus three? Five. The cat sat on the mat. Answer briefly"

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # with head_dim 8, wavelengths are 6.3, 63, 628, 6283: one in the ramp, three scaled
    "original_max_position_embeddings": 16,
}
FAMILIES = {
    "llama3": ("Llama", {"rope_parameters": LLAMA3_ROPE}, dict(rope_scaling="llama3", rope_factor=8.0)),
    "linear": (
        "Llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
        dict(rope_scaling="linear", rope_theta=500.0),
    ),
    "yarn": (  # original context 16 puts the ramp inside head_dim 8's four frequencies
        "Qwen2",
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
        dict(rope_scaling="yarn", rope_factor=4.0),
    ),
    "qwen2": ("Qwen2", {}, dict(qkv_bias=True, use_bias=False)),
    "qwen3": ("Qwen3", {}, dict(qk_norm=True)),
    "mistral": ("Mistral", {"sliding_window": 5}, dict(sliding_window=5)),
    "gemma": ("Gemma", {"hidden_act": "gelu_pytorch_tanh"}, dict(mlp="geglu", norm_plus_one=True, embed_scale=True)),
    "gemma2": (  # layers alternate sliding (window 5) and global; caps small enough to bite
        "Gemma2",
        dict(sliding_window=5, attn_logit_softcapping=1.0, final_logit_softcapping=2.0, query_pre_attn_scalar=12),
        dict(post_norms=True, sliding_window=5, global_every=2, attn_softcap=1.0, query_pre_attn_scalar=12),
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """family -> (Hugging Face directory, imported run)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (family, extra, _) in FAMILIES.items():
        directory = hf_fixtures.llama_dir(str(root / name), family=family, **extra)
        import_hf(directory, str(root / f"{name}-run"))
        out[name] = (directory, str(root / f"{name}-run"))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_imports_decodes_and_exports_like_transformers(name, built, tmp_path):
    directory, run = built[name]
    loaded = runs.load(run)
    for key, value in FAMILIES[name][2].items():  # the family's features reached the model config
        assert getattr(loaded.cfg.model, key) == value, key
    ids = loaded.tokenizer.encode(PROMPT)
    theirs = hf_fixtures.hf_logits(directory, ids)
    ours = hf_fixtures.flaxgpt_logits(loaded, ids)[:, : theirs.shape[1]]
    assert np.abs(ours - theirs).max() <= 1e-4
    assert hf_fixtures.flaxgpt_greedy(loaded, ids, 8) == hf_fixtures.hf_greedy(directory, ids, 8)
    exported = str(tmp_path / "export")
    export_hf(run, exported)
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["architectures"] == [f"{FAMILIES[name][0]}ForCausalLM"]
    np.testing.assert_allclose(hf_fixtures.hf_logits(exported, ids)[:, : theirs.shape[1]], ours, atol=1e-4)


def test_llama3_frequencies_match_transformers():
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, rope_parameters=dict(LLAMA3_ROPE, original_max_position_embeddings=64)
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    ours = rope_frequencies(
        ModelConfig(
            recipe="llama", d_model=64, n_head=2, rope_scaling="llama3", rope_factor=8.0, rope_original_context=64
        ).resolved()
    )
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert not np.allclose(ours, rope_frequencies(ModelConfig(recipe="llama", d_model=64, n_head=2).resolved()))


@pytest.mark.parametrize(
    "rope",
    [
        {"factor": 4.0, "original_max_position_embeddings": 64},
        {
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 16.0,
            "mscale": 0.8,
            "mscale_all_dim": 0.5,
        },
        {"factor": None, "original_max_position_embeddings": 32},  # max_position_embeddings / 32
    ],
)
def test_yarn_frequencies_and_attention_factor_match_transformers(rope):
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from flaxgpt.model import rope_attention_factor

    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **rope},
    }
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"})
    theirs, attention = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
    ours = hf.model_config_from_hf(hf_config)
    np.testing.assert_allclose(rope_frequencies(ours), theirs.numpy(), rtol=1e-6)
    assert rope_attention_factor(ours) == pytest.approx(attention, rel=1e-6) and attention != 1.0
    plain = rope_frequencies(dataclasses.replace(ours, rope_scaling="none"))
    assert not np.allclose(rope_frequencies(ours), plain) and np.isclose(rope_frequencies(ours)[0], plain[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "truncate": False}}, "truncate=False"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window=true without"),
        (
            {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 3, "sliding_window": 4}
            | {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
            "global layers are every k-th",
        ),
        ({"architectures": ["Gemma2ForCausalLM"], "hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ({"architectures": ["MistralForCausalLM"], "attention_bias": True}, "attention_bias=true"),
    ],
)
def test_unsupported_family_settings_are_named(change, message):
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    with pytest.raises(HFFormatError, match=message):
        hf.model_config_from_hf({**base, **change})


def test_lora_adapter_exports_in_peft_format_with_the_same_logits(built, tmp_path):
    """A LoRA model's adapters, exported alone, load through peft onto the base export and give
    flaxgpt's logits; the adapter file holds nothing of the base."""
    pytest.importorskip("peft")
    from flaxgpt.convert import export_peft_adapter, write_peft_adapter
    from flaxgpt.model import Transformer

    _, run = built["qwen2"]
    loaded = runs.load(run)
    cfg = dataclasses.replace(loaded.cfg.model, lora_rank=2, lora_alpha=6.0, lora_targets=("query", "out", "down"))
    model = Transformer(cfg.resolved())
    ids = loaded.tokenizer.encode(PROMPT)
    params = jax.tree.map(np.asarray, meta.unbox(model.init(jax.random.PRNGKey(1), np.array([ids]))["params"]))
    for path, value in jax.tree_util.tree_leaves_with_path(loaded.params):
        node = params
        for key in path[:-1]:
            node = node[key.key]
        node[path[-1].key] = np.asarray(value)
    rng = np.random.default_rng(0)  # non-zero adapters (B starts at 0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: rng.normal(0, 0.2, v.shape).astype(v.dtype) if "lora_b" in jax.tree_util.keystr(p) else v, params
    )
    ours = np.asarray(model.apply({"params": params}, np.array([ids])))[0]

    adapter = str(tmp_path / "adapter")
    config = write_peft_adapter(adapter, params, model.cfg)
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"]
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    base = str(tmp_path / "base")
    export_hf(run, base)
    np.testing.assert_allclose(hf_fixtures.peft_logits(base, adapter, ids), ours, atol=1e-4)
    assert not np.allclose(ours, hf_fixtures.flaxgpt_logits(loaded, ids), atol=1e-3)  # the adapters matter
    with pytest.raises(HFFormatError, match="lora_rank > 0"):
        export_peft_adapter(run, str(tmp_path / "none"))

    # and back: the CLI imports the base with the adapter as a LoRA run with the same logits
    directory, again = built["qwen2"][0], str(tmp_path / "again")
    assert cli.run(convert.main, ["import", "--hf", directory, "--workdir", again, "--peft", adapter]) == 0
    reloaded = runs.load(again)
    assert (reloaded.cfg.model.lora_rank, reloaded.cfg.model.lora_alpha) == (2, 6.0)
    assert reloaded.cfg.model.lora_targets == ("query", "out", "down")
    np.testing.assert_allclose(hf_fixtures.flaxgpt_logits(reloaded, ids), ours, atol=1e-4)
    out = str(tmp_path / "out")  # export --peft writes the same adapter again
    assert cli.run(convert.main, ["export", "--workdir", again, "--peft", out]) == 0
    np.testing.assert_allclose(hf_fixtures.peft_logits(base, out, ids), ours, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules=['q_proj', 'lm_head'] is not a list of some of"),
        ({"target_modules": "q_proj|v_proj"}, "target_modules='q_proj|v_proj'"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"r": 3}, "does not fit flaxgpt's lora_a"),
    ],
)
def test_unsupported_peft_adapters_are_refused_in_one_line(change, message, built, tmp_path, capsys):
    directory = built["qwen2"][0]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rank = 2
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((rank, 32), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, rank), np.float32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": np.zeros((rank, 32), np.float32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": np.zeros((32, rank), np.float32),
    }
    hf.write_safetensors(str(adapter / "adapter_model.safetensors"), tensors)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["q_proj"]} | change
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    argv = ["import", "--hf", directory, "--workdir", str(tmp_path / "run"), "--peft", str(adapter)]
    assert cli.run(convert.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_pytorch_model_bin_is_refused_as_an_unsafe_pickle(built, tmp_path, capsys):
    """A directory with only pytorch_model.bin: one line saying why it is not read, nothing written."""
    import shutil

    directory = tmp_path / "pickled"
    shutil.copytree(built["qwen2"][0], directory)
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            os.remove(directory / name)
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    argv = ["import", "--hf", str(directory), "--workdir", str(tmp_path / "run")]
    assert cli.run(convert.main, argv) == 2
    err = capsys.readouterr().err
    assert "only pytorch_model.bin, a pickle that could run any code" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
