"""SuperLink processes and the ``flwr`` CLI: the plumbing shared by every engine.

Both ways fedaffect runs its Flower app through a real SuperLink use this module:

* :mod:`server.ray_engine` starts a private ``flower-superlink --simulation`` and submits
  the app to Flower's Simulation Engine (Ray);
* :mod:`server.deployment` runs the coordinator's TLS SuperLink with SuperNode
  authentication and submits runs to real devices (``fedaffect train``).

What lives here: finding Flower's executables, staging the app for ``flwr run``, a private
Flower home (``FLWR_HOME``) naming one SuperLink connection, waiting for a SuperLink to be
healthy, streaming a run's logs, reading a run's real status (``flwr run`` exits 0 on
failed runs: DESIGN.md), and stopping a process tree.

Why the app is staged rather than submitted from the repository root: ``flwr run DIR``
(flwr 1.41) *migrates* a ``[tool.flwr.federations]`` table it finds in
``DIR/pyproject.toml`` into the Flower config and comments the table out of the file, i.e.
it rewrites the project's ``pyproject.toml``. The staged copy has no such table, holds only
the packages of ``[tool.setuptools.packages.find]`` (so the FAB never sees ``.venv``,
``data``, ``runs`` or caches) and is immune to edits made while a run is in flight. Every
``flwr`` command also runs with a folder without ``pyproject.toml`` as working directory,
because ``flwr list``/``flwr log`` without an app path migrate ``./pyproject.toml`` the
same way.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomli_w

from shared_models.processes import (
    BIN, TAIL_LINES, LogPump, descendants, flower_environment, free_port, terminate_tree,
)

__all__ = [
    "BIN", "REPO_ROOT", "TAIL_LINES", "LogPump", "FlowerRun", "free_port", "stage_app", "write_flower_config",
    "flower_environment", "flwr_cli", "json_from", "flower_status", "wait_healthy", "follow_run",
    "descendants", "terminate_tree",
]

log = logging.getLogger("fedaffect.superlink")

#: The folder holding ``pyproject.toml`` next to ``server/``: the Flower app.
REPO_ROOT = Path(__file__).resolve().parent.parent


STARTUP_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 300.0
_STAGED_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json"}


def stage_app(dest: Path, root: Path = REPO_ROOT) -> Path:
    """Copy the Flower app to ``dest``: ``pyproject.toml`` without federations, and the
    sources (.py/.toml/.md/.yaml/.json) of the packages it installs.

    Raises
    ------
    FileExistsError
        If ``dest`` exists.
    """
    config = tomllib.loads((root / "pyproject.toml").read_text())
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    dest.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(config))
    patterns = config.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", [])
    packages = sorted({p.split(".")[0].rstrip("*") for p in patterns} - {""})
    for package in packages:
        src = root / package
        if not (src / "__init__.py").exists():
            continue
        for file in src.rglob("*"):
            rel = file.relative_to(root)
            if file.is_file() and file.suffix in _STAGED_SUFFIXES and "__pycache__" not in rel.parts:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest / rel)
    return dest


def write_flower_config(home: Path, connection: str, address: str, root_certificates: Path | None = None) -> None:
    """Write ``home/config.toml`` (the ``flwr`` CLI's config) with one SuperLink connection.

    Parameters
    ----------
    home : Path
        The Flower home (``FLWR_HOME``) of the commands that use the connection.
    connection : str
        The connection's name (the default one).
    address : str
        ``host:port`` of the SuperLink's Control API.
    root_certificates : Path, optional
        CA certificate (PEM) of a TLS SuperLink; without it the connection is insecure.
    """
    home.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": connection, connection: entry}}))


def flwr_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``flwr ARGS`` (always from ``cwd``: flwr migrates a ``./pyproject.toml`` it finds)."""
    cmd = [str(BIN / "flwr"), *args]
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, -1, out, f"flwr {args[0]} timed out after {timeout:.0f}s")


def json_from(output: str) -> dict[str, Any]:
    """The JSON object in a ``flwr ... --format json`` output (other lines may precede it)."""
    start = output.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {output!r}")
    return json.JSONDecoder().raw_decode(output[start:])[0]


def flower_status(run_id: int, connection: str, env: dict[str, str], cwd: Path) -> str:
    """A Flower run's status text (``pending``, ``running``, ``finished:completed``,
    ``finished:failed``...), from ``flwr list --run-id ID --format json``."""
    res = flwr_cli(["list", connection, "--run-id", str(run_id), "--format", "json"], env, cwd, timeout=60)
    try:
        runs = json_from(res.stdout).get("runs", [])
    except ValueError:
        return f"unknown ({(res.stdout + res.stderr).strip()[-300:]})"
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown (run not listed)"


