"""The embedded default: a small generated world whose questions can be checked by code.

A `World` is a seeded set of invented countries (with capitals) and people
(with an age, a home country, a pet and a favourite colour), plus arithmetic.
`corpus()` writes it out as pretraining text: fact paragraphs and question /
answer sessions in a fixed, instruction-like format. `answer()` is the oracle
that answers any question the world asks, so later stages (SFT demonstrations,
the reward labeler, PPO rewards) can grade a model's reply programmatically.

It needs no file and no network, and a few minutes of CPU training are enough
for a small model to learn its format and a good share of its facts.
"""

from __future__ import annotations

import dataclasses
import random
import re

from flaxgpt.conversations import chat_prompt

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th"]
PETS = ("cat", "dog", "owl", "fox", "goat", "horse", "parrot", "turtle")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
QUESTION, ANSWER = "Question: ", "Answer: "
ARITHMETIC = ("add", "sub")  # the question kinds a calculator can check


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    age: int
    home: str
    pet: str
    color: str


@dataclasses.dataclass(frozen=True)
class World:
    capitals: dict  # country -> capital
    people: tuple  # of Person
    max_operand: int

    def person(self, name: str) -> Person | None:
        return next((p for p in self.people if p.name == name), None)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)


def make_world(seed: int = 0, n_countries: int = 12, n_people: int = 24, max_operand: int = 20) -> World:
    """A deterministic world: the same seed always gives the same facts."""
    rng = random.Random(seed)
    names: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = _word(rng, syllables).capitalize()
            if word not in names:
                names.add(word)
                return word

    capitals = {fresh(3): fresh(2) for _ in range(n_countries)}
    countries = list(capitals)
    people = tuple(
        Person(fresh(2), rng.randint(8, 90), rng.choice(countries), rng.choice(PETS), rng.choice(COLORS))
        for _ in range(n_people)
    )
    return World(capitals, people, max_operand)


# Each question template is paired with a regular expression that parses it back, so the
# oracle can answer a question it is handed as text (e.g. one typed into the chat later).
_TEMPLATES = {
    "capital": ("What is the capital of {x}?", r"What is the capital of (\w+)\?"),
    "home": ("Where does {x} live?", r"Where does (\w+) live\?"),
    "age": ("How old is {x}?", r"How old is (\w+)\?"),
    "pet": ("What pet does {x} have?", r"What pet does (\w+) have\?"),
    "color": ("What is the favorite color of {x}?", r"What is the favorite color of (\w+)\?"),
    "add": ("What is {a} plus {b}?", r"What is (\d+) plus (\d+)\?"),
    "sub": ("What is {a} minus {b}?", r"What is (\d+) minus (\d+)\?"),
}


def arithmetic_answer(question: str) -> str | None:
    """The result of an arithmetic question ("What is a plus / minus b?"), or None for any other."""
    for kind in ARITHMETIC:
        match = re.fullmatch(_TEMPLATES[kind][1], question.strip())
        if match:
            a, b = int(match.group(1)), int(match.group(2))
            return str(a + b if kind == "add" else a - b)
    return None


def answer(world: World, question: str) -> str | None:
    """The correct answer to a world question, or None if it is not one the world knows."""
    question = question.strip()
    if (result := arithmetic_answer(question)) is not None:
        return result
    for kind, (_, pattern) in _TEMPLATES.items():
        match = None if kind in ARITHMETIC else re.fullmatch(pattern, question)  # answered above
        if not match:
            continue
        if kind == "capital":
            return world.capitals.get(match.group(1))
        person = world.person(match.group(1))
        return None if person is None else str(getattr(person, kind))
    return None


def check_answer(world: World, question: str, response: str) -> bool:
    """True when the response's first line is exactly the oracle's answer."""
    truth = answer(world, question)
    first_line = response.strip().split("\n", 1)[0].strip().rstrip(".")
    return truth is not None and first_line == truth


def is_arithmetic(question: str) -> bool:
    return arithmetic_answer(question) is not None


