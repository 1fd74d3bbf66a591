"""Config tree, --set overrides, error messages, and the CLI's --list / --print-config."""

import dataclasses
import json
import re
import typing

import pytest

from flaxgpt import config as C
from flaxgpt.pipeline import stage_config
from flaxgpt.train import find_experiment, list_experiments, load_experiment, main
from tests.conftest import run_cli


def test_overrides_are_parsed_by_field_type():
    cfg = C.Config()
    C.apply_overrides(
        cfg,
        [
            "optimizer.lr=3e-4",
            "train.max_steps=7",
            "model.scan_layers=true",
            "model.n_kv_heads=2",
            "data.path=some file.txt",
            "model.recipe=llama",
            'optimizer.no_decay=["bias"]',
            "optimizer.decay_steps=none",
        ],
    )
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.scan_layers is True
    assert cfg.model.n_kv_heads == 2 and cfg.data.path == "some file.txt"
    assert cfg.model.recipe == "llama" and cfg.optimizer.no_decay == ("bias",)
    assert cfg.optimizer.decay_steps is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lrr=1", "'optimizer.lr'"),
        ("optimiser.lr=1", "'optimizer.lr'"),
        ("train.max_step=5", "'train.max_steps'"),
        ("model.nlayer=2", "'model.n_layer'"),
    ],
)
def test_unknown_key_names_key_and_suggests_closest(override, expected):
    with pytest.raises(C.ConfigError) as err:
        C.apply_overrides(C.Config(), [override])
    assert override.split("=")[0] in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_steps=ten", "train.max_steps must be an integer"),
        ("train.max_steps=1.5", "train.max_steps must be an integer"),
        ("optimizer.lr=fast", "optimizer.lr must be a number"),
        ("model.scan_layers=maybe", "model.scan_layers must be a bool"),
        ("model.recipe=lama", "did you mean 'llama'"),
        ("model=3", "model is a section"),
        ("optimizer.lr", "not of the form key=value"),
    ],
)
def test_wrong_values_are_errors_that_name_the_key(override, fragment):
    with pytest.raises(C.ConfigError, match=fragment):
        C.apply_overrides(C.Config(), [override])


def test_validate_catches_cross_field_errors():
    cfg = C.Config()
    cfg.train.batch_size, cfg.train.grad_accum_steps = 10, 4
    with pytest.raises(C.ConfigError, match="train.batch_size=10"):
        cfg.validate()
    cfg = C.Config()
    cfg.model.n_head, cfg.model.n_kv_heads = 4, 3
    with pytest.raises(C.ConfigError, match="n_kv_heads=3"):
        cfg.validate()
    cfg = C.Config()
    cfg.train.max_steps = "100"  # a wrongly typed value written in an experiment file
    with pytest.raises(C.ConfigError, match="train.max_steps must be an integer"):
        cfg.validate()


def test_json_round_trip_and_strict_from_dict():
    cfg = C.Config()
    C.apply_overrides(cfg, ["model.recipe=llama", "mesh.fsdp=2"])
    again = C.from_dict(json.loads(C.to_json(cfg)))
    assert C.to_dict(again) == C.to_dict(cfg)
    with pytest.raises(C.ConfigError, match="did you mean 'model.n_head'"):
        C.from_dict({"model": {"n_heads": 4}})


def test_recipe_resolution():
    gpt2 = C.ModelConfig(recipe="gpt2", d_model=128, n_head=4).resolved()
    assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.use_bias, gpt2.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )
    assert gpt2.d_ff == 512 and gpt2.n_kv_heads == 4 and gpt2.head_dim == 32
    llama = C.ModelConfig(recipe="llama", d_model=128, n_head=4, use_bias=True).resolved()
    assert (llama.position, llama.norm, llama.mlp, llama.use_bias, llama.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        True,
        False,
    )
    assert llama.d_ff == 384  # 8/3 * 128 = 341, rounded up to a multiple of 64


def test_experiments_are_found_by_name_and_path():
    assert {"shakespeare_char", "world"} <= set(list_experiments())
    cfg = load_experiment("world", ["train.max_steps=3"])
    assert cfg.name == "world" and cfg.train.max_steps == 3
    path = find_experiment("shakespeare_char")
    assert load_experiment(path).name == "shakespeare_char"
    with pytest.raises(C.ConfigError, match="did you mean 'world'"):
        find_experiment("wrld")


