"""The embedded router's command line: ``python -m graven.router.proxy``. Parses the
arguments, picks the event loop, and runs the supervisor or a worker
(``graven.router.workers``); the package docstring lists the exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

from graven.model import is_valid_name
from graven.router.base import split_address

EXIT_BIND: Final = 3
EXIT_STATE: Final = 4


def _parse_listen(text: str) -> tuple[str, int]:
    host, port = split_address(text)
    return host, port


def _admin_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _raise_fd_limit() -> None:
    # Each proxied request holds two descriptors; use all the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die(code: int, message: str) -> int:
    print(f"graven-router: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the proxy until SIGTERM; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m graven.router.proxy", description="graven's embedded HTTP router"
    )
    parser.add_argument("--service", required=True)
    parser.add_argument("--listen", required=True, type=_parse_listen, metavar="HOST:PORT")
    parser.add_argument("--admin", metavar="SOCKET", help="the admin API's unix socket")
    parser.add_argument("--state", metavar="FILE", help="where the backend set is kept")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="proxy processes sharing the port (N > 1: this one supervises them)",
    )
    parser.add_argument(
        "--pid-file",
        metavar="FILE",
        help="the router's record (pid, port, start time); a worker that outlives its "
        "supervisor starts a new one and rewrites it, holding --lock-file",
    )
    parser.add_argument("--lock-file", metavar="FILE", help="serialises changes to --pid-file")
    # Internal: a listening socket inherited from a worker reviving its supervisor, and
    # a worker's CONTROL,LISTEN[,HANDOFF] descriptors.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-fds", help=argparse.SUPPRESS)
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=os.environ.get("GRAVEN_ROUTER_LOOP", "auto"),
        help="event loop: uvloop when installed (auto, the default; GRAVEN_ROUTER_LOOP "
        "sets it too), or the standard library's (asyncio)",
    )
    args = parser.parse_args(argv)
    if not is_valid_name(args.service):
        parser.error(f"--service: not a valid service name: {args.service!r}")
    if args.admin is None or args.state is None:
        parser.error("--admin and --state are required")
    if (args.pid_file is None) != (args.lock_file is None):
        parser.error("--pid-file and --lock-file go together")
    if not 1 <= args.workers <= 64:
        parser.error(f"--workers: expected 1-64 (got {args.workers})")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s graven-router[%(process)d] %(levelname)s %(message)s",
    )
    os.umask(0o077)  # the admin socket and state file are for the owner alone
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit()
    try:
        loop_factory = _loop_factory(args.loop)
    except ImportError:
        return _die(2, "--loop uvloop: uvloop is not installed (pip install uvloop)")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_dispatch(args))


async def _dispatch(args: argparse.Namespace) -> int:
    # Every configuration runs a supervisor: the process holding the port never runs
    # proxy code, so a proxy that dies leaves new connections queued, not refused.
    from graven.router import workers

    host, port = args.listen
    options = workers.RouterOptions(
        service=args.service,
        host=host,
        port=port,
        admin=Path(args.admin),
        state=Path(args.state),
        workers=args.workers,
        loop=args.loop,
        pid_file=Path(args.pid_file) if args.pid_file else None,
        lock_file=Path(args.lock_file) if args.lock_file else None,
    )
    if args.worker_fds is not None:
        return await workers.run_worker(options, args.worker_fds)
    return await workers.run_supervisor(options, args.listen_fd)


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's transports are C: about 15% more requests per second through the
    proxy than the standard library's (bench/RESULTS.md). Both pass the same tests."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise
        return asyncio.new_event_loop
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