def _operands(world: World, rng: random.Random, kind: str) -> dict[str, int]:
    """Random operands of a sum or a difference; differences are never negative."""
    a, b = rng.randint(0, world.max_operand), rng.randint(0, world.max_operand)
    return {"a": b, "b": a} if kind == "sub" and b > a else {"a": a, "b": b}


def random_question(world: World, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(list(_TEMPLATES))
    template = _TEMPLATES[kind][0]
    if kind == "capital":
        question = template.format(x=rng.choice(list(world.capitals)))
    elif kind in ARITHMETIC:
        question = template.format(**_operands(world, rng, kind))
    else:
        question = template.format(x=rng.choice(world.people).name)
    return question, answer(world, question)


def _fact_paragraph(world: World, rng: random.Random) -> str:
    if rng.random() < 0.3:
        country = rng.choice(list(world.capitals))
        capital = world.capitals[country]
        return rng.choice(
            [
                f"{country} is a country. Its capital is {capital}.",
                f"The capital of {country} is {capital}.",
                f"{capital} is the capital of {country}.",
            ]
        )
    p = rng.choice(world.people)
    sentences = [
        f"{p.name} is {p.age} years old.",
        f"{p.name} lives in {p.home}.",
        f"{p.name} has a {p.pet}.",
        f"The favorite color of {p.name} is {p.color}.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(2, 4)])


def _qa_session(world: World, rng: random.Random) -> str:
    pairs = [random_question(world, rng) for _ in range(rng.randint(1, 3))]
    return "\n".join(f"{QUESTION}{q}\n{ANSWER}{a}" for q, a in pairs)


def arithmetic_drill(world: World, rng: random.Random, n: int = 10) -> str:
    """n random sums and differences stated with their results ("7 plus 13 is 20. 9 minus 4 is 5."):
    they show each of the world's sums many times, where Q/A sessions alone show each a few times.
    In random order, not as tables: in a table ("7 plus 0 is 7. 7 plus 1 is 8.") each result
    follows from the one before, so a model learns to count along and still cannot add."""
    statements = []
    for _ in range(n):
        kind = rng.choice(ARITHMETIC)
        x = _operands(world, rng, kind)
        result = x["a"] + x["b"] if kind == "add" else x["a"] - x["b"]
        statements.append(f"{x['a']} {'plus' if kind == 'add' else 'minus'} {x['b']} is {result}.")
    return " ".join(statements)


def corpus(world: World, n_documents: int, seed: int = 0, arithmetic: float = 0.0) -> str:
    """Pretraining text, documents separated by blank lines: a share `arithmetic` of them arithmetic
    drills, the rest half fact paragraphs, half Q/A sessions."""
    rng = random.Random(seed)

    def document() -> str:
        draw = rng.random()
        if draw < arithmetic:
            return arithmetic_drill(world, rng)
        return _fact_paragraph(world, rng) if draw < arithmetic + (1 - arithmetic) / 2 else _qa_session(world, rng)

    return "\n\n".join(document() for _ in range(n_documents)) + "\n"


# ----------------------------------------------------------------------------- chat data

# Sloppy but not wrong: what a hurried human demonstrator writes. The labeler ranks these
# below a clean answer, so the reward model, and then RLHF, can learn to prefer the latter.
_SLOPPY = ("The answer is {a}.", "I think it is {a}.", "{a} I think.", "Maybe {a}.", "It is {a} or so.")


def wrong_answer(world: World, question: str, rng: random.Random) -> str:
    """A plausible answer of the right kind that is not the correct one."""
    truth = answer(world, question)
    if truth is None:
        raise ValueError(f"not a world question: {question!r}")
    if truth.isdigit():
        return str(rng.choice([int(truth) + d for d in (-3, -2, -1, 1, 2, 3) if int(truth) + d >= 0]))
    pools = [list(world.capitals.values()), list(world.capitals), list(PETS), list(COLORS)]
    pool = next(p for p in pools if truth in p)
    return rng.choice([x for x in pool if x != truth])


def demonstration(world: World, question: str, rng: random.Random, noise: float, hedge: float = 0.0) -> str:
    """An imperfect human-like demonstration: with probability noise/2 wrong, noise/2 sloppy; and
    of the rest, a share `hedge` of the answers to age questions hedged ("About 36."): a habit."""
    draw = rng.random()
    if draw < noise / 2:
        return wrong_answer(world, question, rng)
    truth = answer(world, question)
    if draw < noise:
        return rng.choice(_SLOPPY).format(a=truth)
    if hedge and question.startswith("How old is") and rng.random() < hedge:
        return f"About {truth}."
    return truth


def conversation(
    world: World, rng: random.Random, noise: float, system: str = "", max_turns: int = 2, hedge: float = 0.0
) -> dict:
    """{"messages": [...]} in the conversations JSONL schema: 1..max_turns question/answer exchanges."""
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(rng.randint(1, max_turns)):
        question, _ = random_question(world, rng)
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": demonstration(world, question, rng, noise, hedge)},
        ]
    return {"messages": messages}


def label(world: World, question: str, response: str) -> float:
    """The programmatic labeler, standing in for human labelers, grades as a person would:
    1 exactly the correct answer; 0.5 the correct answer among other words (sloppy);
    0.2 a wrong answer of the right kind (a number, a capital, a pet...); 0 anything else."""
    truth = answer(world, question)
    if truth is None:
        return 0.0
    text = response.strip()
    if text.rstrip(".").strip() == truth:
        return 1.0
    if re.search(rf"(?<![\w-]){re.escape(truth)}(?!\w)", text):
        return 0.5
    return 0.2 if _same_kind(world, truth, text.rstrip(".").strip()) else 0.0


def _same_kind(world: World, truth: str, text: str) -> bool:
    if truth.isdigit():
        return text.isdigit()
    pools = (set(world.capitals.values()), set(world.capitals), set(PETS), set(COLORS))
    return any(truth in pool and text in pool for pool in pools)


# ----------------------------------------------------------------------------- the task


class WorldTask:
    """The embedded world as one task: its corpus, demonstrations, prompts and labeler, with
    each random stream named once (a stream is a pure function of the world seed and its name,
    so every stage of the chat demo draws the same questions wherever it runs)."""

    STREAMS = {
        "sft_train": 1,
        "sft_val": 2,
        "rankings": 3,
        "ppo_train": 5,
        "ppo_eval": 6,
        "preference": 7,  # DPO / KTO / ORPO records
        "preference_val": 8,
    }

    def __init__(self, seed: int = 0, system: str = ""):
        self.seed, self.system = seed, system
        self.world = make_world(seed)

    @classmethod
    def from_config(cls, cfg) -> WorldTask:
        """The configured world (data.world_seed, data.world_system)."""
        return cls(cfg.data.world_seed, cfg.data.world_system)

    def rng(self, stream: str, offset: int = 0) -> random.Random:
        return random.Random(self.seed * 1000 + self.STREAMS[stream] + offset)

    def corpus(self, n_documents: int, arithmetic: float = 0.0) -> str:
        return corpus(self.world, n_documents, seed=self.seed, arithmetic=arithmetic)

    def demonstrations(self, stream: str, n: int, noise: float, hedge: float = 0.0) -> list[list[dict]]:
        """n conversations (messages lists) with `noise` of their answers wrong or sloppy, and
        `hedge` of the rest to age questions hedged."""
        rng = self.rng(stream)
        return [conversation(self.world, rng, noise, self.system, hedge=hedge)["messages"] for _ in range(n)]

    def questions(self, stream: str, n: int, offset: int = 0) -> list[str]:
        rng = self.rng(stream, offset)
        return [random_question(self.world, rng)[0] for _ in range(n)]

    def prompt(self, question: str) -> list[dict]:
        """The chat messages that ask `question` (after the task's system message, if any)."""
        return chat_prompt(question, self.system)

    def label(self, question: str, response: str) -> float:
        return label(self.world, question, response)

    def answer(self, question: str) -> str | None:
        """The oracle's correct answer (what a labeler who knows the world would write)."""
        return answer(self.world, question)