def test_every_experiment_loads_and_validates():
    names = list_experiments()
    assert {"world", "sft_world", "rm_world", "chat_demo", "sft_jsonl", "rm_jsonl"} <= set(names)
    required = {"hf_chat": ["sft.train.init_from_hf=/path/to/a/hf/model"]}  # no sensible default
    for name in names:
        loaded = load_experiment(name, required.get(name, []))
        configs = [loaded] if isinstance(loaded, C.Config) else [stage_config(s, "WORKDIR") for s in loaded]
        assert all(cfg.validate() for cfg in configs), name
    with pytest.raises(C.ConfigError, match="stage 'sft' needs --set sft.train.init_from_hf="):
        load_experiment("hf_chat")


def test_trainer_specific_checks():
    cfg = C.Config(train=C.TrainConfig(trainer="reward"), data=C.DataConfig(source="world"))
    with pytest.raises(C.ConfigError, match="train.init_from to the SFT run"):
        cfg.validate()
    cfg = C.Config(train=C.TrainConfig(trainer="sft"), data=C.DataConfig(source="text", path="x.txt"))
    with pytest.raises(C.ConfigError, match="reads data.source 'world' or 'jsonl'"):
        cfg.validate()
    load_experiment("rloo_rm_world", ["ppo.reward_function=calculator"]).validate()  # both: the sum
    with pytest.raises(C.ConfigError, match="ppo.reward_function_weight weighs the function beside ppo.reward_from"):
        load_experiment("rloo_world", ["ppo.reward_function_weight=3"]).validate()
    with pytest.raises(C.ConfigError, match=r"needs one of ppo.reward_from .* \(GRPO / RLOO also take both"):
        load_experiment("ppo_world", ["ppo.reward_function=world"]).validate()
    with pytest.raises(C.ConfigError, match=r"needs one of ppo.reward_from .* or both"):
        load_experiment("rloo_rm_world", ["ppo.reward_from=", "ppo.reward_function="]).validate()
    with pytest.raises(C.ConfigError, match="GRPO / RLOO only: set both or neither"):
        load_experiment("ppo_world", ["ppo.reward_function_weight=2"]).validate()
    with pytest.raises(C.ConfigError, match=r"ppo.reward_function_weight=0.0: expected a finite number > 0"):
        load_experiment("rloo_rm_world", ["ppo.reward_function=calculator", "ppo.reward_function_weight=0"]).validate()
    for key in ("ppo.kl_coef=0.3", "ppo.rounds=2", "ppo.ptx_coef=1", "ppo.minibatches=3"):  # PPO's alone
        with pytest.raises(C.ConfigError, match=f"{key.split('=')[0]} is PPO's: train.trainer='grpo' does not read"):
            load_experiment("rloo_world", [key]).validate()
    load_experiment("rloo_world", ["train.batch_size=2"]).validate()  # no ppo.minibatches to divide


