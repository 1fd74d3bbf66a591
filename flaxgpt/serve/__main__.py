"""`python -m flaxgpt.serve --workdir RUN [--step N] [--host 127.0.0.1] [--port 8000]`

Serves the run's checkpoint (default: the latest) over OpenAI's API (/v1/chat/completions,
/v1/completions, /v1/models), /health, and a chat page at / whose answers, ratings,
regenerations and edits are stored in RUN/feedback.sqlite (--db to choose). In a run that
promotes checkpoints (the online learner's, RUN/promoted.json), only promoted ones are served.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from collections.abc import Sequence

from etils import epath

from flaxgpt import cli, fileio, host_allocator, online, runs
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
    cfg, _ = runs.read_run(workdir)
    if cfg.model.output != "logits":
        raise UserError(f"{workdir} holds a reward model (model.output={cfg.model.output!r}): serve a language model")
    loaded = runs.load(workdir, step if step is not None else online.promoted_step(workdir))
    store = FeedbackStore(db or os.path.join(workdir, "feedback.sqlite"))  # before the engine's thread starts
    try:
        engine = SlotEngine(
            loaded.model,
            loaded.params,
            pad_id=loaded.tokenizer.pad_id,
            step=loaded.step,
            slots=slots,
            max_queue=max_queue,
            context=lambda: runs.logical_context(loaded),
        ).start()
    except BaseException:
        store.close()
        raise
    name = name or os.path.basename(os.path.normpath(workdir))
    return Service(engine, loaded.tokenizer, name, api_key=api_key, store=store, placement=(loaded.mesh, loaded.rules))


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for the server, or a UserError naming them (a port in use,
    an address not of this machine) before anything says where the server is."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host {host}: not an address to listen on ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def newest_checkpoint(workdir: str) -> int | None:
    """The run's newest finished checkpoint step, found without opening a checkpoint manager; in
    a run that promotes checkpoints (the online learner), its newest promoted one."""
    promoted = online.promoted_step(workdir)
    if promoted is not None:
        return promoted
    directory = os.path.join(workdir, "checkpoints")
    names = [p.name for p in epath.Path(directory).iterdir()] if fileio.exists(directory) else []
    return max((int(n) for n in names if n.isdigit()), default=None)


def reload_newer(service: Service, workdir: str) -> bool:
    """Load the run's newest (promoted) checkpoint into the engine if it is newer than the one served;
    requests in flight finish on the old parameters, later ones get the new."""
    newest = newest_checkpoint(workdir)
    engine = service.engine
    if newest is None or newest <= max(engine.step, engine.pending_step or -1):
        return False
    cfg, _ = runs.read_run(workdir)
    params, step = runs.restore_params(workdir, cfg, newest, engine.model.cfg, *service.placement)
    engine.reload(params, step)
    print(f"flaxgpt serve: step {step} loaded; it answers from the next request on", flush=True)
    return True


def watch(service: Service, workdir: str, every: float, stop: threading.Event) -> None:
    """Check for a newer checkpoint every `every` seconds until `stop` is set."""
    while not stop.wait(every):
        try:
            reload_newer(service, workdir)
        except Exception as e:  # a checkpoint being written, or a bad one: keep serving the current
            print(f"flaxgpt serve: not reloaded ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m flaxgpt.serve", description=__doc__)
    parser.add_argument("--workdir", "-w", required=True)
    parser.add_argument("--step", type=cli.ranged(int, ">= 0"), help="checkpoint step (default: the latest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=cli.ranged(int, "[0, 65535]"), default=8000, help="0: any free port")
    parser.add_argument("--db", help="feedback database (default: WORKDIR/feedback.sqlite)")
    parser.add_argument("--name", help="the model's name in the API (default: the workdir's name)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FLAXGPT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $FLAXGPT_API_KEY; none: no key needed)",
    )
    parser.add_argument("--slots", type=cli.ranged(int, ">= 1"), default=8, help="requests decoded together")
    parser.add_argument(
        "--max-queue", type=cli.ranged(int, ">= 0"), default=64, help="requests waiting beyond the slots (more: 503)"
    )
    parser.add_argument(
        "--reload-every",
        type=cli.ranged(float, ">= 0"),
        default=30.0,
        help="seconds between checks for a newer checkpoint of the run, "
        "served once found (0: never; never with --step)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    host_allocator.tune_host_allocator()
    sock = listen(args.host, args.port)
    try:
        service = build_service(
            args.workdir,
            args.step,
            db=args.db,
            name=args.name,
            api_key=args.api_key,
            slots=args.slots,
            max_queue=args.max_queue,
        )
    except BaseException:
        sock.close()
        raise
    try:
        serve(service, sock, args)
    finally:
        sock.close()
        service.engine.stop()
        service.store.close()
    return 0


def serve(service: Service, sock: socket.socket, args: argparse.Namespace) -> None:
    """Serve on the bound socket until stopped (Ctrl-C, SIGTERM), watching for newer checkpoints."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(f"flaxgpt serve: {service.name} (step {service.engine.step}) on http://{where}:{port}", flush=True)
    stop = threading.Event()
    if args.reload_every > 0 and args.step is None:
        threading.Thread(target=watch, args=(service, args.workdir, args.reload_every, stop), daemon=True).start()
    try:
        config = uvicorn.Config(create_app(service), log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(cli.run(main))
