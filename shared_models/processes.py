"""Flower's processes on either side: executables, environment, logs, stopping a tree.

Used by the coordinator (:mod:`server.superlink`, :mod:`server.deployment`) and by devices
(:mod:`client.deployment`), which must not import ``server``.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["BIN", "TAIL_LINES", "LOG_MAX_BYTES", "LOG_BACKUPS", "LogPump", "flower_environment", "free_port",
           "descendants", "terminate_tree", "run_foreground", "PULL_BACKOFF_S", "PULL_MAX_TIME_S",
           "shorten_object_pull_backoff"]

log = logging.getLogger("fedaffect.processes")


def _find_bin() -> Path:
    """The folder of ``flwr`` and ``flower-superlink``: this interpreter's, else PATH's."""
    here = Path(sys.executable).parent  # the venv's bin when run with the venv's python
    if (here / "flower-superlink").exists() and (here / "flwr").exists():
        return here
    found = shutil.which("flower-superlink")
    return Path(found).parent if found else here


#: Folder of Flower's executables (also flower-superexec, flwr-serverapp, flwr-clientapp,
#: flwr-simulation, which SuperLinks and SuperNodes start by name from PATH).
BIN = _find_bin()
TAIL_LINES = 40
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def flower_environment(home: Path, tmp: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry or update check, ``FLWR_HOME`` =
    ``home``, this venv's Flower executables first on PATH, Ray's files under ``tmp``."""
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    if tmp is not None:
        env["RAY_TMPDIR"] = str(tmp)
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[ppid].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


def terminate_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``proc`` (started in its own session), its process group and descendants.

    The SuperLink starts SuperExec in a new session, which starts ``flwr-simulation``,
    which starts Ray; all of them are descendants, found through /proc before anything
    is signalled (they would be re-parented once their parents exit).
    """
    pids = [proc.pid, *descendants(proc.pid)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.2)
        else:
            continue
        break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


#: A service's log file (``superlink.out``, ``supernode.log``, a run's log) is rotated when it
#: would pass this size; ``LOG_BACKUPS`` older files are kept (``.1`` the newest).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """The standard library's size-rotating log file, writing lines as they are and keeping
    the last write error for the caller instead of printing a traceback to stderr."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(message)s"))
        self.error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.error = sys.exc_info()[1]

    def write(self, line: str) -> None:
        self.error = None
        self.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        if self.error is not None:
            raise self.error


