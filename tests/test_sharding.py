"""Mesh construction and sharded training on 8 simulated CPU devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxgpt import config as C
from flaxgpt.sharding import logical_rules, mesh_shape
from tests.conftest import REPO

EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_mesh_shape_resolves_minus_one_and_names_bad_sizes():
    assert mesh_shape(C.MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(C.MeshConfig(data=1, fsdp=-1), 8) == (1, 8, 1)
    with pytest.raises(C.ConfigError, match=r"\{'data': 2, 'fsdp': 2, 'tensor': 1\} needs 4 devices but 8 exist"):
        mesh_shape(C.MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(C.ConfigError, match="at most one mesh axis may be -1"):
        mesh_shape(C.MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(C.ConfigError, match="8 devices are not divisible by 3"):
        mesh_shape(C.MeshConfig(data=-1, fsdp=3), 8)


def test_rules_are_checked():
    assert logical_rules([["batch", ["data", "fsdp"]], ["embed", None]]) == (
        ("batch", ("data", "fsdp")),
        ("embed", None),
    )
    with pytest.raises(C.ConfigError, match="unknown mesh axes \\['model'\\]"):
        logical_rules([["heads", "model"]])


@pytest.fixture(scope="module")
def sharded_runs():
    # two workers side by side (compilation is single-threaded): one per recipe
    workers = [
        subprocess.Popen(
            [sys.executable, os.path.join("tests", "sharding_worker.py"), *args],
            cwd=REPO,
            env=EIGHT_DEVICES,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["gpt2"], ["llama", "extras"])
    ]
    merged = {}
    for worker in workers:
        out, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-4000:]
        merged.update(json.loads(out.strip().splitlines()[-1]))
    return merged


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2t2", "f4t2"])
def test_sharded_losses_match_one_device(sharded_runs, recipe, mesh):
    np.testing.assert_allclose(sharded_runs[recipe][mesh]["losses"], sharded_runs[recipe]["1dev"]["losses"], rtol=2e-6)
    assert sharded_runs[recipe][mesh]["batch_spec"] == "P(('data', 'fsdp'), None)"


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_parameter_shardings_follow_the_rules(sharded_runs, recipe):
    """Rules: embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; norms replicated."""
    specs = sharded_runs[recipe]["f4t2"]["specs"]
    attn, mlp = "['layers_0']['attn']", "['layers_0']['mlp']"
    assert specs[f"{attn}['query']['kernel']"] == ["fsdp", "tensor", None]
    assert specs[f"{attn}['key']['kernel']"] == ["fsdp", "tensor", None]
    assert specs[f"{attn}['out']['kernel']"] == ["tensor", None, "fsdp"]
    assert specs[f"{mlp}['up']['kernel']"] == ["fsdp", "tensor"]
    assert specs[f"{mlp}['down']['kernel']"] == ["tensor", "fsdp"]
    assert specs["['token_embed']['embedding']"] == ["tensor", "fsdp"]
    assert specs["['final_norm']['scale']"] == [None]
    if recipe == "llama":
        assert specs["['lm_head']['kernel']"] == ["fsdp", "tensor"]
    else:
        assert specs["['position_embed']['embedding']"] == [None, "fsdp"]
        assert specs[f"{attn}['query']['bias']"] == ["tensor", None]
    # Same rules on every mesh: under data=8 the fsdp and tensor axes have size 1, so the same
    # specs replicate every parameter (the byte counts below show it).
    assert sharded_runs[recipe]["data8"]["specs"] == specs


@pytest.mark.parametrize("recipe", ["gpt2", "llama"])
def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state(sharded_runs, recipe):
    """Per device: total/8 plus the slack of replicated leaves (norm scales, biases on
    unsharded axes, scalar counters), which fsdp cannot split."""
    run = sharded_runs[recipe]["fsdp8"]
    assert run["bytes_device0"] <= run["bytes_total"] / 8 + run["bytes_replicated"]
    assert run["bytes_replicated"] < 0.02 * run["bytes_total"]
    assert sharded_runs[recipe]["data8"]["bytes_device0"] == run["bytes_total"]  # data parallel replicates


def test_indivisible_dimension_names_parameter_dimension_and_axis(sharded_runs):
    message = sharded_runs["divisibility_error"]
    assert "['layers_0']['attn']['key']['kernel']" in message
    assert "dimension 1 ('kv_heads', size 2)" in message and "('tensor',) of size 8" in message


def test_dcn_mesh_needs_matching_slices_or_processes():
    from flaxgpt.sharding import make_mesh

    with pytest.raises(C.ConfigError, match="need a multiple of 2 devices, but 1 exist"):
        make_mesh(C.MeshConfig(data=1, dcn_data=2))


def test_generation_on_the_sharded_mesh_matches_one_device(sharded_runs):
    gen = sharded_runs["generation"]
    assert gen["d2f2t2/embedding_devices"] == 8
    for label in ("greedy/4", "greedy/3", "beam/4", "beam/3"):
        assert gen[f"d2f2t2/{label}"] == gen[f"1dev/{label}"], label
