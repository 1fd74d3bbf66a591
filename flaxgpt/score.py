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
from flaxgpt.data.jsonl import DataError


def _prompt(record: dict, where: str) -> list[dict]:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise DataError(f"{where}: expected an object with a string 'prompt'")
    system = record.get("system")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": record["prompt"]}]


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

    host_allocator.tune_host_allocator()
    loaded = runs.load(args.workdir, args.step)
    if loaded.model.cfg.output != "scalar":
        raise ConfigError(
            f"{args.workdir} is a language model (model.output='{loaded.model.cfg.output}'), not a reward model"
        )
    if args.prompt:
        records = [{"system": args.system, "prompt": args.prompt, "responses": args.response}]
    else:
        with open(args.jsonl, encoding="utf-8") as f:
            records = []
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{args.jsonl}:{number}: not valid JSON ({e.msg})") from e
    keys = []  # (record index, output key, index in a list or None)
    items = []
    for i, record in enumerate(records):
        where = f"{args.jsonl}: record {i + 1}" if args.jsonl else "--prompt"
        prompt = _prompt(record, where)
        fields = [("response", "reward"), ("chosen", "reward_chosen"), ("rejected", "reward_rejected")]
        found = False
        for field, out in fields:
            if isinstance(record.get(field), str):
                keys.append((i, out, None))
                items.append((prompt, record[field]))
                found = True
        for j, response in enumerate(record.get("responses") or []):
            keys.append((i, "rewards", j))
            items.append((prompt, response))
            found = True
        if not found:
            raise DataError(f"{where}: no 'response', 'responses' or 'chosen'/'rejected' to score")
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