def wait_healthy(proc: subprocess.Popen, url: str, tail: collections.deque, *, cafile: Path | None = None,
                 timeout_s: float = STARTUP_TIMEOUT_S, name: str = "flower-superlink") -> None:
    """Wait until ``GET url`` answers 200 (a SuperLink's ``/health``).

    Parameters
    ----------
    proc : subprocess.Popen
        The process serving ``url``; its exit ends the wait with an error.
    url : str
        ``http://`` or ``https://`` health URL.
    tail : deque of str
        The process's last log lines, quoted in errors.
    cafile : Path, optional
        CA certificate that signed an ``https://`` server's certificate.

    Raises
    ------
    RuntimeError
        If the process exits or ``url`` does not answer within ``timeout_s`` seconds.
    """
    context = ssl.create_default_context(cafile=str(cafile)) if url.startswith("https") else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} at start-up:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{name} not healthy at {url} after {timeout_s:.0f}s:\n" + "\n".join(tail))


@dataclass
class FlowerRun:
    """What became of a run submitted with :func:`follow_run`.

    Attributes
    ----------
    run_id : int
        Flower's run id.
    status : str
        Flower's final status, e.g. ``finished:completed``.
    seconds : float
        Wall time from submission to the final status.
    """

    run_id: int
    status: str
    seconds: float


def follow_run(app_dir: Path, connection: str, run_config: Path, env: dict[str, str], cwd: Path, *,
               log_path: Path, tail: collections.deque, timeout_s: float, federation_config: str = "",
               alive: Callable[[], str | None] | None = None, on_line: Callable[[str], None] | None = None,
               ) -> FlowerRun:
    """Submit the app with ``flwr run``, stream its logs, wait for its final status.

    Parameters
    ----------
    app_dir : Path
        A staged app (:func:`stage_app`).
    connection : str
        SuperLink connection named in ``env["FLWR_HOME"]/config.toml``.
    run_config : Path
        TOML file of run-config overrides.
    env, cwd
        Environment (:func:`flower_environment`) and working directory of ``flwr``.
    log_path : Path
        File the run's log lines are appended to.
    tail : deque of str
        Receives the last log lines (for error messages).
    timeout_s : float
        Seconds the run may take once submitted.
    federation_config : str, optional
        ``--federation-config`` value (simulation: ``num-supernodes=N ...``).
    alive : callable, optional
        Returns an error text when something the run needs died (e.g. the SuperLink).
    on_line : callable, optional
        Called with every log line of the run (progress display).

    Returns
    -------
    FlowerRun

    Raises
    ------
    RuntimeError
        If ``flwr run`` cannot submit the app, ``alive`` reports a problem, or the run
        does not finish within ``timeout_s``. On any error or interruption after the
        submission, the run is stopped (``flwr stop``) before the error is raised.
    """
    args = ["run", str(app_dir), connection, "--run-config", str(run_config), "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    t0 = time.monotonic()
    res = flwr_cli(args, env, cwd)
    try:
        run_id = int(json_from(res.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        said = (res.stdout + res.stderr).strip().splitlines()
        tail.extend(said[-TAIL_LINES:])
        # flwr exits 0 with a JSON error when the SuperLink is not there: show what it said
        try:
            reason = str(json_from(res.stdout).get("error-message", "")).strip()
        except (ValueError, AttributeError):
            reason = ""
        reason = reason or " / ".join(line.strip() for line in said[-3:] if line.strip())
        raise RuntimeError(f"flwr run could not submit the app: {reason or f'exit code {res.returncode}'} "
                           f"(is the SuperLink running? `fedaffect server start`)") from None
    streamer = subprocess.Popen(
        [str(BIN / "flwr"), "log", str(run_id), connection, "--stream"],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    # a run's own log, bounded by the run: not rotated (ray_engine's SuperLink appends to the same file)
    pump = LogPump(streamer.stdout, log_path, tail, "[run] ", on_line=on_line, max_bytes=0)
    deadline = t0 + timeout_s
    unknown = 0
    status = ""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"Flower run {run_id} timed out after {timeout_s:.0f}s")
            problem = alive() if alive else None
            if problem:
                raise RuntimeError(f"{problem} during Flower run {run_id}")
            try:
                # The stream ends when the run finishes; then (or every 15 s) ask.
                streamer.wait(timeout=min(remaining, 15.0))
            except subprocess.TimeoutExpired:
                pass
            status = flower_status(run_id, connection, env, cwd)
            if status.startswith("finished"):
                break
            unknown = unknown + 1 if status.startswith("unknown") else 0
            if unknown >= 10:  # the CLI cannot tell: do not wait for the timeout
                raise RuntimeError(f"cannot read the status of Flower run {run_id}: {status}")
            if streamer.poll() is not None:  # stream dropped while running: poll
                time.sleep(min(3.0, max(deadline - time.monotonic(), 0)))
        if streamer.poll() is None:  # give the stream a moment to deliver the last lines
            try:
                streamer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return FlowerRun(run_id, status, time.monotonic() - t0)
    except BaseException:  # timed out, interrupted (Ctrl-C) or lost: the run must not go on alone
        if not status.startswith("finished"):
            stop = flwr_cli(["stop", str(run_id), connection], env, cwd)
            tail.append(f"[fedaffect] stopped Flower run {run_id}" if stop.returncode == 0 else
                        f"[fedaffect] could not stop Flower run {run_id}: {(stop.stdout + stop.stderr).strip()[-300:]}")
        raise
    finally:
        if streamer.poll() is None:
            streamer.terminate()
            try:
                streamer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                streamer.kill()
        pump.join(timeout=5)
