"""`python -m flaxgpt.serve --workdir RUN [--step N] [--host 127.0.0.1] [--port 8000]`

Serves the run's checkpoint (default: the latest) over OpenAI's API (/v1/chat/completions,
/v1/completions, /v1/models), /health, and a chat page at / whose answers, ratings,
regenerations and edits are stored in RUN/feedback.sqlite (--db to choose).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from flaxgpt import inference, perf
from flaxgpt.errors import UserError
from flaxgpt.serve.app import Service, create_app
from flaxgpt.serve.engine import SlotEngine
from flaxgpt.serve.store import FeedbackStore


def build_service(
    workdir: str,
    step: int | None = None,
    *,
    db: str | None = None,
    name: str | None = None,
    api_key: str | None = None,
    slots: int = 8,
    max_queue: int = 64,
) -> Service:
    """The run's model behind a started engine, with its feedback database."""
    loaded = inference.load(workdir, step)
    engine = SlotEngine(
        loaded.model,
        loaded.params,
        pad_id=loaded.tokenizer.pad_id,
        step=loaded.step,
        slots=slots,
        max_queue=max_queue,
        context=lambda: inference.logical_context(loaded),
    ).start()
    store = FeedbackStore(db or os.path.join(workdir, "feedback.sqlite"))
    name = name or os.path.basename(os.path.normpath(workdir))
    return Service(engine, loaded.tokenizer, name, api_key=api_key, store=store)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxgpt.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", "-w", required=True)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", help="feedback database (default: WORKDIR/feedback.sqlite)")
    parser.add_argument("--name", help="the model's name in the API (default: the workdir's name)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FLAXGPT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $FLAXGPT_API_KEY; none: no key needed)",
    )
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the slots (more: 503)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.slots < 1 or args.max_queue < 0:
            raise UserError("--slots must be at least 1 and --max-queue at least 0")
        perf.tune_host_allocator()
        service = build_service(
            args.workdir,
            args.step,
            db=args.db,
            name=args.name,
            api_key=args.api_key,
            slots=args.slots,
            max_queue=args.max_queue,
        )
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"flaxgpt serve: {service.name} (step {service.engine.step}) on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    finally:
        service.engine.stop()
        service.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
