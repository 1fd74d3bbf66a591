"""`python -m flaxgpt.sample --workdir DIR --prompt TEXT [--prompt TEXT ...] [decoding flags]`

Continues each prompt with the latest checkpoint of a workdir (or --step N), all prompts in
one batch through the KV-cache engine, and prints prompt + completion for each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from flaxgpt import generate, perf
from flaxgpt import runs as inference
from flaxgpt.config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxgpt.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", "-w", required=True)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", "-p", action="append", required=True, help="may be repeated")
    inference.add_decode_flags(parser, temperature=0.8, top_p=1.0, max_new_tokens=100)
    args = parser.parse_args(argv)
    try:
        perf.tune_host_allocator()
        loaded = inference.load(args.workdir, args.step)
        tok = loaded.tokenizer
        prompts = [tok.encode(p) or [tok.eos_id] for p in args.prompt]
        with inference.logical_context(loaded):
            out = generate.generate(
                loaded.model,
                loaded.params,
                prompts,
                inference.decode_config(args),
                jax.random.PRNGKey(args.seed),
                pad_id=tok.pad_id,
                stop_tokens=[tok.eos_id],
            )
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, ids in zip(args.prompt, generate.completions(out, [tok.eos_id])):
        print(prompt + tok.decode(ids))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
