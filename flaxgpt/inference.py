"""Load a trained workdir for inference: its config, tokenizer and checkpointed parameters."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.checkpoint import Checkpointer
from flaxgpt.config import Config, ConfigError, from_dict
from flaxgpt.data.tokenizers import Tokenizer, load_tokenizer
from flaxgpt.generate import DecodeConfig
from flaxgpt.model import Transformer
from flaxgpt.optim import build_optimizer
from flaxgpt.sharding import logical_rules, make_mesh
from flaxgpt.state import abstract_train_state


@dataclass
class LoadedModel:
    cfg: Config
    model: Transformer
    params: Any
    tokenizer: Tokenizer
    step: int
    rules: tuple
    mesh: Any


def load(workdir: str, step: Optional[int] = None) -> LoadedModel:
    """The latest (or the given) checkpoint of a workdir, placed on this host's devices."""
    config_file = os.path.join(workdir, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{workdir} has no config.json: is it a flaxgpt workdir?")
    with open(config_file) as f:
        cfg = from_dict(json.load(f))
    tokenizer = load_tokenizer(workdir)
    if tokenizer is None:
        raise FileNotFoundError(f"{workdir} has no tokenizer.json or tokenizer.model")
    checkpointer = Checkpointer(workdir, cfg.checkpoint)
    steps = checkpointer.manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
    model_cfg = cfg.model.resolved()
    model = Transformer(model_cfg)
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh.rules)
    optimizer = build_optimizer(cfg.optimizer, cfg.train.max_steps)
    abstract, _ = abstract_train_state(model, optimizer, jnp.zeros((1, model_cfg.block_size), jnp.int32),
                                       mesh, rules)
    state, _ = checkpointer.restore(step, abstract, model_cfg)
    checkpointer.close()
    return LoadedModel(cfg, model, state.params, tokenizer, step, rules, mesh)


def logical_context(loaded: LoadedModel) -> contextlib.ExitStack:
    """The mesh and axis rules under which the model's sharding constraints resolve."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(loaded.mesh))
    stack.enter_context(nn.logical_axis_rules(loaded.rules))
    return stack


def add_decode_flags(parser, *, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The decoding flags shared by the sample and chat CLIs."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    group.add_argument("--top-k", type=int, default=0, help="0: off")
    group.add_argument("--top-p", type=float, default=top_p, help="1: off")
    group.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    group.add_argument("--length-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=0)


def decode_config(args) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                        length_penalty=args.length_penalty)
