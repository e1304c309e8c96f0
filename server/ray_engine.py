"""Flower's Simulation Engine (Ray) for one fedaffect run, through a private SuperLink.

:func:`run_ray` runs the project's ServerApp (``server.app:app``) and ClientApp
(``client.app:app``) on Flower's Simulation Engine the non-deprecated way:

1. start our own ``flower-superlink --simulation --insecure
   --disable-runtime-dependency-installation`` on a free localhost port, with its
   SQLite ``--database``, its Flower home (``FLWR_HOME``: the CLI's ``config.toml`` with
   one SuperLink connection) and its logs in a temporary folder;
2. stage the app (``pyproject.toml`` and the Python packages, nothing else) in that folder
   and submit it with ``flwr run APP fedaffect-ray --run-config RUN.toml
   --federation-config "num-supernodes=N client-resources-num-cpus=1 ..."``;
3. stream the run's logs (``flwr log RUN_ID --stream``) into a log file and the
   ``fedaffect.ray`` logger, and wait for the run to finish;
4. read the run's real status with ``flwr list --run-id RUN_ID --format json`` (``flwr
   run`` exits 0 even when the run fails) and the run store's status;
5. stop the SuperLink and everything it started (SuperExec, ``flwr-simulation``, Ray).

Why the app is staged rather than submitted from the repository root: ``flwr run DIR``
(flwr 1.41) *migrates* a ``[tool.flwr.federations]`` table it finds in
``DIR/pyproject.toml`` into the Flower config and comments the table out of the file, i.e.
it rewrites the project's ``pyproject.toml``. The staged copy has no such table, holds only
the packages of ``[tool.setuptools.packages.find]`` (so the FAB never sees ``.venv``,
``data``, ``runs`` or caches) and is immune to edits made while a run is in flight. Every
``flwr`` command also runs with the temporary folder as working directory, because
``flwr list``/``flwr log`` without an app path migrate ``./pyproject.toml`` the same way.

Paths in the run config (manifest, feature cache, run folder, SQLite store) are made
absolute first: the ServerApp and the Ray workers do not run in the caller's directory.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import tomli_w

from shared_models.config import RunConfig
from server.store import RunStore, default_store_url

__all__ = ["run_ray", "absolute_paths", "REPO_ROOT"]

log = logging.getLogger("fedaffect.ray")

#: The folder holding ``pyproject.toml`` next to ``server/``: the Flower app.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Name of the SuperLink connection written into the private Flower config.
CONNECTION = "fedaffect-ray"


def _find_bin() -> Path:
    """The folder of ``flwr`` and ``flower-superlink``: this interpreter's, else PATH's."""
    here = Path(sys.executable).parent  # the venv's bin when run with the venv's python
    if (here / "flower-superlink").exists() and (here / "flwr").exists():
        return here
    found = shutil.which("flower-superlink")
    return Path(found).parent if found else here


_BIN = _find_bin()  # also holds flower-superexec and flwr-simulation, which the SuperLink runs
_TAIL_LINES = 40
_STARTUP_TIMEOUT_S = 60.0
_CLI_TIMEOUT_S = 300.0
_STAGED_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def absolute_paths(cfg: RunConfig, base: Path | None = None) -> RunConfig:
    """A copy of ``cfg`` whose manifest, cache, run folder and SQLite store are absolute.

    Parameters
    ----------
    cfg : RunConfig
    base : Path, optional
        Folder relative paths are resolved against (default: the working directory).

    Returns
    -------
    RunConfig
        ``store_url`` is filled with the default store of ``run_dir`` when empty.

    Raises
    ------
    ValueError
        For an in-memory SQLite store, which other processes cannot reach.
    """
    base = Path(base or Path.cwd())

    def absolute(path: str) -> str:
        return str((base / Path(path).expanduser()).resolve()) if path else path

    run_dir = absolute(cfg.run_dir)
    url = cfg.store_url or default_store_url(run_dir)
    if url.startswith("sqlite"):
        scheme, _, db = url.partition(":///")
        if not db or db.startswith(":memory:") or "mode=memory" in db:
            raise ValueError(f"store {url!r} is in memory: the Ray engine needs a store on disk")
        path, sep, query = db.partition("?")
        url = f"{scheme}:///{absolute(path)}{sep}{query}"
    return cfg.replace(
        manifest=absolute(cfg.manifest), cache_dir=absolute(cfg.cache_dir), run_dir=run_dir, store_url=url
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage_app(dest: Path, root: Path = REPO_ROOT) -> Path:
    """Copy the app (pyproject without federations, its packages' sources) to ``dest``."""
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


def _write_flower_config(home: Path, port: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True},
        }
    }
    (home / "config.toml").write_text(tomli_w.dumps(config))


