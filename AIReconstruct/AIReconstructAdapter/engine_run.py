"""Run the engine in a separate process and follow it through its JSON progress lines.

The panel's jobs (``jobs.py``) are :class:`BackgroundJob` s; Slicer's UI polls them from a timer, so it stays responsive. The process is
a worker that stays for the next run (``aireconstruct serve``), so only the first run pays Python's
start-up, the imports and the network's compilation. Cancel signals the worker, which stops the
run and removes its partial output (a worker that does not stop in time is killed); a crash or an
out-of-memory kill of the engine cannot take Slicer down, and the next run starts a fresh worker.
The scene changes only when a run succeeds: inputs are written to a temporary folder (in memory
where the system has room there), the result is read back from it, and the folder is removed
whatever happens.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from AIReconstructLib.errors import AIReconstructError
from AIReconstructLib.io import remove_stale_folders

ENGINE_FOLDER = Path(__file__).resolve().parents[1]  # the folder holding AIReconstructLib
MEMORY_FOLDER = Path("/dev/shm")  # Linux's file system in memory
EXCHANGE_PREFIX = "AIReconstruct-"


def exchange_folder(size_bytes: int, memory_folder: Path = MEMORY_FOLDER) -> Path:
    """A new temporary folder for the files a run exchanges with the engine (inputs of
    ``size_bytes``): in ``memory_folder`` where it has room for four times that, so that neither
    Slicer nor the engine waits on the disk (a large CT otherwise stalls on its write-back now and
    then), else in the system's temporary folder. Folders that ended processes left in memory are
    removed first."""
    prefix = f"{EXCHANGE_PREFIX}{os.getpid()}-"
    with contextlib.suppress(OSError):
        if os.access(memory_folder, os.W_OK) and shutil.disk_usage(memory_folder).free > 4 * size_bytes:
            remove_stale_folders(memory_folder, EXCHANGE_PREFIX)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=memory_folder))
    return Path(tempfile.mkdtemp(prefix=prefix))


@dataclass
class RunState:
    """What a run is doing: ``running``, ``done``, ``failed`` or ``cancelled``."""

    status: str = "running"
    progress: float = 0.0
    message: str = "starting"
    error: str = ""
    result: dict = field(default_factory=dict)
    log: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status != "running"


def engine_environment(base: dict | None = None) -> dict:
    """The environment for the engine process: ``base`` (default: ours) with the engine importable."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_FOLDER), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class EngineWorker:
    """One ``aireconstruct serve`` process: it runs requests one after another, so that a run after
    the first skips Python's start-up, the imports and the network's compilation. It ends when its
    stdin closes (Slicer exits) or after ten idle minutes."""

    def __init__(self, python: str | None, env: dict):
        self.env = env
        self.command = [python or sys.executable, "-m", "AIReconstructLib", "serve"]
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: collections.deque = collections.deque(maxlen=200)
        threading.Thread(target=self._pump, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, arguments: list[str]) -> None:
        self.process.stdin.write(json.dumps(arguments) + "\n")
        self.process.stdin.flush()

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Let the worker end (its stdin closes) without waiting for it (the panel must not freeze);
        it is killed if it has not ended within the grace time."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        threading.Thread(target=self._kill_after, args=(grace_seconds,), daemon=True).start()

    def _kill_after(self, seconds: float) -> None:
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WarmEngine:
    """Keeps the last idle :class:`EngineWorker` for the next run. A run takes it when it was started
    with the same Python and environment, and otherwise starts a fresh worker (so two runs at once
    get two workers); a run that ends gives its worker back, replacing the one kept before."""

    def __init__(self):
        self.idle: EngineWorker | None = None

    def worker(self, python: str | None, env: dict) -> EngineWorker:
        idle, self.idle = self.idle, None
        if idle is not None and idle.alive() and idle.command[0] == (python or sys.executable) and idle.env == env:
            return idle
        if idle is not None:
            idle.stop()
        return EngineWorker(python, env)

    def prepare(self, python: str | None = None, env: dict | None = None) -> None:
        """Have a worker ready (started now if none is kept) so that the next run finds it warm."""
        self.give_back(self.worker(python, engine_environment(env)))

    def give_back(self, worker: EngineWorker) -> None:
        if not worker.alive():
            return
        if self.idle is not None:
            self.idle.stop()
        self.idle = worker

    def shutdown(self) -> None:
        """End the idle worker (the module's cleanup)."""
        if self.idle is not None:
            self.idle.stop()
            self.idle = None


