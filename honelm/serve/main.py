"""`honelm serve RUN|CHECKPOINT [...]`: the options, the models loaded once, uvicorn until SIGTERM or Ctrl-C.

The HTTP stack is FastAPI on uvicorn (the `serve` extra): both well kept, asyncio-native (server-sent
events for streaming without threads per client), and what OpenAI-compatible servers commonly use.
On SIGTERM uvicorn stops accepting connections, lets the requests in flight finish (streams
included, up to --shutdown-timeout seconds), then the engine's worker finishes its last batch and
the command returns 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import Any

from honelm import runtime as rt
from honelm.errors import HonelmError
from honelm.serve.engine import Engine, load_served

try:  # the serve extra: `honelm serve --help` works without it, serving says what to install
    import uvicorn

    from honelm.serve.api import build_app
    MISSING = ""
except ImportError as missing:
    MISSING = missing.name or str(missing)

API_KEY_ENV = "HONELM_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="honelm serve",
        description="Serve a run's best model (or a checkpoint directory) over HTTP: the OpenAI API "
        "(/v1/chat/completions with SSE streaming, /v1/completions, /v1/models) for a causal LM, /v1/classify for a "
        "classifier, regressor or reward model, /health, and a web page at / (chat or classify; the run's report). "
        "Requests arriving together are batched. Needs the serve extra: pip install 'honelm[serve]'.")
    p.add_argument("models", nargs="+", metavar="RUN|CHECKPOINT",
                   help="a run directory (its best/ model; its report.html/md is linked from the page) or a model "
                   "directory: a causal LM, or a sequence classifier / regressor / reward model. Several may be given "
                   "(each gets its own batching worker); a request names its model in `model`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "anything else should come with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--name", action="append", default=[], help="the model id clients send as `model` and /v1/models "
                   "lists (default: the run's or model directory's name); repeat it to name several models, in order")
    p.add_argument("--api-key", default=os.environ.get("HONELM_API_KEY", ""),
                   help=f"require `Authorization: Bearer KEY` on /v1/* and /report (401 otherwise); default: "
                   f"${API_KEY_ENV}, else none")
    p.add_argument("--max-batch", type=int, default=32, help="most rows run in one batch: classification inputs, "
                   "or generated choices (default 32); also the largest n a request may ask")
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="after the first request of a batch, the "
                   "longest the worker waits for requests the server is still reading (default 20 ms); queued ones "
                   "join at once, and a lone request runs without waiting; 0 = only what is already queued")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated when a request names no "
                   "max_tokens (default 256; never past the context)")
    p.add_argument("--seed", type=int, default=0, help="first seed of sampled batches whose requests name none "
                   "(seed, seed+1, ...; default 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's own choice)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM/Ctrl-C, seconds to let the "
                   "requests in flight finish before they are cut (default 30)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning; info logs every request)")
    return p


def _check(args: argparse.Namespace) -> None:
    for name, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--threads", args.threads, 0)):
        if value < low:
            raise HonelmError(f"{name} must be >= {low}, got {value}")
    if args.batch_window_ms < 0 or args.shutdown_timeout < 0:
        raise HonelmError("--batch-window-ms and --shutdown-timeout must be >= 0")
    if MISSING:
        raise HonelmError(f"honelm serve needs the serve extra ({MISSING} is not installed): pip install 'honelm[serve]'")
    if len(args.name) > len(args.models):
        raise HonelmError(f"{len(args.name)} --name for {len(args.models)} model(s): give at most one per model")


def main(argv: list[str]) -> dict[str, Any]:
    """`honelm serve MODEL [options]`; returns when the server has stopped."""
    args = parser().parse_args(argv)
    _check(args)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    device = rt.setup(args.threads).device
    engines = []
    for i, spec in enumerate(args.models):
        served = load_served(spec, args.name[i] if i < len(args.name) else "", say)
        served.model.to(device)
        engines.append(Engine(served, args.max_batch, args.batch_window_ms / 1000, args.seed))
        say(f"honelm serve: '{served.name}': {'causal LM' if served.kind == 'lm' else 'classifier'} from {served.path}")
    try:
        app = build_app(engines, args.api_key, args.max_tokens)
    except ValueError as err:
        raise HonelmError(str(err)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        say(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the model")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    stopped: list[int] = []

    def note(sig: int, frame: FrameType | None) -> None:
        stopped.append(sig)  # uvicorn passes the signal on after its graceful shutdown: end normally, not killed

    signal.signal(signal.SIGTERM, note)
    say(f"honelm serve: http://{args.host}:{args.port}/  (OpenAI API under /v1{', API key required' if args.api_key else ''})")
    server.run()
    if not server.started:
        raise HonelmError(f"could not serve on {args.host}:{args.port} (see the error above: a port in use?)")
    batches = sum(len(e.batcher.batches) for e in engines)
    say(f"honelm serve: stopped{' on SIGTERM' if stopped else ''}; {batches} batches run")
    return {"batches": batches}