def _environment(home: Path, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home),
        # The SuperLink finds flower-superexec and flwr-simulation on PATH: use the venv's.
        PATH=os.pathsep.join([str(_BIN), env.get("PATH", "")]),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=str(tmp),
        PYTHONUNBUFFERED="1",
    )
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    return env


def _children(pid: int) -> list[int]:
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


def _terminate_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``proc`` (started in its own session), its process group and descendants.

    The SuperLink starts SuperExec in a new session, which starts ``flwr-simulation``,
    which starts Ray; all of them are descendants, found through /proc before anything
    is signalled (they would be re-parented once their parents exit).
    """
    pids = [proc.pid, *_children(proc.pid)]
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


class _LogPump:
    """Read a process's output line by line into a file, a tail and the logger."""

    def __init__(self, stream, path: Path, tail: collections.deque, prefix: str) -> None:
        self._stream, self._path, self._tail, self._prefix = stream, path, tail, prefix
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with open(self._path, "a", encoding="utf-8") as out:
            for raw in iter(self._stream.readline, b""):
                line = _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip()
                out.write(line + "\n")
                out.flush()
                if line.strip():
                    self._tail.append(f"{self._prefix}{line}")
                    log.debug("%s%s", self._prefix, line)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def _flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float = _CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``flwr ARGS`` (always from ``cwd``: flwr migrates a ``./pyproject.toml`` it finds)."""
    cmd = [str(_BIN / "flwr"), *args]
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, -1, out, f"flwr {args[0]} timed out after {timeout:.0f}s")


def _json_from(output: str) -> dict[str, Any]:
    """The JSON object in a ``flwr ... --format json`` output (other lines may precede it)."""
    start = output.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {output!r}")
    return json.JSONDecoder().raw_decode(output[start:])[0]


def _flower_status(run_id: int, env: dict[str, str], cwd: Path) -> str:
    """The run's status text (``pending``, ``running``, ``finished:completed``...)."""
    res = _flwr(["list", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, cwd, timeout=60)
    try:
        runs = _json_from(res.stdout).get("runs", [])
    except ValueError:
        return f"unknown ({(res.stdout + res.stderr).strip()[-300:]})"
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown (run not listed)"


def _mark_failed(store: RunStore, name: str, problem: BaseException) -> None:
    """Mark the stored run failed if the ServerApp was stopped before it could say so."""
    try:
        run = store.get_run(name)
    except KeyError:
        return
    if run.status not in ("completed", "failed"):
        store.finish_run(run.id, "failed", error=f"{type(problem).__name__}: {problem}")


def _wait_ready(proc: subprocess.Popen, port: int, tail: collections.deque) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with code {proc.returncode} at start-up:\n" + "\n".join(tail)
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"flower-superlink not ready on port {port} after {_STARTUP_TIMEOUT_S:.0f}s:\n" + "\n".join(tail))


