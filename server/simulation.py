"""Simulating a federation on one machine: the same ServerApp and ClientApp, two engines.

``inprocess`` (default)
    :class:`InProcessGrid` delivers each message straight to ``client.app.app`` in this
    process, one device after the other, each with its own Flower ``Context``: the serial
    in-process trainer of FLUTE and FedLab, with no per-device process cost. The code
    that runs is exactly the ServerApp's ``run_federation`` and the ClientApp's handlers.
``ray``
    Flower's Simulation Engine (Ray): a local SuperLink started with ``--simulation`` and
    the app submitted with ``flwr run`` (see :mod:`server.ray_engine`).

:func:`simulate` adds what a study needs around one run: leave-speakers-out K-fold
cross-validation (one run per fold), features extracted once up front with a progress
bar, and a summary with mean and standard deviation over folds.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from flwr.common.constant import ErrorCode

from shared_models.config import MODEL_SIMULATION_THREADS, RunConfig, resumed_values
from shared_models.fairness import faireg_group_keys
from shared_models.features import extract_features
from shared_models.federation import emotion_classes, plan_federation
from shared_models.manifest import read_manifest
from shared_models.models import frontend_for
from shared_models.training import compute_device
from server.app import FINAL_METRICS, run_federation
from server.store import CONFUSION_KEY, RunStore, default_store_url

__all__ = ["InProcessGrid", "simulate", "prepare_run", "run_names", "resumed_config", "combine_folds", "mean_rounds", "ENGINES",
           "RESUME_KEYS"]

log = logging.getLogger("fedaffect.simulation")

ENGINES = ("inprocess", "ray")

#: Run-config keys a resumed simulation may change (``fedaffect simulate --resume RUN``): how
#: many rounds it trains in all, the waits and device minimums, and where its files are (a
#: moved manifest, run folder or cache). Every other key stays as stored: the run's rounds
#: and checkpoint were trained with them (another fold or seed would even train on speakers
#: the stored rounds held out).
RESUME_KEYS = ("num-server-rounds", "round-timeout", "min-devices", "min-train-devices",
               "manifest", "run-dir", "store-url", "cache-dir")


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    node_configs : list of dict
        One node config per virtual SuperNode (``partition-id``, ``num-partitions``).
    run_config : dict
        The run config every node sees.
    run_id : int
        Flower run id to stamp on messages.
    on_reply : callable, optional
        Called with each reply (e.g. to advance a progress bar).
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        run_id: int = 1,
        on_reply: Callable[[Message], None] | None = None,
    ) -> None:
        self._app = client_app
        self._run_id = run_id
        rng = np.random.default_rng(run_id)
        ids = rng.choice(2**31, size=len(node_configs), replace=False) + 1
        self._contexts = {
            int(nid): Context(run_id, int(nid), dict(nc), RecordDict(), dict(run_config))
            for nid, nc in zip(ids, node_configs)
        }
        self._pending: dict[str, Message] = {}
        self._on_reply = on_reply
        self._run = None

    def set_run(self, run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Ids of the virtual nodes."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue messages; they run when their replies are pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts.get(msg.metadata.dst_node_id)
        if context is None:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {msg.metadata.dst_node_id}"), reply_to=msg)
        try:
            reply = self._app(msg, context)
        except Exception as err:  # a failing device must not stop the round
            log.warning("device %s failed: %s", context.node_config.get("partition-id"), err)
            log.debug("device %s: %s", context.node_config.get("partition-id"), "".join(traceback.format_exception(err)))
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)
        if self._on_reply:
            self._on_reply(reply)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Run the queued messages and return their replies."""
        return [self._deliver(self._pending.pop(i)) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver every message and collect the replies (timeouts cannot happen here)."""
        return self.pull_messages(self.push_messages(messages))


def prepare_run(cfg: RunConfig, *, progress: bool = True, extract: bool = True) -> tuple[RunConfig, int]:
    """Resolve a simulation config and pre-extract every clip's features.

    Fills ``emotions`` from the manifest when unset, and ``store-url`` with the default
    SQLite store of ``run-dir``; extracts (and caches) the features of every clip once,
    so devices only read the cache.

    Parameters
    ----------
    cfg : RunConfig
    progress : bool
        Show a progress bar while extracting features.
    extract : bool
        Extract (or check the cache of) every clip's features.

    Returns
    -------
    cfg : RunConfig
        The resolved config.
    num_devices : int
        Devices (virtual SuperNodes) of the federation.

    Raises
    ------
    FileNotFoundError, ManifestError
        For a missing or invalid manifest.
    ValueError
        For a task that needs labels the manifest lacks, an emotion class without clips,
        an impossible partition, a
        protected attribute that is not a manifest column (the columns are listed), a
        ``fair-attribute`` that is not protected, ``faireg`` on for task ``emotion``, or
        ``compute-device = cuda`` where torch sees no GPU.
    """
    if not cfg.manifest:
        raise ValueError("config key 'manifest' is empty: pass --manifest MANIFEST.csv")
    compute_device(cfg.compute_device)  # every simulated device runs here: 'cuda' without a GPU fails now
    if cfg.partition == "speaker" and cfg.num_devices:
        log.warning("num-devices = %d is ignored: partition 'speaker' makes one device per speaker "
                    "(it applies to 'iid' and 'dirichlet')", cfg.num_devices)
    manifest = read_manifest(cfg.manifest)
    emotions = emotion_classes(cfg, manifest)
    if cfg.task in ("emotion", "both") and len(emotions) < 2:
        raise ValueError(f"task {cfg.task!r} needs at least 2 emotion classes; the manifest has {emotions}")
    if cfg.task in ("emotion", "both"):
        # a class without clips is never in the truth, so UAR would average the others only
        counts = manifest["emotion"].value_counts()
        empty = [e for e in emotions if counts.get(e, 0) == 0]
        if empty:
            raise ValueError(f"emotions {empty} have no clip in the manifest (clips per class: "
                             f"{ {e: int(n) for e, n in counts.items() if e} }); leave them out of 'emotions'")
    if cfg.task in ("av", "both") and manifest["arousal"].isna().all():
        raise ValueError(f"task {cfg.task!r} needs arousal/valence labels; the manifest has none")
    unknown = [a for a in cfg.protected_list if a not in manifest.columns]
    if unknown:
        raise ValueError(f"protected attribute(s) {unknown} not in the manifest; columns: {list(manifest.columns)}")
    for attr in cfg.protected_list:
        missing = int((manifest[attr].fillna("").astype(str).str.strip() == "").sum())
        if missing:
            log.warning("%d of %d clips have no '%s'; they count in the group 'unknown'", missing, len(manifest), attr)
    if cfg.strategy == "fair" and cfg.fair_attribute not in cfg.protected_list:
        raise ValueError(f"fair-attribute {cfg.fair_attribute!r} is not a protected attribute "
                         f"(protected = {cfg.protected!r}); add it to 'protected'")
    if cfg.mode != "supervised" and cfg.label_fraction >= 1:
        log.warning("mode %r with label-fraction 1: every clip keeps its label, so no device has a pool to "
                    "self-label or query; set --label-fraction (e.g. 0.1)", cfg.mode)
    if cfg.freeze_rounds and not cfg.init:
        log.warning("freeze-rounds = %d without --init: the front-end frozen is a random one", cfg.freeze_rounds)
    if cfg.dp != "off" and cfg.dp_noise_multiplier == 0:
        log.warning("dp = %r with dp-noise-multiplier 0: updates are clipped but no noise is added, so there is "
                    "no privacy guarantee (epsilon is infinite)", cfg.dp)
    if cfg.faireg == "on" and cfg.task == "emotion":
        raise ValueError("faireg normalises arousal/valence labels: use task 'av' or 'both' with faireg = 'on'")
    if cfg.faireg == "on" and cfg.faireg_reference:  # checked again on the training devices' statistics
        from client.app import group_column  # the devices' rule: an empty value is the group "unknown"

        rated = manifest[manifest["arousal"].notna()]
        known = set(faireg_group_keys({a: group_column(rated, a, {}) for a in cfg.protected_list},
                                      cfg.protected_list, len(rated)))
        if cfg.faireg_reference not in known:
            raise ValueError(f"faireg-reference {cfg.faireg_reference!r} is not a group with arousal/valence labels "
                             f"in the manifest; known: {', '.join(sorted(known)) or 'none'}")
    if cfg.init and extract:  # transfer learning: a wrong checkpoint fails before any run starts
        from client.transfer import check_initial

        check_initial(cfg.init, cfg.model, emotions, task=cfg.task)  # the ServerApp logs its warnings
    cfg = cfg.replace(
        emotions=",".join(emotions),
        store_url=cfg.store_url or default_store_url(cfg.run_dir),
    )
    plans = plan_federation(
        manifest, partition=cfg.partition, num_devices=cfg.num_devices, folds=cfg.folds,
        fold=cfg.fold, dirichlet_alpha=cfg.dirichlet_alpha, seed=cfg.seed,
    )
    if extract:
        extract_features(manifest["path"].tolist(), frontend_for(cfg.model), cfg.cache_dir,
                         progress=progress, description=f"{cfg.model} features")
    return cfg, len(plans)


def resumed_config(named: dict[str, Any]) -> RunConfig:
    """The config that continues the stored run ``named["resume"]``: the run's stored config
    (its fold among them), with the :data:`RESUME_KEYS` of ``named``.

    Parameters
    ----------
    named : dict
        The run-config keys named for this simulation (hyphenated: experiment file, options,
        ``--set``), ``resume`` among them; ``store-url`` or ``run-dir`` say where the run is.

    Returns
    -------
    RunConfig
        With ``resume`` and ``run-name`` the stored run's name.

    Raises
    ------
    ValueError
        If there is no run store there or no such run in it, or if ``named`` gives a key
        other than :data:`RESUME_KEYS` a value that differs from the stored one (each such
        key named, with both values; the same value is accepted: a command given again).
    """
    from pathlib import Path

    url = named.get("store-url") or ""
    if not url:
        run_dir = Path(str(named.get("run-dir") or RunConfig.run_dir)).expanduser().resolve()
        if not (run_dir / "fedaffect.db").is_file():
            raise ValueError(f"cannot resume {named['resume']!r}: no run store in {run_dir} (no fedaffect.db); "
                             "pass the --run-dir of the run, or --store-url")
        url = default_store_url(run_dir)
    store = RunStore(url)
    previous = store.find_run(named["resume"])
    if previous is None:
        raise ValueError(f"cannot resume {named['resume']!r}: no such run in {store.shown_url} "
                         "(`fedaffect runs` lists them)")
    values = resumed_values(previous.config, previous.name, named, RESUME_KEYS)  # ConfigError is a ValueError
    return RunConfig.from_mapping({**values, "store-url": url, "run-name": previous.name})


def run_names(cfg: RunConfig, all_folds: bool = True) -> list[str]:
    """The names of the runs :func:`simulate` stores for ``cfg``, one per fold it runs:
    ``<run-name>-fold<k>`` for every fold of several, else ``<run-name>``; without a run name,
    ``sim-<local time>-<4 hex>``, a new one per call (name the run once to get the same names)."""
    base = cfg.run_name or f"sim-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    if all_folds and cfg.folds > 1:
        return [f"{base}-fold{fold}" for fold in range(cfg.folds)]
    return [base]


def _run_inprocess(cfg: RunConfig, num_devices: int, on_round=None) -> dict[str, Any]:
    node_configs = [{"partition-id": i, "num-partitions": num_devices} for i in range(num_devices)]
    run_id = int(uuid.uuid4().int % 2**31) + 1
    grid = InProcessGrid(_client_app(), node_configs, cfg.to_mapping(), run_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(MODEL_SIMULATION_THREADS.get(cfg.model, threads))  # the devices run one after the other
    try:
        return run_federation(grid, cfg, RunStore(cfg.store_url), engine="inprocess", on_round=on_round)
    finally:
        torch.set_num_threads(threads)


def _client_app() -> ClientApp:
    from client.app import app  # the device side, imported only to simulate devices

    return app


def simulate(
    cfg: RunConfig,
    *,
    engine: str = "inprocess",
    all_folds: bool = True,
    progress: bool = True,
    on_round: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Simulate a federation, one run per leave-speakers-out fold.

    Parameters
    ----------
    cfg : RunConfig
        Run configuration (``folds`` > 1 gives cross-validation over ``folds`` runs when
        ``all_folds``; otherwise only fold ``cfg.fold`` runs).
    engine : {"inprocess", "ray"}
    all_folds : bool
        Run every fold (True) or only ``cfg.fold``.
    progress : bool
        Show progress bars.
    on_round : callable, optional
        Called as ``on_round(fold, round, metrics)`` after each round is stored.

    Returns
    -------
    dict
        ``config``, ``runs`` (names), ``folds`` (each fold's run summary), ``rounds`` (the
        per-round metrics' mean over folds, :func:`mean_rounds`), ``final`` (per metric
        ``{"mean", "std", "folds"}``) and ``per_group`` (per attribute/group/metric mean).

    Raises
    ------
    ValueError
        For an unknown engine, ``resume`` with every fold of several (the stored run is one
        fold), or an invalid setup.
    RuntimeError
        If a run fails (the run is marked failed in the store).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if cfg.resume and all_folds and cfg.folds > 1:  # each fold would continue the one stored run
        raise ValueError(f"resume {cfg.resume!r} continues one stored run, one fold: simulate it alone "
                         "(all_folds=False, with the run's stored config: resumed_config)")
    cfg, _ = prepare_run(cfg, progress=progress)
    folds = range(cfg.folds) if (all_folds and cfg.folds > 1) else [cfg.fold]
    names = run_names(cfg, all_folds)
    summaries = []
    for fold, name in zip(folds, names):
        fold_cfg = cfg.replace(fold=fold, run_name=name)
        fold_cfg, num_devices = prepare_run(fold_cfg, extract=False)
        log.info("fold %d: %d devices, engine %s", fold, num_devices, engine)
        hook = (lambda r, m, f=fold: on_round(f, r, m)) if on_round else None
        if engine == "inprocess":
            summaries.append(_run_inprocess(fold_cfg, num_devices, hook))
        else:
            from server.ray_engine import run_ray

            summaries.append(run_ray(fold_cfg, num_devices, on_round=hook))
    return combine_folds(cfg, summaries)


def mean_rounds(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-round metrics over folds: each numeric metric's mean over the folds that have it
    (NaN and None skipped; None when no fold has it), the confusion counts summed. Rounds up
    to the shortest fold's last.

    Parameters
    ----------
    summaries : list of dict
        Fold summaries, each with ``rounds`` (:func:`server.app.run_summary`).

    Returns
    -------
    list of dict
        ``{"round": r, <metric>: mean, ..., "confusion": summed counts or None}``.
    """
    out = []
    for i in range(min((len(s["rounds"]) for s in summaries), default=0)):
        rows = [s["rounds"][i] for s in summaries]
        row: dict[str, Any] = {"round": rows[0].get("round", i)}
        for key in dict.fromkeys(k for r in rows for k in r if k != "round"):
            values = [r.get(key) for r in rows]
            if key == CONFUSION_KEY:
                counts = [np.asarray(v) for v in values if v is not None]
                row[key] = np.sum(counts, axis=0).tolist() if counts else None
                continue
            nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v)]
            row[key] = float(np.mean(nums)) if nums else None
        out.append(row)
    return out


