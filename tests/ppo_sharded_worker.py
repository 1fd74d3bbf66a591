"""Runs with 4 simulated CPU devices (XLA_FLAGS set by the caller): trains a tiny policy, then
a PPO step on two meshes, and prints one JSON object with each mesh's per-step figures and
the policy's parameter shardings."""

import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_run_config  # noqa: E402
from test_ppo import ppo_config, write_policy_data  # noqa: E402

from flaxgpt import runs  # noqa: E402
from flaxgpt.logging import read_metrics  # noqa: E402
from flaxgpt.trainers import ppo, sft  # noqa: E402

base = sys.argv[1]
write_policy_data(base)
policy = os.path.join(base, "policy")
sft.run(
    tiny_run_config(
        train={"trainer": "sft", "max_steps": 5},
        model={"vocab_multiple": 8},
        data={"source": "jsonl", "path": os.path.join(base, "chats.jsonl"), "packing": "pad"},
        sft={"eval_examples": 0},
        eval={"interval": 5, "iters": 1, "sample_tokens": 0},
    ),
    policy,
)
out = {"devices": jax.device_count()}
for name, mesh in {"data4": dict(data=4), "f2t2": dict(data=1, fsdp=2, tensor=2)}.items():
    cfg = ppo_config(policy, "test_ppo:reward_letter_x", 1, value_model="separate", eval_prompts=0)
    for key, value in mesh.items():
        setattr(cfg.mesh, key, value)
    workdir = os.path.join(base, name)
    ppo.run(cfg, workdir)
    rows = [r for r in read_metrics(workdir) if "score_mean" in r]
    loaded = runs.load(workdir)
    specs = {
        jax.tree_util.keystr(p): [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]
        for p, x in jax.tree_util.tree_leaves_with_path(loaded.params)
    }
    out[name] = {"rows": rows, "specs": specs}
print(json.dumps(out))
