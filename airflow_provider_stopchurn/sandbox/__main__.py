"""Command line: run the StopChurn sandbox until interrupted.

Example::

    python -m airflow_provider_stopchurn.sandbox --port 8765 --token demo-key --seed 7 --throttle-rate 0.05
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from airflow_provider_stopchurn.sandbox.server import FaultConfig, SandboxServer


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m airflow_provider_stopchurn.sandbox``."""
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_stopchurn.sandbox",
        description="Run a local server that behaves like StopChurn's API (for demos, tests, offline work).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind, 0 for any free port (default: 8765)")
    parser.add_argument("--token", default="demo-key", help="API key clients must send (default: demo-key)")
    parser.add_argument("--record", action="store_true", help="record applied updates (GET /_sandbox/received)")
    faults = parser.add_argument_group("fault injection (shares of API requests, 0..1)")
    faults.add_argument("--seed", type=int, default=0, help="seed of the fault sequence")
    faults.add_argument("--error-rate", type=float, default=0.0, help="answered 500, nothing applied")
    faults.add_argument("--throttle-rate", type=float, default=0.0, help="answered 429 with Retry-After")
    faults.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds of a 429")
    faults.add_argument("--drop-rate", type=float, default=0.0, help="connection closed, nothing applied")
    faults.add_argument(
        "--drop-after-apply-rate", type=float, default=0.0, help="applied, then connection closed (lost ack)"
    )
    faults.add_argument("--slow-rate", type=float, default=0.0, help="delayed by --slow-seconds")
    faults.add_argument("--slow-seconds", type=float, default=2.0, help="delay of a slow request")
    faults.add_argument("--latency", type=float, default=0.0, help="seconds added to every API request")
    faults.add_argument("--html-errors", action="store_true", help="send injected 500s as HTML pages")
    faults.add_argument(
        "--html-ok-rate", type=float, default=0.0, help="answered 200 with an HTML page (a proxy), nothing applied"
    )
    faults.add_argument(
        "--max-body-bytes", type=int, default=None, help="answer 413 to larger request bodies, nothing applied"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Start the sandbox, print its URL on one line, serve until SIGINT or SIGTERM; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        faults = FaultConfig(
            seed=args.seed,
            error_rate=args.error_rate,
            throttle_rate=args.throttle_rate,
            retry_after=args.retry_after,
            drop_rate=args.drop_rate,
            drop_after_apply_rate=args.drop_after_apply_rate,
            slow_rate=args.slow_rate,
            slow_seconds=args.slow_seconds,
            latency=args.latency,
            html_errors=args.html_errors,
            html_ok_rate=args.html_ok_rate,
            max_body_bytes=args.max_body_bytes,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(
            f"warning: binding {args.host}, which is not a loopback address: anyone who can reach this "
            "machine can use the sandbox and its /_sandbox/ inspection API",
            file=sys.stderr,
        )
    sandbox = SandboxServer(
        token=args.token,
        host=args.host,
        port=args.port,
        faults=faults,
        record=args.record,
        freeze_gc=True,  # this process runs only the sandbox
    )
    try:
        sandbox.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print(f"StopChurn sandbox listening on {sandbox.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
