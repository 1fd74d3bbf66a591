"""flaxgpt.compile: ahead-of-time compiles with abstract inputs, for a TPU topology (libtpu, the
`tpu` extra) and for this process's CPU devices (train.compile_only).

The TPU tests compile tiny models for v5e:2x2 only (a few seconds each); the real-scale recipes
are compiled by benchmarks/compile_recipes.py, whose 2-core times (minutes) do not fit the suite.
"""

from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt import cli, lora, train
from flaxgpt import compile as aot
from flaxgpt import config as C
from flaxgpt.model import Transformer, count_params
from flaxgpt.sharding import logical_rules, make_mesh

GiB = 2**30
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for",
)


def tiny_llama(**mesh) -> C.Config:
    return C.Config(
        name="tiny_aot",
        model=C.ModelConfig(
            recipe="llama", vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_heads=2, d_model=128
        ),
        mesh=C.MeshConfig(**mesh),
        train=C.TrainConfig(batch_size=8),
    ).validate()


def n_params(cfg: C.Config) -> int:
    m = cfg.model.resolved()
    kv = m.n_kv_heads * m.head_dim
    layer = m.d_model * (m.n_head * m.head_dim + 2 * kv) + m.n_head * m.head_dim * m.d_model
    layer += 3 * m.d_model * m.d_ff + 2 * m.d_model
    return m.n_layer * layer + 2 * m.vocab_size * m.d_model + m.d_model


@needs_libtpu
def test_fsdp_holds_a_quarter_of_parameters_and_optimizer_state():
    devices = aot.topology_devices("v5e:2x2")
    assert len(devices) == 4
    sharded = aot.compile_run(tiny_llama(data=1, fsdp=4), devices, "v5e:2x2", only=["train_step"]).reports[0]
    replicated = aot.compile_run(tiny_llama(data=4, fsdp=1), devices, "v5e:2x2", only=["train_step"]).reports[0]
    full = n_params(tiny_llama()) * 4 / GiB  # float32
    assert sharded.params_gib == pytest.approx(full / 4, rel=0.03)
    assert sharded.opt_state_gib == pytest.approx(2 * full / 4, rel=0.03)  # Adam's two moments
    assert replicated.params_gib == pytest.approx(full, rel=0.03)
    assert replicated.opt_state_gib == pytest.approx(2 * full, rel=0.03)
    # XLA's own count of the arguments agrees: the state is donated, so the total holds it once
    assert sharded.params_gib + sharded.opt_state_gib < sharded.total_gib < replicated.total_gib
    assert sharded.capacity_gib == pytest.approx(16.0)
    assert 0 < sharded.mfu_bound < 1 and sharded.flops > 0