def test_reward_function_names_are_checked_before_the_run_starts(monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    from flaxgpt import rewards, rlhf

    def loaded(name: str):
        return rewards.reward_function(C.Config(ppo=C.PPOConfig(reward_function=name)))

    assert loaded("calculator") is rewards.calculator and loaded("math:sqrt")(4.0) == 2.0
    for name, why in [
        (":foo", "expected 'world', 'calculator' or 'module:function'"),
        (".rewards:foo", "expected 'world'"),
        ("math:", "expected 'world'"),
        ("no_such_module_x:f", "cannot load it"),
        ("math:pi", "is a float, not a function"),
    ]:
        with pytest.raises(C.ConfigError, match=f"ppo.reward_function='{re.escape(name)}'.*{why}"):
            loaded(name)
    # what the function returns is checked where it is used: a number, finite
    monkeypatch.setattr(rlhf, "responses", lambda run, gen: ["a", "b"])
    prompts = [SimpleNamespace(text="p")] * 2
    for returned, ok in [(1, True), (np.float32(0.5), True), ("1", False), (True, False), (float("nan"), False)]:
        run = SimpleNamespace(reward_fn=lambda p, r: returned, cfg=C.Config(ppo=C.PPOConfig(reward_function="m:f")))
        if ok:
            np.testing.assert_allclose(rlhf.function_scores(run, prompts, None), [float(returned)] * 2)
        else:
            with pytest.raises(C.ConfigError, match="ppo.reward_function='m:f' returned .*: expected a finite number"):
                rlhf.function_scores(run, prompts, None)


def test_cli_print_config_and_list(capsys):
    assert (
        main(
            [
                "--experiment",
                "shakespeare_char",
                "--print-config",
                "--set",
                "optimizer.lr=5e-4",
                "train.batch_size=24",
                "--set",
                "model.n_layer=6",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizer"]["lr"] == 5e-4 and printed["train"]["batch_size"] == 24
    assert printed["model"]["n_layer"] == 6 and printed["name"] == "shakespeare_char"
    assert main(["--list"]) == 0
    assert "world" in capsys.readouterr().out.split()


def test_cli_config_typo_exits_with_clear_message():
    result = run_cli("--experiment", "world", "--set", "optimizer.learning_rate=1e-3", "--print-config")
    assert result.returncode == 2
    assert "unknown config key 'optimizer.learning_rate'" in result.stderr
    assert "did you mean 'optimizer.lr'" in result.stderr


def _numeric_keys(node, prefix=""):
    for name, ftype in typing.get_type_hints(type(node)).items():
        value = getattr(node, name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, f"{prefix}{name}.")
        elif {int, float} & {ftype, *typing.get_args(ftype)}:
            yield f"{prefix}{name}"


def test_every_numeric_field_has_a_documented_range_its_default_meets():
    assert sorted(_numeric_keys(C.Config())) == sorted(C.RANGES)
    C.Config().validate()  # every default lies in its range


@pytest.mark.parametrize(
    "spec, kind, inside, outside, text",
    [
        ("> 0", float, [1e-9, 3.0], [0.0, -1.0, float("nan"), float("inf")], "a finite number > 0"),
        (">= 1", int, [1, C.INT_MAX], [0, C.INT_MAX + 1], "an integer in [1, 2147483647]"),
        ("[0, 1)", float, [0.0, 0.5], [1.0, -0.1], "a number in [0, 1)"),
        ("(0, 1]", float, [1.0, 1e-6], [0.0, 1.5], "a number in (0, 1]"),
        (">= 1 or -1", int, [-1, 4], [0, -2], "-1 or an integer in [1, 2147483647]"),
        ("any", float, [-3.5, 0.0], [float("-inf")], "a finite number"),
    ],
)
def test_range_notation(spec, kind, inside, outside, text):
    allowed = C.Range.parse(spec, kind)
    assert all(v in allowed for v in inside) and not any(v in allowed for v in outside)
    assert str(allowed) == text


def test_ranges_are_checked_when_a_model_config_is_resolved_outside_validate():
    with pytest.raises(C.ConfigError, match=r"model.n_head=0: expected an integer in \[1, "):
        C.ModelConfig(n_head=0).resolved()  # e.g. a config.json read back by inference.read_run


def test_experiment_file_values_are_range_checked_too():
    cfg = C.Config()
    cfg.optimizer.lr = float("nan")  # written directly in an experiment file, not through --set
    with pytest.raises(C.ConfigError, match="optimizer.lr=nan: expected a finite number > 0"):
        cfg.validate()


def test_cli_list_keys_states_each_value_and_its_valid_range(capsys):
    assert main(["--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(C.all_keys(C.Config()))
    assert "optimizer.lr=0.001  # a finite number > 0" in lines
    assert "checkpoint.max_to_keep=3  # an integer in [1, 2147483647]" in lines
    assert "model.recipe=\"gpt2\"  # one of ['gpt2', 'llama']" in lines and 'data.path=""' in lines
    assert main(["--experiment", "chat_demo_ppo", "--list-keys", "--set", "ppo.optimizer.lr=2e-4"]) == 0
    assert "ppo.optimizer.lr=0.0002  # a finite number > 0" in capsys.readouterr().out.splitlines()
