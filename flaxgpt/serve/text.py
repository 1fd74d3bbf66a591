"""From the engine's tokens to an answer's text: incremental decoding, stop strings, logprobs."""

from __future__ import annotations

from typing import Any

_UNFINISHED = "\ufffd"  # what a decoder shows for the bytes of a character not yet complete


class AnswerText:
    """One answer's text as its tokens arrive. Text that might be the start of a stop string (or
    an unfinished multi-byte character) is held back until it is known not to be. Special tokens
    (an end of turn the answer ran past with ignore_eos, a marker the model wrote) are not text
    unless `skip_special_tokens` is off (vLLM's default and option)."""

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str],
        logprobs: bool = False,
        top_logprobs: int = 0,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer, self.stop, self.min_tokens = tokenizer, stop, min_tokens
        self.hidden = set(tokenizer.specials.values()) if skip_special_tokens else set()
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
        full = self._decode()
        if len(self.tokens) < self.min_tokens:  # vLLM's min_tokens: no stop string yet
            self.floor = len(full.rstrip(_UNFINISHED))  # an unfinished character may still shrink
            return self._take(full[: len(full) - self._held(full)])
        found = (full.find(s, max(0, self.floor - len(s) + 1)) for s in self.stop)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(full[:cut])
        return self._take(full[: len(full) - self._held(full)])

    def flush(self) -> str:
        """What is left when the answer ends without a stop string."""
        return "" if self.stopped else self._take(self._decode())

    @property
    def text(self) -> str:
        return self.emitted

    def _decode(self) -> str:
        return self.tokenizer.decode([t for t in self.tokens if t not in self.hidden])

    def _held(self, full: str) -> int:
        """How much of the end may still change: an unfinished character (byte-fallback tokenizers
        decode each of its bytes as one U+FFFD until it completes) or the start of a stop string."""
        unfinished = len(full) - len(full.rstrip(_UNFINISHED))
        stop = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        return max(unfinished, stop)

    def _take(self, final: str) -> str:
        new = final[len(self.emitted) :] if final.startswith(self.emitted) else ""
        self.emitted += new
        return new

    def _entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        def one(t: int, lp: float) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top[: self.top_logprobs]]}
