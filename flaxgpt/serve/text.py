"""From the engine's tokens to an answer's text: incremental decoding, stop strings, logprobs."""

from __future__ import annotations

from typing import Any


class AnswerText:
    """One answer's text as its tokens arrive. Text that might be the start of a stop string (or
    an unfinished multi-byte character) is held back until it is known not to be."""

    def __init__(
        self, tokenizer: Any, stop: list[str], logprobs: bool = False, top_logprobs: int = 0, min_tokens: int = 0
    ):
        self.tokenizer, self.stop, self.min_tokens = tokenizer, stop, min_tokens
        self.want_logprobs, self.top_logprobs = logprobs, top_logprobs
        self.floor = 0  # a stop string counts only if it ends past this much text (the min_tokens-1 tokens')
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was seen
        self.logprobs: list[dict] = []

    def add(self, token: int, logprob: float, top: list[tuple[int, float]]) -> str:
        """The new text this token makes final (maybe empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        if self.want_logprobs:
            self.logprobs.append(self._entry(token, logprob, top))
        full = self.tokenizer.decode(self.tokens)
        if len(self.tokens) < self.min_tokens:  # vLLM's min_tokens: no stop string yet
            self.floor = len(full)
            return self._take(full[: len(full) - self._held(full)])
        found = (full.find(s, max(0, self.floor - len(s) + 1)) for s in self.stop)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(full[:cut])
        return self._take(full[: len(full) - self._held(full)])

    def flush(self) -> str:
        """What is left when the answer ends without a stop string."""
        return "" if self.stopped else self._take(self.tokenizer.decode(self.tokens))

    @property
    def text(self) -> str:
        return self.emitted

    def _held(self, full: str) -> int:
        if full.endswith("\ufffd"):
            return 1
        return max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)

    def _take(self, final: str) -> str:
        new = final[len(self.emitted) :] if final.startswith(self.emitted) else ""
        self.emitted += new
        return new

    def _entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        def one(t: int, lp: float) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top[: self.top_logprobs]]}