WARM_ENGINE = WarmEngine()


class EngineRun:
    """``aireconstruct <arguments> --json-progress`` in a warm engine worker, followed through its
    JSON lines."""

    def __init__(self, arguments: list[str], python: str | None = None, env: dict | None = None):
        self.arguments = list(arguments)
        self.python, self.env = python, engine_environment(env)
        self.state = RunState()
        self.worker: EngineWorker | None = None
        self._cancel_requested = False

    def start(self) -> None:
        self.worker = WARM_ENGINE.worker(self.python, self.env)
        try:
            self.worker.send(self.arguments)
        except OSError:  # the kept worker ended meanwhile: a fresh one
            self.worker = EngineWorker(self.python, self.env)
            self.worker.send(self.arguments)

    def poll(self) -> RunState:
        """Read what the engine has printed so far; never blocks."""
        if self.state.finished:
            return self.state
        self._drain()
        if not self.state.finished and not self.worker.alive():
            time.sleep(0.05)  # let the reader threads drain the last lines
            self._drain()
            if not self.state.finished:
                self._ended_without_result()
        if self.state.finished:
            WARM_ENGINE.give_back(self.worker)
        return self.state

    def _drain(self) -> None:
        while not self.state.finished:
            try:
                line = self.worker.lines.get_nowait()
            except queue.Empty:
                return
            self._handle(line)

    def _handle(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self.state.log.append(line)
            return
        if "progress" in event:
            self.state.progress, self.state.message = event["progress"], event.get("message", "")
            self.state.log.append(f"{event['progress'] * 100:5.1f}% {self.state.message}")
        elif event.get("done"):
            self.state.status, self.state.progress, self.state.result = "done", 1.0, event
        elif "error" in event:
            self.state.status = "cancelled" if event.get("cancelled") else "failed"
            self.state.error = event["error"]

    def _ended_without_result(self) -> None:
        if self._cancel_requested:
            self.state.status, self.state.error = "cancelled", "Cancelled by the user"
            return
        last = next((line for line in reversed(self.worker.stderr) if line.strip()), "no message")
        self.state.status = "failed"
        self.state.error = (f"The engine stopped unexpectedly (exit code {self.worker.process.returncode}): "
                            f"{last.strip()[:300]}")

    def cancel(self, grace_seconds: float = 10.0) -> None:
        """Ask the engine to stop this run (it cleans up and its worker stays for the next run);
        kill the worker if the run has not ended within the grace time."""
        if self.worker is None or self.poll().finished:
            return
        self._cancel_requested = True
        self.worker.process.terminate()
        deadline = time.monotonic() + grace_seconds
        while not self.poll().finished and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.state.finished:
            self.worker.process.kill()
            self.worker.process.wait()
            self.poll()


class BackgroundJob:
    """An engine run on files in a temporary folder (``workdir``), which is removed whatever happens
    once the run ends; subclasses start the engine and take the result in ``_on_success``."""

    workdir: Path | None = None
    engine: EngineRun | None = None

    def poll(self) -> RunState:
        """Progress so far; on success the result is taken (once)."""
        state = self.engine.poll()
        if state.finished and self.workdir is not None:
            try:
                if state.status == "done":
                    self._on_success(state.result)
            except (AIReconstructError, OSError, KeyError, StopIteration) as error:  # unreadable result
                state.status, state.error = "failed", str(error)
            finally:
                self._remove_workdir()
        return state

    def _on_success(self, result: dict) -> None:
        raise NotImplementedError

    def _start_in_hidden_folder(self, parent: Path, prefix: str, arguments) -> None:
        """Start the engine with ``arguments(workdir)``, its work folder a hidden one made in ``parent``
        (where the installed models are, so that results move into place), removed if it fails."""
        parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            self.engine = EngineRun(arguments(self.workdir), self.python, self.env)
            self.engine.start()
        except BaseException:
            self._remove_workdir()
            raise

    def cancel(self) -> None:
        if self.engine is not None:
            self.engine.cancel()

    def wait(self, timeout: float = 3600.0, interval: float = 0.2) -> RunState:
        """Block until the run ends (for scripts and tests; the panel polls from a timer instead)."""
        deadline = time.monotonic() + timeout
        while not self.poll().finished:
            if time.monotonic() > deadline:
                self.cancel()
            time.sleep(interval)
        return self.engine.state

    def _remove_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