class LogPump:
    """Read a process's output line by line into a rotating log file, a tail and the logger.

    The file is rotated at ``max_bytes`` (default :data:`LOG_MAX_BYTES`), keeping ``backups``
    older files (``path.1`` ... ``path.N``), so a SuperLink or SuperNode that runs for months
    cannot fill its disk; ``max_bytes = 0`` never rotates (a run's own log, which two pumps
    may share). A log file that cannot be opened or written (full disk) or a
    callback that raises is warned about once and the output is still read to its end, so
    the process never blocks on a full pipe."""

    def __init__(self, stream, path: Path, tail: collections.deque, prefix: str,
                 on_line: Callable[[str], None] | None = None, *,
                 max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self._stream, self._path, self._tail, self._prefix = stream, path, tail, prefix
        self._on_line = on_line
        self._max_bytes, self._backups = max_bytes, backups
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        # The pipe must be drained whatever happens to the file or the callback: a process
        # whose output nobody reads blocks on its next write once the pipe buffer is full
        # (a frozen SuperLink or SuperNode that systemd never restarts).
        out, problems = None, set()

        def trouble(what: str, err: BaseException) -> None:
            if what not in problems:  # once per kind, not once per line
                problems.add(what)
                log.warning("%s: %s (%s); the process's output is still read", self._path, what, err)

        try:
            out = _RotatingLog(self._path, self._max_bytes, self._backups)
        except OSError as err:
            trouble("cannot open the log file", err)
        try:
            for raw in iter(self._stream.readline, b""):
                line = _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip()
                if out is not None:
                    try:
                        out.write(line)
                    except Exception as err:  # noqa: BLE001 - a full disk: keep reading, the tail still works
                        trouble("cannot write the log file", err)
                if line.strip():
                    self._tail.append(f"{self._prefix}{line}")
                    log.debug("%s%s", self._prefix, line)
                    if self._on_line is not None:
                        try:
                            self._on_line(line)
                        except Exception as err:  # noqa: BLE001 - e.g. a closed terminal pipe
                            trouble("the line callback failed", err)
        finally:
            if out is not None:
                try:
                    out.close()
                except OSError:
                    pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def _die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM when the parent dies, even by SIGKILL,
    so a killed ``fedaffect server start`` does not leave an orphaned SuperLink."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_foreground(cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path,
                   ready: Callable[[subprocess.Popen, collections.deque], None] | None = None,
                   echo: Callable[[str], None] | None = None,
                   on_exit: Callable[[int, collections.deque], None] | None = None) -> int:
    """Run a Flower service (SuperLink, SuperNode) in the foreground until it exits or
    this process gets SIGTERM/SIGINT, which stop it and everything it started.

    Parameters
    ----------
    cmd : list of str
        The command; it runs in its own session.
    env, cwd
        Its environment and working directory.
    log_path : Path
        File its output is appended to.
    ready : callable, optional
        ``ready(proc, tail)`` waits until the service is up (raises if it is not).
    echo : callable, optional
        Receives every output line.
    on_exit : callable, optional
        ``on_exit(returncode, tail)`` when the service exits by itself (e.g. to raise a
        clear error for a known exit code).

    Returns
    -------
    int
        0 after a stop by signal, else the service's exit code.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    pump = LogPump(proc.stdout, log_path, tail, "", on_line=echo)
    stopping = {"signal": 0}

    def stop(signum, _frame) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            try:
                ready(proc, tail)
            except RuntimeError:
                if not stopping["signal"]:
                    raise
        while proc.poll() is None and not stopping["signal"]:
            time.sleep(0.2)
        if stopping["signal"]:
            log.info("signal %d: stopping %s", stopping["signal"], Path(cmd[0]).name)
            terminate_tree(proc)
            return 0
        pump.join(timeout=5)
        if on_exit is not None:
            on_exit(int(proc.returncode), tail)
        return int(proc.returncode)
    finally:
        if proc.poll() is None:
            terminate_tree(proc)
        pump.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: First wait (seconds) before a Flower process asks again for a message object that is not
#: there yet (Flower 1.41: 1 s, then doubling up to 10 s).
PULL_BACKOFF_S = 0.05

#: Longest time (seconds) a Flower process keeps asking for the objects of one message
#: (Flower 1.41: ``PULL_MAX_TIME`` = 7200 s, and 500 tries per object, ~80 min at 10 s apart).
#: A message's objects follow it within seconds: fedaffect's largest model (``wave-cnn-gru``)
#: is 1.3 MB, under two minutes even at 100 kbit/s. An object still missing after 5 minutes
#: is not coming: its sender has stopped. When a run is stopped on the coordinator while a
#: device's SuperNode is downloading a message (``fedaffect train`` interrupted), Flower's
#: SuperNode gives the message up but leaves it and its task in place
#: (``flwr.supernode.start_client_internal._pull_and_store_message``: the stop arrives as
#: ``RunNotRunningException``, a ``BaseException`` its cleanup (``except Exception``) does not
#: catch), so the ClientApp it started would ask for the missing objects every 10 s, a
#: 240 MB process held for up to 2 hours; with this limit it gives up after 5 minutes and
#: exits. The ServerApp's pulls (its grid's, for replies) get the same default: a device that
#: went away in the middle of a reply costs at most 5 minutes, not 2 hours (a caller may still
#: pass its own ``max_time``, or bound a round's pulls more tightly).
PULL_MAX_TIME_S = 300.0


def shorten_object_pull_backoff(initial_s: float = PULL_BACKOFF_S, max_time_s: float = PULL_MAX_TIME_S) -> None:
    """Make this process's Flower object pulls retry after ``initial_s`` seconds, not 1 s, and
    give up after ``max_time_s`` seconds (:data:`PULL_MAX_TIME_S`), not 2 hours.

    A Flower message travels as a message plus its objects (one per array), pushed one after
    the other: a SuperNode can see a message before the ServerApp has uploaded its objects, a
    ClientApp before its SuperNode has downloaded them, and a ServerApp a reply before its
    objects. Each miss costs 1 s, then 2 s (``flwr.supercore.inflatable.inflatable_utils``),
    seconds a round that are pure waiting. The retries still double up to Flower's cap (10 s).

    A pull that runs out of time raises Flower's ``ObjectPullError``, which each caller
    already handles: the ClientApp exits with an error (no reply), the SuperNode drops the
    message, the ServerApp's grid returns an error reply in place of the device's.

    Raises
    ------
    RuntimeError
        If this Flower release no longer has the keyword defaults changed here.
    """
    for defaults in _object_pull_defaults():
        defaults["initial_backoff"] = initial_s
        defaults["max_time"] = max_time_s


def _object_pull_defaults() -> list[dict]:
    """The keyword defaults of Flower's two object-pull functions (changed in place by
    :func:`shorten_object_pull_backoff`).

    Raises
    ------
    RuntimeError
        If this Flower release no longer has the keywords changed here.
    """
    from flwr.supercore.inflatable import inflatable_utils

    out = []
    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = pull.__kwdefaults__ or {}
        missing = [k for k in ("initial_backoff", "max_time") if k not in defaults]
        if missing:
            raise RuntimeError(f"flwr {pull.__name__} has no {' or '.join(missing)} keyword any more: "
                               "update shared_models.processes")
        out.append(defaults)
    return out

