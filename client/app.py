"""The device side: Flower ClientApp that trains the shared affect model on local clips.

A device loads its own clips (never sent anywhere), computes their features once (cached
on disk), standardises them with its own statistics, and answers these message types:

``train``
    start from the global weights, train ``local-epochs`` on the device's labelled clips
    (its manifest's labels and, in every mode, the answers its person gave to queued clips;
    in modes ``self-labelling`` and ``cooperative`` also its pseudo-labels:
    :meth:`client.cooperative.CoopState.training_data`), reply with the new weights,
    ``num-examples`` (labelled clips used), ``train_loss`` and the device's description;
``evaluate``
    evaluate the global weights on the device's clips and reply with ``num-examples``,
    ``eval_loss`` and *sufficient statistics* (confusion counts, CCC sums) overall and per
    protected group, from which the coordinator computes UAR, CCC and per-group metrics
    without seeing any prediction or audio; a ``train`` message whose round config sets
    ``eval-stats`` gets the same evaluation of the weights as received, before training
    (``eval-stats`` and ``eval-loss`` in the reply's ``device`` record), so that in-sample
    evaluation needs no message of its own;
``query.device_info``
    describe the device (role, clip counts, groups) so the coordinator can tell training
    devices from held-out ones.
``query.label_stats``
    FaiReg (``faireg = "on"``): per protected group, ``(n, sum, sum of squares)`` of the
    device's arousal/valence labels; the coordinator sends back per-group means and standard
    deviations in every round config (``faireg``, JSON) and the device trains on normalised
    targets and maps predictions back to the label scale (:mod:`shared_models.fairness`).

With strategy ``fair`` the round config carries ``pre-stats``: the device then also sends
the statistics of the global model on its clips *before* training (``pre-stats`` in the
reply's ``device`` record), from which the strategy weighs the groups.

With ``dp = "client"`` the round config carries ``clipping_norm`` (Flower's
``DifferentialPrivacyClientSideFixedClipping``, :mod:`strategies.dp`): the train handler's
:func:`dp_clipping_mod` then clips the update to that L2 norm before it leaves the device.

Where a device's clips come from:

* simulation: node config ``partition-id`` (set by Flower's Simulation Engine or by
  fedaffect's in-process engine) selects the device's share of the run's manifest
  through :func:`shared_models.federation.plan_federation`;
* deployment: node config ``data-dir`` names the device's data directory, whose
  ``manifest.csv`` lists its clips; ``role`` (``train``/``heldout``) defaults to train.

Messages carry only weights, counts and statistics: see :func:`device_statistics`.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from shared_models.config import RunConfig
from shared_models.fairness import UNKNOWN_GROUP, FaiRegParams, faireg_group_keys, label_stats, normalise_data
from shared_models.federation import HELDOUT, TRAIN, emotion_classes, plan_federation
from shared_models.features import Standardiser, extract_features
from shared_models.manifest import read_manifest
from shared_models.models import build_model, clippable_update, frontend_for, load_record, to_record
from shared_models.training import LocalData, compute_device, evaluate_local, train_local
from client.cooperative import attach as attach_cooperative, faireg_of, label_split

__all__ = ["app", "Device", "load_device", "group_column", "device_statistics", "dp_clipping_mod", "private_errors_mod"]

log = logging.getLogger("fedaffect.client")


def private_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """Keep a failing handler's error message on the device.

    Flower sends the text of an exception raised by a handler to the coordinator, and
    fedaffect's texts name the device's files and manifest values (``.../manifest.csv: line
    5, column emotion: ... 'furious'``). The full error goes to the device's own log; the
    coordinator gets the exception's type only. Simulated devices (node config
    ``partition-id``) share the coordinator's machine: their error keeps its text and the
    traceback is logged at debug level only (one line per failing device, not a traceback each).

    Raises
    ------
    RuntimeError
        ``"device failed: <type> (details in the device's log)"``, for any exception
        (simulated: ``"device failed: <type>: <text>"``).
    """
    try:
        return call_next(msg, context)
    except Exception as ex:
        node = context.node_config
        if "partition-id" in node and "data-dir" not in node:  # simulated (as load_device tells): one machine
            log.debug("%s message failed", msg.metadata.message_type, exc_info=True)
            raise RuntimeError(f"device failed: {type(ex).__name__}: {ex}") from None
        log.exception("%s message failed", msg.metadata.message_type)
        raise RuntimeError(f"device failed: {type(ex).__name__} (details in the device's log)") from None


app = ClientApp(mods=[private_errors_mod])


@dataclass
class Device:
    """A device's private data and description, built once per process and reused.

    Attributes
    ----------
    name : str
        Human-readable name, e.g. ``dev-03 (synth-f1)``.
    role : str
        ``"train"`` or ``"heldout"``.
    partition_id : int
        Index in the federation plan (-1 in deployment).
    data : LocalData
        Standardised features and labels of the device's usable clips.
    emotions : list of str
        Emotion classes in output order of the model's categorical head.
    n_skipped : int
        Clips that could not be used (unreadable, silent, too short).
    task : str
        The run's task; ``n-labelled`` counts the clips with a label it trains on.
    """

    name: str
    role: str
    partition_id: int
    data: LocalData
    emotions: list[str]
    n_skipped: int
    coop: Any = None  # client.cooperative.CoopState of a training device (cooperative learning)
    task: str = "both"  # the run's task: which labels count as labels (RunConfig.task)

    def info(self) -> dict[str, Any]:
        """Description sent to the coordinator: counts only, no clip, path or feature."""
        return {
            "name": self.name,
            "role": self.role,
            "partition-id": self.partition_id,
            "n-clips": len(self.data),
            "n-labelled": int(self.data.labelled(self.task).sum()),  # labels the run's task trains on
            "n-skipped": self.n_skipped,
            **(self.coop.info() if self.coop is not None else {}),
            "groups": json.dumps(
                {a: sorted(set(v.tolist())) for a, v in self.data.groups.items()}
            ),
        }


_DEVICES: dict[tuple, Device] = {}

#: Modules imported lazily on first use that a warm SuperExec imports ahead of the messages
#: (client/supernode.py): ``torch._dynamo`` (~5 s) on the first ``torch.optim`` optimiser,
#: scikit-learn (~4 s) on the first confusion matrix.
WARM_MODULES = ("torch._dynamo", "torch.optim", "sklearn.metrics")


def load_device(run_config: dict[str, Any], node_config: dict[str, Any]) -> Device:
    """Load (once per process) the device described by Flower's run and node config.

    Parameters
    ----------
    run_config : dict
        The run's config (see :class:`shared_models.config.RunConfig`).
    node_config : dict
        ``partition-id`` in simulation, or ``data-dir`` (and optionally ``role``) in
        deployment.

    Returns
    -------
    Device

    Raises
    ------
    ConfigError
        For a bad run config.
    ValueError
        If the node config names neither a partition nor a data directory.
    """
    cfg = RunConfig.from_mapping(run_config)
    key = (tuple(sorted(cfg.to_mapping().items())), tuple(sorted(node_config.items())))
    if key in _DEVICES:
        return _DEVICES[key]

    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        manifest = read_manifest(data_dir / "manifest.csv")
        rows = np.arange(len(manifest))
        role = str(node_config.get("role", TRAIN))
        partition_id = -1
        name = str(node_config.get("name", data_dir.name))
        cache_dir = data_dir / "cache"
    elif "partition-id" in node_config:
        manifest = read_manifest(cfg.manifest)
        plans = plan_federation(
            manifest,
            partition=cfg.partition,
            num_devices=cfg.num_devices,
            folds=cfg.folds,
            fold=cfg.fold,
            dirichlet_alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
        )
        partition_id = int(node_config["partition-id"])
        if partition_id >= len(plans):
            # More SuperNodes than planned devices: an idle node holds nothing.
            rows, role, name = np.zeros(0, dtype=np.int64), HELDOUT, f"dev-{partition_id:02d} (idle)"
        else:
            plan = plans[partition_id]
            rows, role, name = plan.rows, plan.role, plan.name
        cache_dir = Path(cfg.cache_dir)
    else:
        raise ValueError("node config needs 'partition-id' (simulation) or 'data-dir' (deployment)")

    emotions = emotion_classes(cfg, manifest)
    table = manifest.iloc[rows]
    frontend = frontend_for(cfg.model)
    feats, skipped = extract_features(table["path"].tolist(), frontend, cache_dir, progress=False)
    keep = np.array([f is not None for f in feats], dtype=bool)
    table = table[keep]
    usable = [f for f in feats if f is not None]
    scaler = Standardiser.for_frontend(frontend).fit(usable) if usable else None
    x = [scaler.transform(f) for f in usable] if scaler else []
    index = {e: i for i, e in enumerate(emotions)}
    data = LocalData(
        x=x,
        emotion=np.array([index.get(e, -1) for e in table["emotion"]], dtype=np.int64),
        av=table[["arousal", "valence"]].to_numpy(dtype=np.float32),
        groups={a: group_column(table, a, node_config) for a in cfg.protected_list},
    )
    device = Device(name, role, partition_id, data, emotions, skipped.total, task=cfg.task)
    device.coop = attach_cooperative(device, cfg, table, node_config)  # may hide labels (label-fraction)
    _DEVICES[key] = device
    return device


def group_column(table, attribute: str, node_config: dict[str, Any]) -> np.ndarray:
    """A protected attribute per clip: the manifest's value, else the device's enrolled
    value (node config ``group:<attribute>``), else ``unknown`` (:data:`UNKNOWN_GROUP`).

    Returns
    -------
    np.ndarray of str, shape (N,) for a table of N clips."""
    values = table[attribute].astype(str) if attribute in table else np.full(len(table), "", dtype=object)
    fallback = str(node_config.get(f"group:{attribute}", "")) or UNKNOWN_GROUP
    return np.array([v if v else fallback for v in values], dtype=object)


def _node_config(context: Context, msg: Message) -> dict[str, Any]:
    """The device's node config plus the group attributes the coordinator enrolled it
    with (``enrolment`` record of the message, :class:`server.app.EnrolmentGrid`), as
    ``group:<attribute>`` entries."""
    node = dict(context.node_config)
    if "enrolment" in msg.content:
        node.update({f"group:{k}": str(v) for k, v in msg.content["enrolment"].items()})
    return node


def device_statistics(result: dict[str, Any]) -> str:
    """Serialise :func:`shared_models.training.evaluate_local` statistics to JSON.

    Only counts and sums leave the device: the confusion matrix (C, C), the six CCC sums
    per dimension, overall and per protected group.
    """

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        return value

    keys = ("cm", "sums_arousal", "sums_valence", "groups", "num_examples")
    return json.dumps({k: plain(result[k]) for k in keys})


def _model(cfg: RunConfig, device: Device, record: ArrayRecord) -> torch.nn.Module:
    """The run's model with ``record``'s weights, on the run's compute device."""
    model = build_model(cfg.model, max(len(device.emotions), 1)).to(compute_device(cfg.compute_device))
    load_record(model, record)
    return model


