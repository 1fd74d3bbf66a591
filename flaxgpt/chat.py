"""`python -m flaxgpt.chat --workdir DIR [--system TEXT] [--prompt TEXT] [decoding flags]`

An interactive chat with a workdir's model: replies stream as they are generated, the
conversation is remembered (oldest turns dropped to fit the context, never the system
message). Commands: /reset (forget the conversation), /system TEXT (set the system
message), /quit. With --prompt it answers once and exits, for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

import jax

from flaxgpt import chat_template, generate, perf
from flaxgpt import runs as inference
from flaxgpt.config import ConfigError


class ChatSession:
    """A conversation's memory plus the engine that answers it."""

    def __init__(self, loaded: inference.LoadedModel, decode: generate.DecodeConfig, system: str = "", seed: int = 0):
        self.loaded, self.decode, self.system = loaded, decode, system
        self.messages: list[dict] = []
        self.rng = jax.random.PRNGKey(seed)

    def reset(self) -> None:
        self.messages = []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        tok, block = self.loaded.tokenizer, self.loaded.model.cfg.block_size
        self.messages.append({"role": "user", "content": text})
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        new_tokens = min(self.decode.max_new_tokens, block // 2)
        rendered = chat_template.render(history, tok, block - new_tokens)
        stops = chat_template.stop_tokens(tok)
        produced: list[int] = []
        shown = ""

        def stream(tokens) -> None:  # decode all that has come so far; print only the new text
            nonlocal shown
            token = int(tokens[0])
            if token in stops:  # the loop ends with this step: one row, and it has stopped
                return
            produced.append(token)
            text_so_far = tok.decode(produced)
            on_text(text_so_far[len(shown) :])
            shown = text_so_far

        self.rng, key = jax.random.split(self.rng)
        decode = dataclasses.replace(self.decode, max_new_tokens=new_tokens)
        with inference.logical_context(self.loaded):
            out = generate.generate(
                self.loaded.model,
                self.loaded.params,
                [rendered.ids],
                decode,
                key,
                pad_id=tok.pad_id,
                stop_tokens=stops,
                on_tokens=stream if on_text is not None and decode.num_beams == 1 else None,
            )
        answer = tok.decode(generate.completions(out, stops)[0])
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxgpt.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", "-w", required=True)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--prompt", "-p", help="answer this once and exit")
    inference.add_decode_flags(parser, temperature=0.7, top_p=0.9, max_new_tokens=128)
    args = parser.parse_args(argv)
    try:
        perf.tune_host_allocator()
        session = ChatSession(
            inference.load(args.workdir, args.step), inference.decode_config(args), args.system, args.seed
        )
        if args.prompt is not None:
            print(session.reply(args.prompt))
            return 0
        print(f"flaxgpt chat ({args.workdir}, step {session.loaded.step}). /reset, /system TEXT, /quit", flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                session.reset()
                print("(conversation forgotten)", flush=True)
            elif line.startswith("/system"):
                session.system = line[len("/system") :].strip()
                print(f"(system message: {session.system!r})", flush=True)
            else:
                print("assistant> ", end="", flush=True)
                session.reply(line, on_text=lambda piece: print(piece, end="", flush=True))
                print(flush=True)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