def run_ray(cfg: RunConfig, num_devices: int, *, timeout_s: float = 1800) -> dict[str, Any]:
    """Run one federated run on Flower's Simulation Engine (Ray) and return its summary.

    Starts a private local SuperLink in simulation mode, submits the project's Flower
    app (``server.app:app`` and ``client.app:app``) with every key of ``cfg`` as a
    run-config override and ``num_devices`` virtual SuperNodes (1 CPU, no GPU each),
    streams the logs, waits for the run to finish and stops the SuperLink, its
    SuperExec, ``flwr-simulation`` and Ray.

    Parameters
    ----------
    cfg : RunConfig
        A run config resolved by :func:`server.simulation.prepare_run` (``emotions`` and
        ``store_url`` set, features cached in ``cache_dir``). Relative paths are made
        absolute against the working directory; an empty ``run_name`` gets a unique one.
    num_devices : int
        Virtual SuperNodes (devices of the federation plan); SuperNode ``i`` gets node
        config ``partition-id = i``.
    timeout_s : float, optional
        Seconds the whole run may take once submitted (default 1800); the run is then
        stopped and counted as failed.

    Returns
    -------
    dict
        The ServerApp's stored run summary (:func:`server.app.run_summary`): ``run``,
        ``config``, ``rounds``, ``final``, ``per_group``. The run's Flower logs are kept
        in ``<run_dir>/<run_name>/flower-ray.log``.

    Raises
    ------
    ValueError
        If ``num_devices`` < 1, the store is in memory, or the run name is taken.
    RuntimeError
        If the SuperLink does not start, the run cannot be submitted, it fails (Flower
        status other than ``finished:completed``, or the store's run not ``completed``),
        or it runs past ``timeout_s``. The message ends with the last 40 log lines.

    Examples
    --------
    >>> cfg, n = prepare_run(RunConfig(manifest="data/manifest.csv", run_name="r1"))  # doctest: +SKIP
    >>> run_ray(cfg, n)["final"]["uar"]  # doctest: +SKIP
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    cfg = absolute_paths(cfg)
    if not cfg.run_name:
        cfg = cfg.replace(run_name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
    store = RunStore(cfg.store_url)
    try:
        store.get_run(cfg.run_name)
    except KeyError:
        pass
    else:
        raise ValueError(f"a run named {cfg.run_name!r} exists already in {cfg.store_url}")

    log_path = Path(cfg.run_dir) / cfg.run_name / "flower-ray.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def failure(message: str) -> RuntimeError:
        lines = "\n".join(tail) or "(no log output)"
        return RuntimeError(f"{message}\nfull log: {log_path}\nlast {len(tail)} log lines:\n{lines}")

    if not (_BIN / "flower-superlink").exists():
        raise RuntimeError(f"flower-superlink not found in {_BIN} or on PATH: install flwr[simulation]")
    with tempfile.TemporaryDirectory(prefix="fedaffect-ray-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        home, port = tmp / "flwr-home", _free_port()
        _write_flower_config(home, port)
        app_dir = _stage_app(tmp / "fedaffect")
        overrides = tmp / "run-config.toml"
        overrides.write_text(tomli_w.dumps(cfg.to_mapping()))
        env = _environment(home, tmp)
        federation = f"num-supernodes={num_devices} client-resources-num-cpus=1 client-resources-num-gpus=0.0"

        superlink = subprocess.Popen(
            [
                str(_BIN / "flower-superlink"), "--simulation", "--insecure",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp / "superlink.db"),
            ],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pumps = [_LogPump(superlink.stdout, log_path, tail, "")]
        streamer: subprocess.Popen | None = None
        problem: BaseException | None = None
        try:
            _wait_ready(superlink, port, tail)
            t0 = time.monotonic()
            res = _flwr(
                ["run", str(app_dir), CONNECTION, "--run-config", str(overrides),
                 "--federation-config", federation, "--format", "json"],
                env, tmp,
            )
            try:
                submitted = _json_from(res.stdout)
                run_id = int(submitted["run-id"])
            except (ValueError, KeyError, TypeError):
                tail.extend((res.stdout + res.stderr).strip().splitlines()[-_TAIL_LINES:])
                raise failure(f"flwr run could not submit the app (exit code {res.returncode})") from None
            log.info("run %s submitted to Flower as run %d (%d devices)", cfg.run_name, run_id, num_devices)

            streamer = subprocess.Popen(
                [str(_BIN / "flwr"), "log", str(run_id), CONNECTION, "--stream"],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            pumps.append(_LogPump(streamer.stdout, log_path, tail, "[run] "))
            deadline = t0 + timeout_s
            status = "unknown"
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:  # stopping the SuperLink's process tree (below) ends the run
                    raise failure(f"run {cfg.run_name} (Flower run {run_id}) timed out after {timeout_s:.0f}s")
                if superlink.poll() is not None:
                    raise failure(f"flower-superlink exited with code {superlink.returncode} during the run")
                try:
                    # The stream ends when the run finishes; then (or every 30 s) ask.
                    streamer.wait(timeout=min(remaining, 30.0))
                except subprocess.TimeoutExpired:
                    pass
                status = _flower_status(run_id, env, tmp)
                if status.startswith("finished"):
                    break
                if streamer.poll() is not None:  # stream dropped while running: poll
                    time.sleep(min(5.0, max(deadline - time.monotonic(), 0)))
            log.info("Flower run %d: %s (%.1fs)", run_id, status, time.monotonic() - t0)
            if streamer.poll() is None:  # give the stream a moment to deliver the last lines
                try:
                    streamer.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            try:
                run = store.get_run(cfg.run_name)
            except KeyError:
                run = None
            if status != "finished:completed" or run is None or run.status != "completed":
                store_state = "no run in the store" if run is None else f"store status {run.status!r}"
                error = (run.error or "").strip().splitlines()[-1:] if run is not None else []
                raise failure(
                    f"run {cfg.run_name} (Flower run {run_id}) failed: Flower status {status!r}, {store_state}"
                    + (f": {error[0]}" if error else "")
                )
        except BaseException as err:
            problem = err
            raise
        finally:
            if streamer is not None and streamer.poll() is None:
                streamer.terminate()
                try:
                    streamer.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    streamer.kill()
            _terminate_tree(superlink)
            for pump in pumps:
                pump.join(timeout=5)
            if problem is not None:
                _mark_failed(store, cfg.run_name, problem)

    from server.app import run_summary

    return run_summary(store, run.id)
