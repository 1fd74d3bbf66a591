"""`python -m flaxgpt.simuser --url http://127.0.0.1:8000 --noise 0.1 [--questions 200]`

A simulated user of the chat page for the embedded world: it asks world questions through the
page's own endpoints (POST /api/chat, streamed), rates each answer with the world's labeler
(POST /api/rate: thumbs up when fully correct, down otherwise; a share `--noise` of the clicks
flipped), and after a wrong answer sometimes regenerates it (then rates the new one) or follows up
with a correction. Its ratings reach the feedback database exactly as a person's do.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from flaxgpt import cli
from flaxgpt.data import world as world_lib
from flaxgpt.data.world import WorldTask
from flaxgpt.errors import UserError


@dataclass
class Behaviour:
    noise: float = 0.1  # share of clicks flipped
    regenerate: float = 0.3  # after a wrong answer: share regenerated (the new one rated too)
    follow_up: float = 0.1  # after a wrong answer: share followed by a correction
    temperature: float = 1.0
    max_tokens: int = 32


@dataclass
class Tally:
    questions: int = 0
    ratings: int = 0
    correct: int = 0  # first answers the labeler gave full marks
    flipped: int = 0
    regenerations: int = 0
    follow_ups: int = 0
    steps: dict[int, int] = field(default_factory=dict)  # answers per checkpoint step


class SimUser:
    """One simulated person on the page at `url` (httpx client `http`)."""

    def __init__(self, http, task: WorldTask, behaviour: Behaviour, seed: int = 0):
        self.http, self.task, self.b = http, task, behaviour
        self.rng = random.Random(seed)
        self.questions = task.rng("ppo_train", seed)  # held-out-style: not the SFT or guard questions
        self.tally = Tally()

    def chat(self, body: dict) -> tuple[int, str]:
        """Send one page request; (answer message id, answer text), once the answer is stored."""
        settings = {
            "temperature": self.b.temperature,
            "max_tokens": self.b.max_tokens,
            "seed": self.rng.getrandbits(31),
        }
        text, done = [], None
        with self.http.stream("POST", "/api/chat", json={**settings, **body}) as response:
            if response.status_code != 200:
                raise UserError(f"/api/chat answered {response.status_code}: {response.read().decode()[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "delta":
                    text.append(event["text"])
                elif event["type"] == "done":
                    done = event
                elif event["type"] == "error":
                    raise RuntimeError(f"/api/chat failed: {event['message']}")
        if done is None:
            raise RuntimeError("/api/chat ended without an answer")
        self.tally.steps[done["step"]] = self.tally.steps.get(done["step"], 0) + 1
        return done["message_id"], "".join(text)

    def rate(self, message_id: int, correct: bool) -> None:
        up = correct if self.rng.random() >= self.b.noise else not correct
        self.tally.flipped += up != correct
        response = self.http.post("/api/rate", json={"message_id": message_id, "rating": 1 if up else -1})
        response.raise_for_status()
        self.tally.ratings += 1

    def ask(self) -> None:
        """One question, its rating, and perhaps a regeneration or a correction."""
        question, truth = world_lib.random_question(self.task.world, self.questions)
        message_id, text = self.chat({"content": question, "system": self.task.system})
        correct = self.task.label(question, text) == 1.0
        self.tally.questions += 1
        self.tally.correct += correct
        self.rate(message_id, correct)
        if correct:
            return
        if self.rng.random() < self.b.regenerate:
            again, text = self.chat({"regenerate": message_id})
            self.tally.regenerations += 1
            self.rate(again, self.task.label(question, text) == 1.0)
        elif self.rng.random() < self.b.follow_up:
            self.chat({"parent_id": message_id, "content": f"That is wrong: the answer is {truth}."})
            self.tally.follow_ups += 1


def api_accuracy(http, model: str, conversations: list[list[dict]], task: WorldTask, max_tokens: int = 32) -> float:
    """Greedy task accuracy through /v1/chat/completions: each conversation's last answer asked
    again (temperature 0) and judged by the labeler."""
    correct = 0
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        body = {"model": model, "messages": messages[:last], "temperature": 0, "max_tokens": max_tokens}
        response = http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        correct += task.label(messages[last - 1]["content"], answer) == 1.0
    return correct / max(len(conversations), 1)


def _http_url(text: str) -> str:
    """An argparse type: an http:// or https:// address with a host."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// address, got {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    import httpx

    parser = cli.ArgumentParser(prog="python -m flaxgpt.simuser", description=__doc__)
    parser.add_argument("--url", type=_http_url, default="http://127.0.0.1:8000", help="the chat server's address")
    parser.add_argument("--api-key", help="the server's --api-key, if it has one")
    parser.add_argument("--questions", type=cli.ranged(int, ">= 1"), default=100)
    parser.add_argument("--noise", type=cli.ranged(float, "[0, 1]"), default=0.1, help="share of clicks flipped")
    parser.add_argument("--regenerate", type=cli.ranged(float, "[0, 1]"), default=0.3)
    parser.add_argument("--follow-up", type=cli.ranged(float, "[0, 1]"), default=0.1)
    parser.add_argument("--temperature", type=cli.ranged(float, "[0, 2]"), default=1.0)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--system", default="Answer briefly.", help="the system message asked under")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    behaviour = Behaviour(args.noise, args.regenerate, args.follow_up, args.temperature)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=120) as http:
            user = SimUser(http, WorldTask(args.world_seed, args.system), behaviour, args.seed)
            for _ in range(args.questions):
                user.ask()
    except (httpx.HTTPError, httpx.InvalidURL) as e:  # no server there, a refused request: the user's to fix
        raise UserError(f"--url {args.url}: {type(e).__name__}: {cli.one_line(e)}") from None
    t = user.tally
    print(
        f"{t.questions} questions, {t.correct} answered correctly first; {t.ratings} ratings "
        f"({t.flipped} flipped), {t.regenerations} regenerations, {t.follow_ups} follow-ups; "
        f"answers by step {dict(sorted(t.steps.items()))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