@needs_libtpu
def test_oversize_config_fails_with_one_line(capsys):
    rc = aot.main(
        [
            "-e",
            "world",
            "--topology",
            "v5e:2x2",
            "--programs",
            "train_step",
            "--set",
            "model.d_model=16384",
            "model.n_layer=2",
            "model.n_head=128",
            "model.vocab_size=256",
            "mesh.fsdp=4",
            "mesh.data=1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("does not fit: train_step needs "), err
    assert "GiB per chip of 16.00 GiB; try " in err[0] and "model.remat=full" in err[0]


def test_unknown_topology_is_a_user_error(capsys):
    assert cli.run(aot.main, ["-e", "world", "--topology", "v5e-2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --topology 'v5e-2x2'"), err


def test_compile_only_on_the_cpu_mesh_reports_and_does_not_train(tmp_path, capsys):
    workdir = tmp_path / "run"
    overrides = ["train.compile_only=true", "model.vocab_size=64", "model.n_layer=1", "model.d_model=32"]
    overrides += ["model.block_size=32", "train.batch_size=4", "eval.sample_tokens=8"]
    assert train.main(["-e", "world", "--workdir", str(workdir), "--set", *overrides]) == 0
    out = capsys.readouterr().out
    for program in ("train_step", "eval_step", "prefill", "decode_step"):
        assert f"\n{program} " in out, out
    assert not (workdir / "checkpoints").exists() and not list(workdir.glob("*.jsonl"))


def test_scanned_layers_flops_are_calibrated_to_the_unrolled_count():
    """cost_analysis counts a scan's body once; the calibrated figure matches the unrolled program."""

    def flops(scan: bool, accum: int) -> float:
        cfg = tiny_llama()
        cfg.model.scan_layers, cfg.model.n_layer, cfg.train.grad_accum_steps = scan, 4, accum
        return aot.compile_run(cfg, jax.devices()[:1], "cpu", only=["train_step"]).reports[0].flops

    unrolled = flops(False, 1)
    assert flops(True, 1) == pytest.approx(unrolled, rel=0.03)
    assert math.isfinite(unrolled) and unrolled > 6 * n_params(tiny_llama()) * 8 * 64 * 0.5


def test_splash_attention_matches_the_einsums_in_interpret_mode():
    """The TPU kernel run by the Pallas interpreter on the CPU: causal, a packed row (two segments),
    a padded row, grouped-query heads; forward and the backward kernels."""
    from flaxgpt import tpu_attention
    from flaxgpt.model import attention_mask, einsum_attention

    b, t, h, kv, d = 2, 128, 4, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:])
    segments = jnp.ones((b, t), jnp.int32).at[0, 50:].set(2).at[1, 100:].set(0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    kernel = lambda q, k, v: tpu_attention._local(q, k, v, segments, interpret=True)
    reference = lambda q, k, v: einsum_attention(q, k, v, attention_mask(segments))
    np.testing.assert_allclose(kernel(q, k, v), reference(q, k, v), atol=2e-5)
    for got, want in zip(jax.grad(loss(kernel), (0, 1, 2))(q, k, v), jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-4)


@needs_libtpu
def test_auto_attention_compiles_the_splash_kernel_for_tpu():
    cfg = tiny_llama(data=1, fsdp=2, tensor=2)
    cfg.model.block_size, cfg.model.dtype, cfg.model.d_model = 128, "bfloat16", 256  # head_dim 64
    devices = aot.topology_devices("v5e:2x2")
    kernels = {}
    for attention in ("auto", "xla"):
        cfg.model.attention = attention
        resolved, _ = aot.resolve_for_compile(cfg)
        mesh, rules = make_mesh(resolved.mesh, devices), logical_rules(resolved.mesh.rules)
        with jax.set_mesh(mesh), aot._axis_rules(rules):
            prog = next(p for p in aot.build_programs(resolved, mesh, rules) if p.name == "eval_step")
            lowered = prog.jitted.lower(*prog.args)
            kernels[attention] = lowered.as_text().count("tpu_custom_call")
    assert kernels["auto"] >= 1 and kernels["xla"] == 0, kernels  # the layers share one kernel function
    assert lowered.compile().memory_analysis() is not None


def test_lora_and_remat_model_flops_keep_the_mfu_bound_below_one():
    """Model FLOPs of a LoRA step skip the frozen base's weight gradients (4N + 2N_trained, not 6N,
    which gave bounds over 100 %); remat's recomputed forward is hardware work, not model FLOPs."""
    cfg = tiny_llama()
    cfg.model.lora_rank, cfg.model.remat = 4, "full"
    report = aot.compile_run(cfg, jax.devices()[:1], "cpu", only=["train_step"]).reports[0]
    m = aot.resolve_for_compile(cfg)[0].model
    params = jax.eval_shape(lambda: Transformer(m).init(jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.int32)))
    n, trained = (f(params["params"]) for f in (count_params, lora.count_trained))
    assert 0 < 20 * trained < n
    attention = 4 * m.n_layer * m.block_size * m.n_head * m.head_dim
    assert report.model_flops == pytest.approx((4 * n + 2 * trained + 3 * attention) * 8 * 64, rel=1e-6)
    recompute = (2 * n + attention) * 8 * 64
    assert report.flops >= 0.9 * (report.model_flops + recompute)
    assert 0.5 < report.mfu_bound < 0.85  # compute-bound on the CPU: model / (model + recompute)


def test_hardware_flops_never_below_the_model_and_remat_floor():
    """XLA counts a Pallas kernel as no FLOPs: the roofline takes the analytic floor instead."""
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    prog = aot.Program("kernel", jax.jit(lambda a: a @ a), (x,), ("inputs",), 1e6, hardware_flops=3e9)
    chip = aot.Chip("test", 16 * GiB, None, 1e12)
    report = aot.measure(prog, chip, "float32")
    assert report.flops == 3e9 and report.bound_s == pytest.approx(3e-3)
    assert report.mfu_bound == pytest.approx(1e6 / 3e9) and "remat" in report.flops_source


PROGRAMS = {
    "dpo": ["train_step", "eval_step", "reference_logprobs", "prefill", "decode_step"],
    "kto": ["train_step", "eval_step", "reference_logprobs", "prefill", "decode_step"],
    "orpo": ["train_step", "eval_step", "prefill", "decode_step"],
    "grpo": ["rollout_prefill", "rollout_decode_step", "reward_score", "grpo_update"],
}


def trainer_config(trainer: str, **mesh) -> C.Config:
    cfg = tiny_llama(**mesh)
    cfg.train.trainer, cfg.data.source = trainer, "world"
    cfg.ppo.reward_from, cfg.ppo.max_new_tokens, cfg.grpo.group_size = "runs/rm", 16, 2
    return cfg


def test_preference_and_grpo_runs_have_their_own_programs_and_batches():
    """Traced (not compiled) on the CPU: each trainer's programs, with its records' real rows."""
    mesh, rules = make_mesh(C.MeshConfig(), jax.devices()[:1]), logical_rules(C.MeshConfig().rules)
    for trainer, names in PROGRAMS.items():
        cfg = aot.resolve_for_compile(trainer_config(trainer))[0]
        with jax.set_mesh(mesh), aot._axis_rules(rules):
            progs = {p.name: p for p in aot.build_programs(cfg, mesh, rules)}
            assert list(progs) == names, trainer
            step = progs["grpo_update" if trainer == "grpo" else "train_step"]
            batch = step.args[1]
            jax.eval_shape(step.jitted, *step.args)  # the trainer's own loss runs on these rows
        if trainer == "grpo":  # 8 prompts x 2 answers of 48 prompt + 16 response tokens, packed a group a row
            assert batch["tokens"].shape == (8, 160) and batch["resp_mask"].shape == (16, 16)
            assert set(step.args[0].frozen) == {"reference", "reward"}
            continue
        rows = {"dpo": "chosen_", "kto": "kl_", "orpo": "rejected_"}[trainer] + "inputs"
        assert batch[rows].shape == (8, 64), sorted(batch)
        assert ("ref_chosen_logp" in batch) == (trainer == "dpo") and ("desirable" in batch) == (trainer == "kto")


@needs_libtpu
def test_dpo_and_grpo_steps_compile_for_v5e_with_their_state_sharded():
    """The steps that differ from the LM loop's (the CPU test above traces every program)."""
    devices = aot.topology_devices("v5e:2x2")
    full = n_params(tiny_llama()) * 4 / GiB  # float32
    compiled = lambda trainer, only: (
        aot.compile_run(trainer_config(trainer, data=1, fsdp=4), devices, "v5e:2x2", only, calibrate=False).reports
    )
    (step,) = compiled("dpo", ["train_step"])
    assert step.params_gib == pytest.approx(full / 4, rel=0.03)
    rows = 2 * 5 * 8 * 64 * 4 + 3 * 8 * 4  # chosen and rejected rows; valid and the two reference columns
    assert step.inputs_gib * GiB == pytest.approx(rows / 4, abs=64)
    (update,) = compiled("grpo", ["grpo_update"])
    reward = full - (256 - 1) * 128 * 4 / GiB  # the reward model's score head replaces the output head
    assert update.params_gib == pytest.approx((2 * full + reward) / 4, rel=0.03)  # policy, reference, reward
    assert update.opt_state_gib == pytest.approx(2 * full / 4, rel=0.03)  # Adam of the policy only
    assert all(r.fits and 0 < r.mfu_bound <= 1 for r in (step, update))


def test_a_grpo_run_that_does_not_fit_is_told_to_sample_fewer_answers():
    """GRPO updates on the whole batch at once: micro-batches (grad_accum_steps) do not apply to it."""
    mesh = make_mesh(C.MeshConfig(), jax.devices()[:1])
    report = aot.Report("grpo_update", 1, 2, 0, 30, 33, 16, 0, 0, 0, 0, 0, 0)
    tips = aot.suggestions(trainer_config("grpo"), report, mesh)
    assert "fewer answers a step (train.batch_size=4 or a smaller grpo.group_size)" in tips
    assert not any("grad_accum_steps" in tip for tip in tips)


def test_init_from_a_finished_run_takes_its_model_and_a_conflict_names_the_field(tmp_path):
    """A fine-tuning config compiled before it runs gets the model of the run it starts from."""
    from flaxgpt.data.tokenizers import CharTokenizer

    source = tiny_llama()
    source.model.n_layer, source.model.vocab_size, source.model.valid_vocab = 3, 72, 10  # "abc" + 7 specials
    (tmp_path / "config.json").write_text(C.to_json(source))
    CharTokenizer("abc").save(str(tmp_path))
    cfg = C.Config(name="ft", train=C.TrainConfig(init_from=str(tmp_path), batch_size=8)).validate()
    resolved, notes = aot.resolve_for_compile(cfg)
    assert (resolved.model.n_layer, resolved.model.vocab_size, resolved.model.recipe) == (3, 72, "llama")
    assert notes == [f"model from {tmp_path}"]
    cfg.model.n_layer = 5
    with pytest.raises(aot.UserError, match="model.n_layer"):
        aot.resolve_for_compile(cfg)