def _reply_config(device: Device, **extra: Any) -> ConfigRecord:
    return ConfigRecord({**device.info(), **extra})


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Client-side DP clipping, applied when the round config carries ``clipping_norm``.

    Flower's ``fixedclipping_mod`` clips; it answers with an error when the key is missing
    (any run without ``dp = "client"``) and wants exactly one ConfigRecord, so it is applied
    only when asked and is shown the round config alone (a message may also carry the
    coordinator's ``enrolment`` record); the handler still gets the whole message. The
    reply's arrays pass :func:`shared_models.models.clippable_update` first (integer arrays go
    back as received; an exactly-zero update, which Flower's clipping cannot divide by, moves
    one weight by one ulp).
    """
    config = msg.content.config_records.get("config")
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    sent = next(iter(msg.content.array_records.values()), None)
    view = Message(RecordDict({**msg.content.array_records, "config": config}),
                   dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

    def handle(_view: Message, ctx: Context) -> Message:
        reply = call_next(msg, ctx)
        if sent is not None and not reply.has_error():
            for name, record in list(reply.content.array_records.items()):
                reply.content[name] = clippable_update(record, sent)
        return reply

    out = fixedclipping_mod(view, context, handle)
    return Message(out.error, reply_to=msg) if out.has_error() else out


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the device's labelled clips (one federated round).

    The labelled clips are the manifest's (in simulation, those ``label-fraction`` keeps), plus,
    in every mode, the clips the device's person answered, plus the active pseudo-labels in
    the self-labelling modes (:meth:`client.cooperative.CoopState.before_training`).
    """
    cfg = RunConfig.from_mapping(context.run_config)
    device = load_device(context.run_config, _node_config(context, msg))
    round_cfg = msg.content["config"]
    server_round = int(round_cfg.get("server-round", 0))
    model = _model(cfg, device, msg.content["arrays"])
    faireg = faireg_of(round_cfg)
    held = _validation_mask(cfg, device) if round_cfg.get("pre-stats", False) else None
    extra = _eval_stats(cfg, device, model, round_cfg, faireg)
    extra.update(_pre_stats(cfg, device, model, round_cfg, faireg, held, extra.get("eval-stats")))
    coop = device.coop  # labels + answers (every mode) + pseudo-labels (self-labelling modes), then the pool step
    data = device.data if held is None else _without_labels(device.data, held)  # before any upsampling
    data = coop.before_training(model, data, round_cfg, server_round) if coop else data
    result = train_local(
        model,
        data if faireg is None else normalise_data(data, faireg),
        task=cfg.task,
        epochs=int(round_cfg.get("local-epochs", cfg.local_epochs)),
        lr=float(round_cfg.get("lr", cfg.lr)),
        batch_size=cfg.local_batch_size,
        seed=cfg.seed * 100_003 + server_round * 1_009 + max(device.partition_id, 0),
        proximal_mu=float(round_cfg.get("proximal-mu", 0.0)),
    )
    if coop:
        extra["coop"] = json.dumps(coop.after_training(model, device.data, round_cfg, server_round))
    # nothing labelled this round: num-examples 0 and a NaN loss, left out of aggregation (server.app._trained)
    metrics = MetricRecord(
        {"num-examples": int(result["num_examples"]), "train_loss": float(result["train_loss"])}
    )
    content = RecordDict({"arrays": to_record(model), "metrics": metrics, "device": _reply_config(device, **extra)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the device's clips; reply with sufficient statistics."""
    cfg = RunConfig.from_mapping(context.run_config)
    device = load_device(context.run_config, _node_config(context, msg))
    model = _model(cfg, device, msg.content["arrays"])
    faireg = faireg_of(msg.content["config"]) if "config" in msg.content else None
    result = _evaluation(cfg, device, model, device.data, faireg)
    metrics = MetricRecord(
        {"num-examples": int(result["num_examples"]), "eval_loss": float(result["loss"])}
    )
    content = RecordDict(
        {
            "metrics": metrics,
            "device": _reply_config(device, stats=device_statistics(result)),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query("device_info")
def device_info(msg: Message, context: Context) -> Message:
    """Describe the device (role and counts) to the coordinator."""
    device = load_device(context.run_config, _node_config(context, msg))
    return Message(content=RecordDict({"device": _reply_config(device)}), reply_to=msg)


# --------------------------------------------------------------------------- fairness (strategies/fair.py, FaiReg)


def _evaluation(cfg: RunConfig, device: Device, model: torch.nn.Module, data: LocalData,
                faireg: FaiRegParams | None) -> dict[str, Any]:
    """:func:`shared_models.training.evaluate_local` of ``model`` on ``data`` (a device's clips),
    arousal/valence mapped back to the label scale in a FaiReg run, batch-norm statistics
    re-estimated on ``data`` with ``bn-adapt`` (AdaBN)."""
    return evaluate_local(model, data, task=cfg.task, n_classes=len(device.emotions),
                          av_map=faireg.denormalise if faireg else None, adapt_bn=bool(cfg.bn_adapt))


def _eval_stats(cfg: RunConfig, device: Device, model: torch.nn.Module, round_cfg,
                faireg: FaiRegParams | None) -> dict[str, Any]:
    """``{"eval-stats": JSON, "eval-loss": float}``: what an ``evaluate`` message would answer
    for the global model as received, when the round config asks (``eval-stats``: in-sample
    evaluation riding on the train message, :func:`server.app.run_federation`); else ``{}``."""
    if not round_cfg.get("eval-stats", False):
        return {}
    result = _evaluation(cfg, device, model, device.data, faireg)
    return {"eval-stats": device_statistics(result), "eval-loss": float(result["loss"])}


def _pre_stats(cfg: RunConfig, device: Device, model: torch.nn.Module, round_cfg,
               faireg: FaiRegParams | None, held: np.ndarray | None = None,
               all_clips: str | None = None) -> dict[str, str]:
    """``{"pre-stats": JSON}``: statistics of the round's global model on this device's clips
    (only the ``held`` ones, when given) before local training, when the round config asks
    (strategy ``fair``); else ``{}``. ``all_clips``: those statistics on all the device's
    clips when already computed (:func:`_eval_stats`)."""
    if not round_cfg.get("pre-stats", False):
        return {}
    if held is None and all_clips is not None:
        return {"pre-stats": all_clips}
    data = device.data if held is None else device.data.subset(np.flatnonzero(held))
    return {"pre-stats": device_statistics(_evaluation(cfg, device, model, data, faireg))}


def _validation_mask(cfg: RunConfig, device: Device) -> np.ndarray | None:
    """Labelled clips kept out of training for the ``pre-stats`` (``fair-validation``): a
    seeded stratified fraction (:func:`client.cooperative.label_split`), the same every round;
    None when ``fair-validation`` is 0 or the device has fewer than 2 labelled clips."""
    data = device.data
    labelled = data.labelled(cfg.task)
    if cfg.fair_validation <= 0 or labelled.sum() < 2:
        return None
    strata = [None if not ok else (str(e) if e >= 0 else "av") for e, ok in zip(data.emotion, labelled)]
    seed = (cfg.seed, zlib.crc32(device.name.encode()), 23)
    held = label_split(strata, cfg.fair_validation, seed)
    return held if held.sum() < labelled.sum() else None  # keep something to train on


def _without_labels(data: LocalData, held: np.ndarray) -> LocalData:
    """``data`` with the labels of the ``held`` rows removed (features shared)."""
    emotion, av = data.emotion.copy(), data.av.copy()
    emotion[held], av[held] = -1, np.nan
    return LocalData(data.x, emotion, av, data.groups)


@app.query("label_stats")
def label_stats_query(msg: Message, context: Context) -> Message:
    """FaiReg: per-group ``(n, sum, sum of squares)`` of the device's arousal/valence labels.

    Groups are the intersections of the run's protected attributes
    (:func:`shared_models.fairness.faireg_group_keys`); only counts and sums leave the device.
    """
    cfg = RunConfig.from_mapping(context.run_config)
    device = load_device(context.run_config, _node_config(context, msg))
    keys = faireg_group_keys(device.data.groups, cfg.protected_list, len(device.data))
    stats = label_stats(device.data.av, keys)
    return Message(content=RecordDict({"device": _reply_config(device, **{"label-stats": json.dumps(stats)})}),
                   reply_to=msg)
