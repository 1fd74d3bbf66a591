"""`python -m flaxgpt.sample --workdir DIR --prompt TEXT [--prompt TEXT ...] [decoding flags]`

Continues each prompt with the latest checkpoint of a workdir (or --step N), all prompts in
one batch through the KV-cache engine, and prints prompt + completion for each. A completion
ends at the model's end token (<|end|> after SFT or RLHF, the end-of-text token otherwise),
which is not printed. Where a prompt leaves fewer than --max-new-tokens of the context
(model.block_size), fewer tokens are generated, with a note on stderr; --sliding-window
continues past the context instead.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax

from flaxgpt import chat_template, cli, generate, host_allocator, runs
from flaxgpt.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.sample", description=__doc__)
    parser.add_argument("--workdir", "-w", required=True, help="a training run's directory")
    parser.add_argument("--step", type=cli.ranged(int, ">= 0"), help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", "-p", action="append", required=True, help="may be repeated")
    parser.add_argument(
        "--sliding-window",
        action="store_true",
        help="generate past the context: each new token is predicted from the last block_size tokens, "
        "recomputed without a cache (slower; one prompt at a time; no beam search)",
    )
    runs.add_decode_flags(parser, temperature=0.8, top_p=1.0, max_new_tokens=100)
    args = parser.parse_args(argv)
    host_allocator.tune_host_allocator()
    loaded = runs.load(args.workdir, args.step, generates=True)
    tok = loaded.tokenizer
    prompts = [tok.encode_prompt(p) or [tok.eos_id] for p in args.prompt]
    decode = fit_context(runs.decode_config(args), max(map(len, prompts)), loaded.model.cfg.block_size, args)
    with runs.logical_context(loaded):
        rows = complete(loaded, prompts, decode, jax.random.PRNGKey(args.seed))
    for prompt, ids in zip(args.prompt, rows):
        print(prompt + tok.decode(ids))
        print("-" * 40)
    return 0


def fit_context(decode: generate.DecodeConfig, longest: int, block: int, args) -> generate.DecodeConfig:
    """`decode`, with max_new_tokens lowered to the room the longest prompt leaves in the context
    (said on stderr) unless --sliding-window goes past it; UserError where nothing fits."""
    room, wanted = block - longest, decode.max_new_tokens
    if wanted <= room:
        return decode
    if args.sliding_window:
        if decode.num_beams > 1:
            raise UserError("--sliding-window samples one token at a time: use it with --num-beams 1")
        return decode
    if room < 1:
        raise UserError(
            f"the longest prompt ({longest} tokens) fills the model's block_size {block}: shorten it, "
            f"or pass --sliding-window to continue from its last {block} tokens"
        )
    print(
        f"note: {room} new tokens, not {wanted}: the longest prompt ({longest} tokens) leaves no more of the "
        f"model's block_size {block} (--sliding-window continues past it)",
        file=sys.stderr,
        flush=True,
    )
    return dataclasses.replace(decode, max_new_tokens=room)


def complete(loaded: runs.LoadedModel, prompts: list[list[int]], decode: generate.DecodeConfig, rng) -> list[list[int]]:
    """Each prompt's new ids up to (without) the model's end token: in one batch through the
    KV cache where prompt and new tokens fit the context, else prompt by prompt, sliding."""
    stops = chat_template.stop_tokens(loaded.tokenizer)
    if max(map(len, prompts)) + decode.max_new_tokens <= loaded.model.cfg.block_size:
        pad = loaded.tokenizer.pad_id
        out = generate.generate(loaded.model, loaded.params, prompts, decode, rng, pad_id=pad, stop_tokens=stops)
        return generate.completions(out, stops)
    rows = []
    for i, prompt in enumerate(prompts):
        new = generate.sliding_window_sample(loaded.model, loaded.params, prompt, decode, jax.random.fold_in(rng, i))
        rows.append(next((new[:at] for at, token in enumerate(new) if token in stops), new))
    return rows


if __name__ == "__main__":
    sys.exit(cli.run(main))
