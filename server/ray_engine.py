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

Staging, the private Flower home and status reading live in :mod:`server.superlink`.

Paths in the run config (manifest, feature cache, run folder, SQLite store) are made
absolute first: the ServerApp and the Ray workers do not run in the caller's directory.
"""

from __future__ import annotations

import collections
import re
import subprocess
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import tomli_w

from shared_models.config import RunConfig
from server.store import RunStore, default_store_url
from server.superlink import (
    BIN, REPO_ROOT, TAIL_LINES, LogPump, flower_environment, follow_run, free_port, stage_app, terminate_tree,
    wait_healthy, write_flower_config,
)

__all__ = ["run_ray", "absolute_paths", "federation_config", "REPO_ROOT", "GPU_PER_DEVICE"]

log = logging.getLogger("fedaffect.ray")

#: Name of the SuperLink connection written into the private Flower config.
CONNECTION = "fedaffect-ray"


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


#: Share of a GPU each simulated device's Ray actor asks for when the run computes on CUDA
#: (up to 10 devices train on one GPU at once; the CPU count usually limits them first).
GPU_PER_DEVICE = 0.1


def federation_config(num_devices: int, compute_device: str, cuda_available: bool | None = None) -> str:
    """The ``--federation-config`` of a Ray simulation of ``num_devices`` devices.

    Every device's actor gets one CPU; with ``compute-device`` ``cuda`` (or ``auto`` on a
    machine with a GPU) it also asks for :data:`GPU_PER_DEVICE` of a GPU: Ray hides the GPUs
    from actors that ask for none (``CUDA_VISIBLE_DEVICES`` is emptied), and torch in such an
    actor would see no CUDA device. ``cuda_available`` defaults to torch's answer.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    gpus = GPU_PER_DEVICE if compute_device == "cuda" or (compute_device == "auto" and cuda_available) else 0.0
    return f"num-supernodes={num_devices} client-resources-num-cpus=1 client-resources-num-gpus={gpus}"


#: The ServerApp's log line of a stored round (``server.app.run_federation``).
_ROUND_LINE = re.compile(r"\bround (\d+)/\d+\s+train_loss")


def run_ray(cfg: RunConfig, num_devices: int, *, timeout_s: float = 1800,
            on_round: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
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
    on_round : callable, optional
        ``on_round(round, metrics)`` once a round is stored (the ServerApp runs in another
        process: its log line of the round triggers a read of the round from the store).

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
    if store.find_run(cfg.run_name) is not None:
        raise ValueError(f"a run named {cfg.run_name!r} exists already in {cfg.store_url}")

    log_path = Path(cfg.run_dir) / cfg.run_name / "flower-ray.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def failure(message: str) -> RuntimeError:
        lines = "\n".join(tail) or "(no log output)"
        return RuntimeError(f"{message}\nfull log: {log_path}\nlast {len(tail)} log lines:\n{lines}")

    if not (BIN / "flower-superlink").exists():
        raise RuntimeError(f"flower-superlink not found in {BIN} or on PATH: install flwr[simulation]")
    with tempfile.TemporaryDirectory(prefix="fedaffect-ray-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        home, port = tmp / "flwr-home", free_port()
        write_flower_config(home, CONNECTION, f"127.0.0.1:{port}")
        app_dir = stage_app(tmp / "fedaffect")
        overrides = tmp / "run-config.toml"
        overrides.write_text(tomli_w.dumps(cfg.to_mapping()))
        env = flower_environment(home, tmp)
        federation = federation_config(num_devices, cfg.compute_device)

        superlink = subprocess.Popen(
            [
                str(BIN / "flower-superlink"), "--simulation", "--insecure",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp / "superlink.db"),
            ],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pump = LogPump(superlink.stdout, log_path, tail, "", max_bytes=0)  # the run's log: not rotated
        problem: BaseException | None = None
        try:
            wait_healthy(superlink, f"http://127.0.0.1:{port}/health", tail)
            try:
                result = follow_run(
                    app_dir, CONNECTION, overrides, env, tmp, log_path=log_path, tail=tail, timeout_s=timeout_s,
                    federation_config=federation,
                    alive=lambda: None if superlink.poll() is None else
                    f"flower-superlink exited with code {superlink.returncode}",
                    on_line=(lambda line: _report_round(line, store, cfg.run_name, on_round)) if on_round else None,
                )
            except RuntimeError as err:  # stopping the SuperLink's process tree (below) ends the run
                raise failure(f"run {cfg.run_name}: {err}") from None
            log.info("Flower run %d: %s (%.1fs)", result.run_id, result.status, result.seconds)
            try:
                run = store.get_run(cfg.run_name)
            except KeyError:
                run = None
            if result.status != "finished:completed" or run is None or run.status != "completed":
                store_state = "no run in the store" if run is None else f"store status {run.status!r}"
                error = (run.error or "").strip().splitlines()[-1:] if run is not None else []
                raise failure(
                    f"run {cfg.run_name} (Flower run {result.run_id}) failed: Flower status {result.status!r}, "
                    f"{store_state}" + (f": {error[0]}" if error else "")
                )
        except BaseException as err:
            problem = err
            raise
        finally:
            terminate_tree(superlink)
            pump.join(timeout=5)
            if problem is not None:
                store.fail_unfinished(cfg.run_name, f"{type(problem).__name__}: {problem}")

    from server.app import run_summary

    return run_summary(store, run.id)


def _report_round(line: str, store: RunStore, run_name: str,
                  on_round: Callable[[int, dict[str, Any]], None]) -> None:
    """Call ``on_round`` with a stored round's metrics when ``line`` is its log line."""
    m = _ROUND_LINE.search(line)
    if m is None:
        return
    try:
        rows = store.rounds(store.get_run(run_name).id)
    except KeyError:
        return
    row = next((r for r in rows if r["round"] == int(m.group(1))), None)
    if row is not None:
        on_round(int(m.group(1)), row)
