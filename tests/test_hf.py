"""Hugging Face import/export against `transformers` itself (the independent implementation), and LoRA.

Small random GPT-2 and Llama models are built on the CPU by transformers, saved in the Hugging
Face layout, imported, run by flaxgpt, exported, and reloaded by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

from flaxgpt import hf, lora, runs  # noqa: E402
from flaxgpt.config import ConfigError, OptimizerConfig  # noqa: E402
from flaxgpt.convert import export_hf, export_peft_adapter, import_hf  # noqa: E402
from flaxgpt.model import Transformer  # noqa: E402
from flaxgpt.optim import build_optimizer  # noqa: E402
from tests import hf_fixtures  # noqa: E402
from tests.conftest import REPO, run_cli  # noqa: E402
from tests.test_lora_checkpoint import stored_base  # noqa: E402

PROMPT = "What is two plus three? Five. The cat"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {"gpt2": hf_fixtures.gpt2_dir(str(root / "gpt2")), "llama": hf_fixtures.llama_dir(str(root / "llama"))}


@pytest.fixture(scope="module")
def imported(models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, directory in models.items():
        runs[name] = str(root / name)
        import_hf(directory, runs[name])
    return runs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_matches_transformers_logits_and_greedy_decoding(family, models, imported):
    loaded = runs.load(imported[family])
    ids = loaded.tokenizer.encode(PROMPT)
    theirs = hf_fixtures.hf_logits(models[family], ids)
    ours = hf_fixtures.flaxgpt_logits(loaded, ids)
    # the import appends flaxgpt's chat tokens after the model's vocabulary
    assert ours.shape[1] == theirs.shape[1] + 6
    assert np.abs(ours[:, : theirs.shape[1]] - theirs).max() <= 1e-4
    assert hf_fixtures.flaxgpt_greedy(loaded, ids, 10) == hf_fixtures.hf_greedy(models[family], ids, 10)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_reloads_in_transformers_with_the_same_logits_and_tokens(family, imported, tmp_path):
    out = str(tmp_path / "export")
    export_hf(imported[family], out)
    loaded = runs.load(imported[family])
    ids = loaded.tokenizer.encode(PROMPT)
    np.testing.assert_allclose(hf_fixtures.hf_logits(out, ids), hf_fixtures.flaxgpt_logits(loaded, ids), atol=1e-4)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus three?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|end|><|user|>What is two plus three?<|end|><|assistant|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == loaded.tokenizer.encode(text, allow_special=True)
    assert tok.eos_token_id == loaded.tokenizer.eos_id and tok.pad_token_id == loaded.tokenizer.pad_id


def test_sharded_checkpoint_scanned_layers_and_an_8_device_mesh_give_the_same_logits(models, imported, tmp_path):
    import torch
    import transformers

    sharded = str(tmp_path / "sharded")
    transformers.AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="40KB"
    )
    for name in ("tokenizer.model",):
        with open(os.path.join(models["llama"], name), "rb") as src, open(os.path.join(sharded, name), "wb") as dst:
            dst.write(src.read())
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    reference = runs.load(imported["llama"])
    ids = reference.tokenizer.encode(PROMPT)
    np.save(tmp_path / "reference.npy", hf_fixtures.flaxgpt_logits(reference, ids))
    script = f"""
