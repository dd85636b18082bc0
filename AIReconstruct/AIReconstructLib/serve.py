"""The engine as a long-lived worker (``aireconstruct serve``), so that runs after the first skip
Python's start-up, the imports and the network's compilation.

The Slicer module keeps one such process. It writes one request per line on the worker's stdin, a
JSON list of command-line arguments (``["segment", "in.nrrd", "-m", "model", "-o", "out"]``); the
worker runs it exactly as ``aireconstruct`` would with ``--json-progress``, so each request ends
with one ``{"done": ...}`` or ``{"error": ...}`` line on stdout. SIGTERM cancels the running
request (its output folder is left as it was) and the worker waits for the next; while idle, or
when it came too late to cancel the request (its answer was already on its way), it ends the
worker. An unexpected failure ends the worker as it would end a one-off run (its caller starts a
fresh one), so no half-broken state is carried into the next request.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import io
import json
import os
import queue
import signal
import sys
import threading

from .errors import Cancelled


def _read_lines(fd: int, lines: queue.Queue) -> None:
    """Queue the lines arriving on ``fd``, then ``None`` when it closes (the caller has gone). Reads
    the descriptor, not ``sys.stdin``: a child that a library forks meanwhile closes ``sys.stdin``
    and would wait forever on its lock if this thread held it."""
    pending = b""
    while chunk := os.read(fd, 65536):
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            lines.put(line.decode("utf-8", "replace"))
    lines.put(None)


def parse_request(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace:
    """The parsed command of one request line; ``ValueError`` with argparse's own message if invalid."""
    try:
        arguments = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"a request is a JSON list of arguments on one line ({error})") from None
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise ValueError("a request is a JSON list of argument strings")
    if arguments[:1] == ["serve"]:
        raise ValueError("serve cannot be requested from a worker")
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            args = parser.parse_args(arguments)
    except SystemExit:  # argparse's usage error (or --help)
        last = next((line for line in reversed(messages.getvalue().splitlines()) if line.strip()), "invalid")
        raise ValueError(last.split("error: ", 1)[-1]) from None
    args.json_progress = True
    return args


def _give_memory_back() -> None:
    """Return the freed heap of the last request to the system (glibc keeps it otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def serve(parser: argparse.ArgumentParser, reporter, run_command, idle_exit_seconds: float) -> None:
    """Run requests from stdin with ``run_command(args, reporter)`` until stdin closes or none comes
    for ``idle_exit_seconds``."""
    busy = threading.Event()

    def on_signal(signum, frame):
        if busy.is_set():
            reporter.cancelled = True
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(sys.stdin.fileno(), lines), daemon=True).start()
    for module in ("pipeline", "export", "surfaces"):  # what a segmentation needs, while no request waits
        importlib.import_module(f"{__package__}.{module}")
    while True:
        try:
            line = lines.get(timeout=idle_exit_seconds)
        except queue.Empty:
            return
        if line is None:
            return
        if not line.strip():
            continue
        try:
            args = parse_request(parser, line)
        except ValueError as error:
            print(json.dumps({"error": f"Invalid request: {error}", "cancelled": False}), flush=True)
            continue
        reporter.cancelled = False
        busy.set()
        try:
            code = run_command(args, reporter)
        finally:
            busy.clear()
        if reporter.cancelled and code != Cancelled.exit_code:
            return  # the SIGTERM found nothing left to cancel: it ends the worker, as while idle
        _give_memory_back()
