"""`python -m flaxgpt.chat --workdir DIR [--system TEXT] [--prompt TEXT] [decoding flags]`

An interactive chat with a workdir's model: replies stream as they are generated, the
conversation is remembered (oldest turns dropped to fit the context, never the system
message). Commands: /reset (forget the conversation), /system TEXT (set the system
message), /help, /quit; a message that starts with "/" is sent as "//...". Line editing and
history with readline where available. Ctrl-C stops an answer (its text so far is kept);
Ctrl-C twice at the prompt, or Ctrl-D, leaves. A message too long for the context is refused
and the conversation goes on. With --prompt it answers once and exits, for scripts.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Callable, Sequence

import jax

from flaxgpt import chat_template, cli, generate, host_allocator, runs
from flaxgpt.errors import UserError
from flaxgpt.serve.text import AnswerText

COMMANDS = ("/reset", "/system TEXT", "/help", "/quit")


class MessageTooLong(UserError):
    """A message that cannot fit the model's context even alone: refused, the session goes on."""


class ChatSession:
    """A conversation's memory plus the engine that answers it."""

    def __init__(self, loaded: runs.LoadedModel, decode: generate.DecodeConfig, system: str = "", seed: int = 0):
        self.loaded, self.decode, self.system = loaded, decode, system
        self.messages: list[dict] = []
        self.rng = jax.random.PRNGKey(seed)
        self.stop = threading.Event()  # set (by Ctrl-C) while answering: the answer ends there

    def reset(self) -> None:
        self.messages = []

    def _new_tokens(self) -> int:
        return min(self.decode.max_new_tokens, self.loaded.model.cfg.block_size // 2)

    def prompt_ids(self, text: str) -> list[int]:
        """The conversation plus `text`, rendered to fit the context; MessageTooLong if it cannot."""
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        budget = self.loaded.model.cfg.block_size - self._new_tokens()
        try:
            return chat_template.render(
                [*history, {"role": "user", "content": text}], self.loaded.tokenizer, budget
            ).ids
        except ValueError as e:
            raise MessageTooLong(f"message not sent: {e}") from e

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        self.stop.clear()
        return self.answer(text, self.prompt_ids(text), on_text)

    def answer(self, text: str, ids: list[int], on_text: Callable[[str], None] | None = None) -> str:
        """Generate the reply to `text` (rendered as `ids`), streaming it to `on_text`; the
        exchange joins the conversation. After `stop` is set, only the text shown so far counts
        (the caller clears it before: a Ctrl-C that comes before the answer starts still counts)."""
        tok = self.loaded.tokenizer
        stops = chat_template.stop_tokens(tok)
        shown = AnswerText(tok, stop=[])  # the text final so far (an unfinished character waits)

        def stream(tokens) -> None:
            token = int(tokens[0])
            if token in stops or self.stop.is_set():  # the row has ended, or the user stopped it
                return
            if piece := shown.add(token, 0.0, []):
                on_text(piece)

        self.rng, key = jax.random.split(self.rng)
        decode = dataclasses.replace(self.decode, max_new_tokens=self._new_tokens())
        with runs.logical_context(self.loaded):
            out = generate.generate(
                self.loaded.model,
                self.loaded.params,
                [ids],
                decode,
                key,
                pad_id=tok.pad_id,
                stop_tokens=stops,
                on_tokens=stream if on_text is not None and decode.num_beams == 1 else None,
            )
        answer = shown.text if self.stop.is_set() else tok.decode(generate.completions(out, stops)[0])
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def _write(text: str) -> None:
    print(text, end="", flush=True)


def repl(session: ChatSession, read: Callable[[str], str] = input, write=_write, prompt: str = "you> ") -> None:
    """The interactive loop: `read` gives a line (EOFError: leave; KeyboardInterrupt: Ctrl-C)."""
    interrupted = False
    while True:
        try:
            line = read(prompt).strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            if interrupted:
                write("\n")
                return
            interrupted = True
            write("\n(Ctrl-C again or Ctrl-D to leave)\n")
            continue
        interrupted = False
        if line.startswith("/") and not line.startswith("//"):
            if not _command(session, line, write):
                return
        elif line:
            _turn(session, line.removeprefix("/"), write)


def _command(session: ChatSession, line: str, write) -> bool:
    """Run a /command; False to leave. Unknown commands are refused, never sent to the model."""
    name, _, argument = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        write("(conversation forgotten)\n")
    elif name == "/system":
        session.system = argument.strip()
        write(f"(system message: {session.system!r})\n")
    else:
        unknown = "" if name == "/help" else f"unknown command {name}, not sent; "
        write(f"({unknown}commands: {', '.join(COMMANDS)}; //TEXT sends a message starting with /)\n")
    return True


_UNCHANGED = object()  # what _on_ctrl_c returns off the main thread: nothing to restore


def _on_ctrl_c(handler):
    """Install `handler` for SIGINT, returning the one it replaces (_UNCHANGED, and nothing
    installed, off the main thread, where Python takes no signal handlers). A handler installed
    outside Python reads as None: Python's own (KeyboardInterrupt) replaces it on restore."""
    if handler is _UNCHANGED or threading.current_thread() is not threading.main_thread():
        return _UNCHANGED
    return signal.signal(signal.SIGINT, signal.default_int_handler if handler is None else handler)


def _turn(session: ChatSession, text: str, write) -> None:
    """Answer one message; a message too long is refused with a note. The reply runs in a worker
    thread while this (main) thread waits; Ctrl-C meanwhile stops the answer through a signal
    handler, not a KeyboardInterrupt, which could surface anywhere, even inside Thread.start."""
    try:
        ids = session.prompt_ids(text)
    except MessageTooLong as e:
        write(f"({cli.one_line(e)})\n")
        return
    write("assistant> ")
    failure: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            session.answer(text, ids, on_text=write)
        except BaseException as e:  # handed to the main thread, raised there
            failure.append(e)
        finally:
            done.set()

    session.stop.clear()
    previous = _on_ctrl_c(lambda signum, frame: session.stop.set())
    try:
        threading.Thread(target=work, daemon=True).start()
        done.wait()  # a signal's handler runs in between; the wait goes on
    finally:
        _on_ctrl_c(previous)
    if failure:
        raise failure[0]
    write(" (stopped)\n" if session.stop.is_set() else "\n")


def _enable_line_editing() -> bool:
    """Arrow keys, line editing and history for input(), where readline exists."""
    try:
        import readline  # noqa: F401  (importing it is what hooks input())
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.chat", description=__doc__)
    parser.add_argument("--workdir", "-w", required=True, help="a training run's directory")
    parser.add_argument("--step", type=cli.ranged(int, ">= 0"), help="checkpoint step (default: the latest)")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--prompt", "-p", help="answer this once and exit")
    runs.add_decode_flags(parser, temperature=0.7, top_p=0.9, max_new_tokens=128)
    args = parser.parse_args(argv)
    host_allocator.tune_host_allocator()
    session = ChatSession(
        runs.load(args.workdir, args.step, generates=True), runs.decode_config(args), args.system, args.seed
    )
    if args.prompt is not None:
        print(session.reply(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    print(f"flaxgpt chat ({args.workdir}, step {session.loaded.step}). {', '.join(COMMANDS)}", flush=True)
    repl(session, prompt="you> " if interactive else "")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
