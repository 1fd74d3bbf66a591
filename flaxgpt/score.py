"""`python -m flaxgpt.score --workdir RM_DIR --prompt TEXT --response TEXT [--response TEXT ...]`
`python -m flaxgpt.score --workdir RM_DIR --jsonl FILE`

Prints reward-model scores as JSON lines. The first form scores each response to one prompt
(asked under --system, if given). The second scores every record of a JSONL file: records
with "response" get "reward", with "responses" get "rewards", with "chosen"/"rejected" get
"reward_chosen"/"reward_rejected"; each is printed back with its scores added.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from flaxgpt import cli, host_allocator, runs
from flaxgpt.config import ConfigError
from flaxgpt.data.jsonl import DataError, read_jsonl

FIELDS = (("response", "reward"), ("chosen", "reward_chosen"), ("rejected", "reward_rejected"))


def _prompt(record: dict) -> list[dict]:
    system = record.get("system")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": record["prompt"]}]


def _problem(record: dict) -> str | None:
    """What keeps a record (with a string 'prompt') from being scored, or None."""
    for field, _ in FIELDS:
        if field in record and not isinstance(record[field], str):
            return f"'{field}' must be a string"
    responses = record.get("responses", [])
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        return "'responses' must be a list of strings"
    if not responses and not any(field in record for field, _ in FIELDS):
        return "no 'response', 'responses' or 'chosen'/'rejected' to score"
    return None


def _items(records: list[dict], where: str) -> tuple[list, list]:
    """((record index, output key, index in a list or None) per response, (prompt, response) per response)."""
    keys, items = [], []
    for i, record in enumerate(records):
        problem = _problem(record)
        if problem:
            raise DataError(f"{where}: record {i + 1}: {problem}")
        prompt = _prompt(record)
        for field, out in FIELDS:
            if field in record:
                keys.append((i, out, None))
                items.append((prompt, record[field]))
        for j, response in enumerate(record.get("responses", [])):
            keys.append((i, "rewards", j))
            items.append((prompt, response))
    return keys, items


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.score", description=__doc__)
    parser.add_argument("--workdir", "-w", required=True, help="a reward-model run")
    parser.add_argument("--step", type=cli.ranged(int, ">= 0"), help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", "-p")
    parser.add_argument("--system", default="", help="system message the prompt is asked under")
    parser.add_argument("--response", "-r", action="append", default=[], help="may be repeated")
    parser.add_argument("--jsonl", help="score every record of this file instead")
    parser.add_argument("--batch-size", type=cli.ranged(int, ">= 1"), default=16, help="responses scored at once")
    args = parser.parse_args(argv)
    if bool(args.jsonl) == bool(args.prompt):
        parser.error("give either --prompt with --response, or --jsonl")
    if args.prompt and not args.response:
        parser.error("--prompt needs at least one --response")
    from flaxgpt.rewards import score

    if args.prompt:
        records = [{"system": args.system, "prompt": args.prompt, "responses": args.response}]
    else:  # the 'prompts' schema: objects with a string 'prompt' (and 'system'), in UTF-8
        records = read_jsonl(args.jsonl, "prompts", skip=None)[0]
    keys, items = _items(records, args.jsonl or "--prompt")
    host_allocator.tune_host_allocator()
    loaded = runs.load(args.workdir, args.step)
    if loaded.model.cfg.output != "scalar":
        raise ConfigError(
            f"{args.workdir} is a language model (model.output='{loaded.model.cfg.output}'), not a reward model"
        )
    with runs.logical_context(loaded):
        rewards = score(loaded.model, loaded.params, loaded.tokenizer, items, args.batch_size)
    for (i, out, j), reward in zip(keys, rewards):
        if j is None:
            records[i][out] = float(reward)
        else:
            records[i].setdefault(out, []).append(float(reward))
    if args.prompt:
        for response, reward in zip(args.response, records[0]["rewards"]):
            print(json.dumps({"response": response, "reward": reward}))
    else:
        for record in records:
            print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
