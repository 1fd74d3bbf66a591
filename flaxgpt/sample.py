"""`python -m flaxgpt.sample --workdir DIR --prompt TEXT [--prompt TEXT ...] [decoding flags]`

Continues each prompt with the latest checkpoint of a workdir (or --step N), all prompts in
one batch through the KV-cache engine, and prints prompt + completion for each.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax

from flaxgpt import cli, generate, host_allocator, runs
from flaxgpt.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.sample", description=__doc__)
    parser.add_argument("--workdir", "-w", required=True, help="a training run's directory")
    parser.add_argument("--step", type=cli.ranged(int, ">= 0"), help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", "-p", action="append", required=True, help="may be repeated")
    runs.add_decode_flags(parser, temperature=0.8, top_p=1.0, max_new_tokens=100)
    args = parser.parse_args(argv)
    host_allocator.tune_host_allocator()
    loaded = runs.load(args.workdir, args.step)
    tok = loaded.tokenizer
    prompts = [tok.encode_prompt(p) or [tok.eos_id] for p in args.prompt]
    block = loaded.model.cfg.block_size
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > block:
        raise UserError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceed the "
            f"model's block_size {block}: shorten the prompt or lower --max-new-tokens"
        )
    with runs.logical_context(loaded):
        out = generate.generate(
            loaded.model,
            loaded.params,
            prompts,
            runs.decode_config(args),
            jax.random.PRNGKey(args.seed),
            pad_id=tok.pad_id,
            stop_tokens=[tok.eos_id],
        )
    for prompt, ids in zip(args.prompt, generate.completions(out, [tok.eos_id])):
        print(prompt + tok.decode(ids))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