import numpy as np
from flaxgpt import runs
from flaxgpt.convert import import_hf
import_hf({sharded!r}, {str(tmp_path / "run")!r}, ["model.scan_layers=true", "mesh.fsdp=4", "mesh.tensor=2"])
loaded = runs.load({str(tmp_path / "run")!r})
kernel = loaded.params["layers"]["attn"]["query"]["kernel"]
assert kernel.addressable_shards[0].data.shape == (2, 8, 2, 8), kernel.addressable_shards[0].data.shape
ours = np.asarray(loaded.model.apply({{"params": loaded.params}}, np.array([{ids}])))[0]
assert np.abs(ours - np.load({str(tmp_path / "reference.npy")!r})).max() <= 1e-5
print("ok")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_unsupported_architecture_missing_tensor_and_shape_mismatch_are_named(models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with open(os.path.join(models["gpt2"], "config.json")) as f:
        config = json.load(f)
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(hf.HFFormatError, match="unsupported architecture.*Phi3ForCausalLM"):
        hf.family(hf.read_hf_config(str(broken)))

    reader = hf.SafetensorsReader(models["gpt2"])
    tensors = {name: reader.read(name) for name in reader.entries if name != "transformer.h.1.mlp.c_fc.weight"}
    hf.write_safetensors(str(broken / "model.safetensors"), tensors)
    (broken / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json",):
        with open(os.path.join(models["gpt2"], name), "rb") as src, open(broken / name, "wb") as dst:
            dst.write(src.read())
    with pytest.raises(
        hf.HFFormatError,
        match=r"tensor transformer.h.1.mlp.c_fc.weight is missing \(it feeds "
        r"flaxgpt parameter layers_1.mlp.up.kernel\)",
    ):
        import_hf(str(broken), str(tmp_path / "run1"))

    (broken / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    tensors["transformer.h.1.mlp.c_fc.weight"] = reader.read("transformer.h.1.mlp.c_fc.weight")
    hf.write_safetensors(str(broken / "model.safetensors"), tensors)
    with pytest.raises(
        hf.HFFormatError,
        match=r"transformer.h.0.mlp.c_fc.weight has shape \(32, 128\), "
        r"expected \(32, 64\)",
    ):
        import_hf(str(broken), str(tmp_path / "run2"))
    with pytest.raises(ConfigError, match="not both"):
        from flaxgpt.train import load_experiment

        load_experiment("sft_world", ["train.init_from_hf=/x"])


def test_lora_starts_as_the_base_model_trains_only_adapters_and_merges_exactly(imported, tmp_path):
    loaded = runs.load(imported["llama"])
    base_cfg = loaded.model.cfg
    lora_cfg = base_cfg.__class__(**{**base_cfg.__dict__, "lora_rank": 4, "lora_targets": ("query", "value", "up")})
    model = Transformer(lora_cfg.resolved())
    ids = np.array([loaded.tokenizer.encode(PROMPT)])
    from flaxgpt.sharding import logical_shardings, unbox_shapes

    boxed = runs.boxed_params(model)
    shardings = unbox_shapes(logical_shardings(boxed, loaded.mesh, loaded.rules))
    known = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded.params)}
    params = runs.complete_params(known, model.cfg, shardings, loaded.mesh, loaded.rules, 0)
    np.testing.assert_array_equal(
        model.apply({"params": params}, ids), hf_fixtures.flaxgpt_logits(loaded, ids[0])[None]
    )

    optimizer = build_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1), 10, lora.trainable_mask)
    opt_state = optimizer.init(params)
    moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)  # besides scalar step counts
    adapters = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params) if "lora_" in jax.tree_util.keystr(p))
    assert moments == 2 * adapters  # Adam's two moments, of the adapters alone

    def loss(p):
        logits = model.apply({"params": lora.freeze_base(p)}, ids)
        return -jax.nn.log_softmax(logits)[0, :-1][np.arange(ids.shape[1] - 1), ids[0, 1:]].mean()

    new = params
    for _ in range(3):
        updates, opt_state = optimizer.update(jax.grad(loss)(new), opt_state, new)
        new = jax.tree.map(lambda a, b: a + b, new, updates)
    assert float(loss(new)) < float(loss(params))
    for path, before in jax.tree_util.tree_leaves_with_path(params):
        after = jax.tree_util.tree_leaves_with_path(new)
        changed = not np.array_equal(np.asarray(before), np.asarray(dict(after)[path]))
        assert changed == ("lora_b" in jax.tree_util.keystr(path) or "lora_a" in jax.tree_util.keystr(path)), path

    merged, merged_cfg = lora.merge(new, model.cfg)
    assert merged_cfg.lora_rank == 0 and not any(
        "lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged)
    )
    np.testing.assert_allclose(
        Transformer(merged_cfg).apply({"params": merged}, ids), model.apply({"params": new}, ids), atol=2e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("family,lora_rank", [("gpt2", 0), ("llama", 4)])
def test_imported_model_through_sft_and_ppo_then_exported(family, lora_rank, models, tmp_path):
    workdir = str(tmp_path / "chat")
    result = run_cli(
        "--experiment",
        "hf_chat",
        "--workdir",
        workdir,
        "--set",
        f"sft.train.init_from_hf={models[family]}",
        f"model.lora_rank={lora_rank}",
        "sft.train.max_steps=12",
        "sft.data.world_conversations=200",
        "sft.sft.eval_examples=4",
        "sft.sft.max_new_tokens=8",
        "sft.train.log_interval=2",
        "eval.iters=1",
        "ppo.train.max_steps=2",
        "ppo.train.batch_size=8",
        "ppo.ppo.max_new_tokens=8",
        "ppo.ppo.eval_prompts=4",
        "ppo.ppo.minibatches=2",
        "logging.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "sft", "metrics.jsonl"))]
    assert rows[-1]["loss"] < rows[0]["loss"]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary) == {"sft", "ppo"} and "kl_end" in summary["ppo"]

    sft = runs.load(os.path.join(workdir, "sft"))
    assert sft.model.cfg.lora_rank == lora_rank
    import_hf(models[family], str(tmp_path / "base"))
    base = runs.load(str(tmp_path / "base"))
    query = lambda loaded: np.asarray(loaded.params["layers_0"]["attn"]["query"]["kernel"])
    # with LoRA the base weights stay exactly where the import put them; without, they train
    assert np.array_equal(query(sft), query(base)) == bool(lora_rank)
    if lora_rank:
        assert np.asarray(sft.params["layers_0"]["attn"]["query"]["lora_b"]).any()
        # its checkpoint holds the adapters alone, and names the Hugging Face base they go onto
        step_dir = os.path.join(workdir, "sft", "checkpoints", str(sft.step))
        base_record = json.load(open(os.path.join(step_dir, "record", "metadata")))[lora.BASE_RECORD]
        assert base_record["init_from_hf"] == os.path.abspath(models[family])
        assert stored_base(step_dir) == []
        # the LoRA run's adapters alone, in PEFT's format, onto the base model's export
        adapter, base_hf = str(tmp_path / "adapter"), str(tmp_path / "base_hf")
        export_peft_adapter(os.path.join(workdir, "sft"), adapter)
        export_hf(str(tmp_path / "base"), base_hf)
        ids = sft.tokenizer.encode("<|user|>What is two plus three?<|end|><|assistant|>", allow_special=True)
        theirs = hf_fixtures.peft_logits(base_hf, adapter, ids)
        np.testing.assert_allclose(theirs, hf_fixtures.flaxgpt_logits(sft, ids), atol=1e-4)
        # and the adapter imported back onto the Hugging Face base is the same model again
        import_hf(models[family], str(tmp_path / "again"), peft=adapter)
        again = runs.load(str(tmp_path / "again"))
        np.testing.assert_allclose(hf_fixtures.flaxgpt_logits(again, ids), theirs, atol=1e-4)
    out = str(tmp_path / "export")
    export_hf(os.path.join(workdir, "ppo"), out)
    policy = runs.load(os.path.join(workdir, "ppo"))
    ids = policy.tokenizer.encode("<|user|>What is two plus three?<|end|><|assistant|>", allow_special=True)
    np.testing.assert_allclose(hf_fixtures.hf_logits(out, ids), hf_fixtures.flaxgpt_logits(policy, ids), atol=1e-4)


def test_convert_cli_imports_exports_and_names_bad_input(models, tmp_path):
    def convert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flaxgpt.convert", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )

    run_dir, out = str(tmp_path / "run"), str(tmp_path / "out")
    imported = convert("import", "--hf", models["gpt2"], "--workdir", run_dir)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "(gpt2: 2 layers, d_model 32, vocab 306)" in imported.stdout
    exported = convert("export", "--workdir", run_dir, "--hf", out, "--dtype", "bfloat16")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    refused = convert("import", "--hf", str(broken), "--workdir", str(tmp_path / "never"))
    assert refused.returncode == 2 and "error: unsupported architecture ['BertModel']" in refused.stderr
    assert not os.path.exists(tmp_path / "never" / "checkpoints")


def test_safetensors_files_cross_between_flaxgpt_torch_and_transformers_bfloat16_included(models, tmp_path):
    import shutil

    import ml_dtypes
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    def bits(value) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.view(torch.int16) if value.dtype == torch.bfloat16 else value
            return value.numpy()
        return value.view(np.int16) if value.dtype == ml_dtypes.bfloat16 else value

    rng = np.random.default_rng(0)
    ours = {
        "bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(4,)).astype(np.float16),
        "f32": rng.normal(size=(2, 3)).astype(np.float32),
        "i64": np.arange(5, dtype=np.int64),
    }
    hf.write_safetensors(str(tmp_path / "ours.safetensors"), ours)
    theirs = safetensors.torch.load_file(str(tmp_path / "ours.safetensors"))
    assert theirs["bf16"].dtype == torch.bfloat16 and set(theirs) == set(ours)
    for name, value in ours.items():
        np.testing.assert_array_equal(bits(theirs[name]), bits(value))

    # transformers writes bfloat16 weights; flaxgpt reads the same bits, writes them back, and
    # transformers loads flaxgpt's file as its own
    source = AutoModelForCausalLM.from_pretrained(models["llama"]).to(torch.bfloat16)
    source.save_pretrained(str(tmp_path / "bf16"))
    reader = hf.SafetensorsReader(str(tmp_path / "bf16"))
    state = source.state_dict()
    assert reader.read("lm_head.weight").dtype == ml_dtypes.bfloat16
    for name in reader.entries:
        np.testing.assert_array_equal(bits(reader.read(name)), bits(state[name]))
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(tmp_path / "bf16" / "config.json", again / "config.json")
    hf.write_safetensors(str(again / "model.safetensors"), {name: reader.read(name) for name in reader.entries})
    reloaded = AutoModelForCausalLM.from_pretrained(str(again), dtype=torch.bfloat16).state_dict()
    for name in reader.entries:
        assert torch.equal(reloaded[name], state[name]), name