def combine_folds(cfg: RunConfig, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of final metrics over fold summaries, and the per-round
    metrics' mean over folds (:func:`mean_rounds`)."""

    def stat(values: list[float | None]) -> dict[str, Any]:
        vals = np.array([np.nan if v is None else v for v in values], dtype=float)
        ok = vals[~np.isnan(vals)]
        return {
            "mean": float(ok.mean()) if ok.size else None,
            "std": float(ok.std()) if ok.size else None,
            "folds": [None if np.isnan(v) else float(v) for v in vals],
        }

    keys = sorted({k for s in summaries for k in s["final"]},
                  key=lambda k: (FINAL_METRICS.index(k) if k in FINAL_METRICS else len(FINAL_METRICS), k))
    final = {k: stat([s["final"].get(k) for s in summaries]) for k in keys}
    per_group: dict[str, dict[str, dict[str, Any]]] = {}
    for s in summaries:
        for attr, groups in s["per_group"].items():
            for g, metrics in groups.items():
                for m, v in metrics.items():
                    per_group.setdefault(attr, {}).setdefault(g, {}).setdefault(m, []).append(v)
    per_group = {
        a: {g: {m: stat(v)["mean"] for m, v in ms.items()} for g, ms in gs.items()} for a, gs in per_group.items()
    }
    privacy = [s["privacy"] for s in summaries if "privacy" in s]
    return {
        "config": cfg.to_mapping(),
        **({"privacy": privacy[0] if len(privacy) == 1 else privacy} if privacy else {}),
        "runs": [s["run"] for s in summaries],
        "folds": summaries,
        "rounds": mean_rounds(summaries),
        "final": final,
        "per_group": per_group,
    }


def centralised_baseline(cfg: RunConfig, *, progress: bool = False) -> dict[str, Any]:
    """Train the same model on the same split centrally: the reference federated runs chase.

    The training devices' clips are pooled (each device's features standardised with its
    own statistics, exactly as in the federation) and trained for
    ``num-server-rounds * local-epochs`` epochs with the same optimiser settings; the model
    is evaluated on the held-out devices after every ``local-epochs`` epochs.

    Parameters
    ----------
    cfg : RunConfig
        Same config as the federated run (only fold ``cfg.fold``).

    Returns
    -------
    dict
        ``rounds`` (held-out metrics per round-equivalent, round 0 = initial model),
        ``final`` (last round's metrics), ``train_seconds`` (wall time of training alone).
    """
    import torch

    from client.app import load_device
    from server.app import pooled_metrics
    from shared_models.models import build_model
    from shared_models.training import LocalData, compute_device, evaluate_local, train_local

    cfg, num_devices = prepare_run(cfg, progress=progress)
    devices = [load_device(cfg.to_mapping(), {"partition-id": i}) for i in range(num_devices)]
    train = [d.data for d in devices if d.role == "train" and len(d.data)]
    heldout = [d.data for d in devices if d.role == "heldout" and len(d.data)] or train
    pooled = LocalData(
        x=[x for d in train for x in d.x],
        emotion=np.concatenate([d.emotion for d in train]),
        av=np.concatenate([d.av for d in train]),
        groups={a: np.concatenate([d.groups[a] for d in train]) for a in train[0].groups},
    )
    n_classes = max(len(cfg.emotion_list), 1)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, n_classes).to(compute_device(cfg.compute_device))

    def evaluate() -> dict[str, float]:
        stats = [evaluate_local(model, d, task=cfg.task, n_classes=n_classes, adapt_bn=bool(cfg.bn_adapt))
                 for d in heldout]
        return pooled_metrics(stats)[0]

    rounds, seconds = [{"round": 0, **evaluate()}], 0.0
    for r in range(1, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        result = train_local(model, pooled, task=cfg.task, epochs=cfg.local_epochs, lr=cfg.lr,
                             batch_size=cfg.local_batch_size, seed=cfg.seed * 100_003 + r)
        seconds += time.perf_counter() - t0
        rounds.append({"round": r, "train_loss": result["train_loss"], **evaluate()})
    return {"rounds": rounds, "final": rounds[-1], "train_seconds": seconds}
