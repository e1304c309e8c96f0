"""The coordinator: Flower ServerApp that runs federated rounds and keeps their record.

One run, as the ServerApp sees it:

1. ask every connected device to describe itself (``query.device_info``): training
   devices train, held-out devices (speakers never trained on) only evaluate;
2. build the initial global model (seeded); with ``faireg = "on"`` gather the training
   devices' per-group label statistics (``query.label_stats``) and send the resulting
   per-group means and standard deviations with every round (FaiReg,
   :mod:`shared_models.fairness`); evaluate the initial model (round 0);
3. each round: the strategy (``strategies.build_strategy``) samples training devices and
   aggregates their updates; the new global model is evaluated on the held-out devices
   (without held-out devices: on the training devices' own clips), in the same exchange
   that sends it out for the next round's training (one exchange a round, see
   :func:`run_federation`);
   UAR, WA, macro-F1 and CCC are computed from the devices' pooled sufficient statistics
   (so they equal the metrics of the pooled predictions), overall and per protected
   group, with the fairness measures (worst group, largest gap, Equal Accuracy,
   Statistical Parity); the round, every device's report, the per-group metrics and the
   aggregation weight each group received (strategy ``fair``) go into the run store, and
   the global model is checkpointed; with ``dp`` on, the round also records ``dp_epsilon``,
   the device-level epsilon spent so far (:mod:`strategies.dp`);
4. mark the run completed (or failed, with the error) and store its summary.

Devices that fail or do not answer within ``round-timeout`` are left out of the round and
recorded; the round goes on with the others.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from shared_models.config import RunConfig
from shared_models.fairness import (
    UNKNOWN_GROUP, faireg_params, fairness_summary, group_measures, pool_label_stats,
)
from shared_models.metrics import ccc_from_sums, classification_metrics
from shared_models.models import build_model, load_record, to_record
from shared_models.processes import shorten_object_pull_backoff
from server.store import CONFUSION_KEY, RunStore, default_store_url
from client.cooperative import CoopTracker, round_settings
from client.transfer import load_initial
from strategies import build_strategy, min_train_devices

__all__ = ["app", "run_federation", "pooled_metrics", "task_metrics", "NodeSubset", "EnrolmentGrid", "PollingGrid"]

log = logging.getLogger("fedaffect.server")

app = ServerApp()

#: Metrics reported for a run, in the order of tables and summaries.
FINAL_METRICS = ("uar", "wa", "macro_f1", "ccc_arousal", "ccc_valence")


class NodeSubset(Grid):
    """A view of a Grid that exposes only some node ids.

    Lets an unmodified Flower strategy sample among the training devices only, while
    held-out devices stay reserved for evaluation.

    Parameters
    ----------
    grid : Grid
        The real grid (messages still go through it).
    node_ids : iterable of int, optional
        The nodes the strategy may use; None: every node of ``grid`` (a view that only
        changes how messages travel, as :class:`EnrolmentGrid` and :class:`PollingGrid`).
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int] | None = None) -> None:
        self._grid = grid
        self._ids = None if node_ids is None else list(node_ids)

    def set_run(self, run) -> None:  # noqa: D102 - delegated
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102 - delegated
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        """The node ids of this subset that are still connected (every node's without a subset)."""
        if self._ids is None:
            return list(self._grid.get_node_ids())
        connected = set(self._grid.get_node_ids())
        return [i for i in self._ids if i in connected]

    def include(self, node_id: int) -> None:
        """Add ``node_id`` to the subset (a device that joined a running run)."""
        if self._ids is not None and node_id not in self._ids:
            self._ids.append(node_id)

    def push_messages(self, messages):  # noqa: D102 - delegated
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102 - delegated
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - delegated
        return self._grid.send_and_receive(messages, timeout=timeout)


class PollingGrid(NodeSubset):
    """A view of a Deployment Engine grid that waits for replies with shorter polls.

    Flower 1.41's ``send_and_receive`` on a SuperLink's grid sleeps 3 s between pulls, so a
    reply that is ready waits 1.5 s on average, once a round. This view
    pushes and pulls through the same grid with ``poll_s`` between pulls; everything else is
    delegated. One ``PullMessages`` request per ``poll_s`` to the local SuperLink.

    Parameters
    ----------
    grid : Grid
    poll_s : float
        Seconds between pulls (> 0).
    """

    def __init__(self, grid: Grid, poll_s: float = 0.2) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        super().__init__(grid)
        self.poll_s = poll_s

    def send_and_receive(self, messages, *, timeout=None):
        """Push ``messages``; pull replies every ``poll_s`` until all came or ``timeout`` s passed.

        The last pull starts after the deadline, so every reply that reached the SuperLink in
        time is returned. A reply's objects (its arrays) may still be on their way when the
        reply is pulled; Flower's pull waits for them, and a device killed while uploading
        them held the round for the SuperLink's 180 s push-session lifetime, whatever the
        round timeout. Here the wait ends :data:`OBJECT_PULL_GRACE_S` after the deadline
        (:func:`reply_pulls_until`), however many replies are stalled: each becomes an error
        reply and the round goes on.

        Flower's own error replies (a node unavailable, a reply whose objects never came) name
        the ServerApp's node as their sender; they are returned as replies from the device the
        message was sent to, so that the run can say which device failed.
        """
        messages = list(messages)
        sent = {mid: msg for mid, msg in zip(self._grid.push_messages(messages), messages) if mid}
        pending = set(sent)
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while True:
            began = time.monotonic()
            with (reply_pulls_until(end + OBJECT_PULL_GRACE_S) if timeout is not None else contextlib.nullcontext()):
                got = [_from_device(m, sent) for m in self._grid.pull_messages(pending)]
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (timeout is not None and began >= end):
                break
            time.sleep(self.poll_s if timeout is None else max(0.0, min(self.poll_s, end - time.monotonic())))
        return replies


#: Seconds a reply's objects may still be pulled after a round's deadline (see
#: :meth:`PollingGrid.send_and_receive`).
OBJECT_PULL_GRACE_S = 10.0


@contextlib.contextmanager
def reply_pulls_until(deadline: float):
    """Within the block, the SuperLink grid's pulls of reply objects end by ``deadline``
    (``time.monotonic()`` seconds), however many replies one pull holds.

    Flower's ``HttpGrid.pull_messages`` inflates the replies of one pull one after the other,
    each with its own ``max_time`` counted from its own start: k replies whose objects never
    come (devices that lost power mid-upload) held a pull k times as long. Here each object
    pull gets what is left until ``deadline`` (or the process's limit, if lower); a reply
    whose objects are all there is pulled even past it (its first try succeeds).

    Raises
    ------
    RuntimeError
        If this Flower release's grid no longer pulls objects through ``pull_objects``.
    """
    from flwr.superlink.grid import http_grid

    original = getattr(http_grid, "pull_objects", None)
    if original is None:
        raise RuntimeError("flwr.superlink.grid.http_grid has no pull_objects any more: update "
                           "server.app.reply_pulls_until")
    default = (original.__kwdefaults__ or {}).get("max_time")

    def pull_objects(*args, **kwargs):
        left = max(deadline - time.monotonic(), 0.0)
        limit = kwargs.get("max_time", default)
        kwargs["max_time"] = left if limit is None else min(limit, left)
        return original(*args, **kwargs)

    http_grid.pull_objects = pull_objects
    try:
        yield
    finally:
        http_grid.pull_objects = original


def _from_device(reply: Message, sent: dict[str, Message]) -> Message:
    """``reply``, or, for an error reply Flower made itself (its sender is not the node the
    message went to), the same error as a reply from that node."""
    original = sent.get(reply.metadata.reply_to_message_id)
    if original is None or not reply.has_error() or reply.metadata.src_node_id == original.metadata.dst_node_id:
        return reply
    m = reply.metadata  # Flower's own type for these is "system": the original's type says what failed
    metadata = Metadata(run_id=m.run_id, message_id=m.message_id, src_node_id=original.metadata.dst_node_id,
                        dst_node_id=m.dst_node_id, reply_to_message_id=m.reply_to_message_id, group_id=m.group_id,
                        created_at=m.created_at, ttl=m.ttl, message_type=original.metadata.message_type)
    return Message(metadata=metadata, error=reply.error)


def _state_dict(model: torch.nn.Module, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The full ``state_dict`` of ``model`` holding ``arrays`` (copies), for a checkpoint."""
    load_record(model, arrays)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pooled_metrics(stats: list[dict[str, Any]]) -> tuple[dict[str, float], list[tuple[str, str, str, float]]]:
    """Metrics of the pooled predictions, from devices' sufficient statistics.

    Confusion matrices and CCC sums add across devices, so the metrics computed from their
    sums equal those of all devices' predictions pooled.

    Parameters
    ----------
    stats : list of dict
        Each device's statistics: ``cm`` (C, C) counts, ``sums_arousal`` and
        ``sums_valence`` (6,) CCC sums, ``groups`` ``{attribute: {group: {...same...}}}``.

    Returns
    -------
    metrics : dict
        ``uar``, ``wa``, ``macro_f1`` (NaN without categorical labels), ``ccc_arousal``,
        ``ccc_valence`` (NaN without dimensional labels), ``n`` clips evaluated, and per
        attribute ``worst_uar/<attr>`` and ``gap_uar/<attr>`` (largest minus smallest
        group UAR, over groups that have data; the ``"unknown"`` group of clips without a
        value has its rows but is left out of worst groups and gaps), plus the fairness measures of
        :func:`shared_models.fairness.fairness_summary` as ``<measure>/<attr>``: Equal
        Accuracy ``gap_ea`` and Statistical Parity ``gap_sp`` (categorical), and per
        dimension ``worst_ccc_<dim>``, ``gap_ccc_<dim>``, ``worst_mse_<dim>``,
        ``gap_ea_<dim>``, ``gap_sp_<dim>``.
    groups : list of (attribute, group, metric, value)
        Each group's metrics, with ``mse_<dim>``, ``bias_<dim>`` and ``pred_mean_<dim>``.
    """

    def summarise(parts: list[dict[str, Any]]) -> dict[str, float]:
        cm = np.sum([np.asarray(p["cm"]) for p in parts], axis=0)
        out = {k: float("nan") for k in FINAL_METRICS}
        if cm.sum() > 0:
            out.update({k: float(v) for k, v in classification_metrics(cm).items()})
        for dim in ("arousal", "valence"):
            sums = np.sum([np.asarray(p[f"sums_{dim}"], dtype=np.float64) for p in parts], axis=0)
            out[f"ccc_{dim}"] = float(ccc_from_sums(sums))
        out["n"] = float(cm.sum())
        return out

    if not stats:
        return {k: float("nan") for k in FINAL_METRICS}, []
    metrics = summarise(stats)
    rows: list[tuple[str, str, str, float]] = []
    attributes = sorted({a for s in stats for a in s.get("groups", {})})
    for attr in attributes:
        names = sorted({g for s in stats for g in s["groups"].get(attr, {})})
        per_group, confusions = {}, {}
        for g in names:
            parts = [s["groups"][attr][g] for s in stats if g in s["groups"].get(attr, {})]
            per_group[g] = {**summarise(parts), **group_measures(parts)}
            confusions[g] = np.sum([np.asarray(p["cm"]) for p in parts], axis=0)
            rows += [(attr, g, k, v) for k, v in per_group[g].items()]
        # clips without a value have their own rows, but "unknown" is no group of the attribute
        known = {g: m for g, m in per_group.items() if g != UNKNOWN_GROUP}
        uars = [m["uar"] for m in known.values() if m["n"] > 0 and not np.isnan(m["uar"])]
        metrics[f"worst_uar/{attr}"] = min(uars) if uars else float("nan")
        metrics[f"gap_uar/{attr}"] = max(uars) - min(uars) if len(uars) > 1 else float("nan")
        metrics.update({f"{k}/{attr}": v for k, v in fairness_summary(
            known, {g: cm for g, cm in confusions.items() if g in known}).items()})
    return metrics, rows


def _shown(value: Any) -> str:
    """A metric for the round's log line: 3 decimals, ``-`` for none (a head the task does
    not train) and ``inf`` for an unbounded epsilon."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}


def _describe_message(node_id: int) -> Message:
    """The ``query.device_info`` message that asks node ``node_id`` to describe itself."""
    return Message(RecordDict({"config": ConfigRecord()}), node_id, f"{MessageType.QUERY}.device_info")


def _description(reply: Message, node: int, enrolled: dict[int, str]) -> dict[str, Any] | None:
    """The ``device`` record of a ``query.device_info`` reply from ``node``, None (logged) for
    an error reply. An enrolled device's ``name`` is the one the operator enrolled it under."""
    if reply.has_error():
        log.warning("device %s could not describe itself: %s", enrolled.get(node, f"node {node}"), reply.error.reason)
        return None
    info = dict(reply.content["device"])
    if node in enrolled and info.get("name") != enrolled[node]:
        log.info("node %s calls itself %r; its metrics are stored under its enrolled name %r", node,
                 info.get("name"), enrolled[node])
        info["name"] = enrolled[node]
    return info


def _describe(grid: Grid, node_ids: Iterable[int], timeout: float,
              enrolled: dict[int, str] | None = None) -> dict[int, dict[str, Any]]:
    """Ask the nodes ``node_ids`` for their description; returns {node_id: info}.

    ``enrolled`` maps node ids to the names the operator enrolled them under (the device
    registry); an enrolled device's ``name`` is that one, whatever the device calls itself
    (its ``device init --name``, by default its data directory's name): names in the run
    store are the operator's, unique, and cannot be claimed by another device."""
    enrolled = enrolled or {}
    info = {}
    for reply in grid.send_and_receive([_describe_message(n) for n in node_ids], timeout=timeout):
        node = reply.metadata.src_node_id
        if (d := _description(reply, node, enrolled)) is not None:
            info[node] = d
    return info


#: Flower's error codes for a message that never reached its device or whose reply was lost.
_UNDELIVERED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


class LateDevices:
    """Devices that connect after a run began join it (deployment).

    A SuperNode started after the run's device census, or restarted after a crash and let
    back in by the SuperLink only once its old heartbeat expired (up to 2 heartbeat
    intervals, 60 s by default), would otherwise sit idle until the next run. Each call of
    :meth:`poll` asks every newly connected node to describe itself without waiting (the
    question waits at the SuperLink until the device pulls it) and returns the
    descriptions that came since the last call; the run adds those devices from its next
    round on. A node that went away before answering is asked again when it is back. In
    simulation the nodes never change and :meth:`poll` returns nothing.

    Parameters
    ----------
    grid : Grid
    known : iterable of int
        Node ids the run has asked already (its census).
    enrolled : dict, optional
        ``{node_id: name}`` of the enrolled devices (their names in the run store).
    """

    def __init__(self, grid: Grid, known: Iterable[int], enrolled: dict[int, str] | None = None) -> None:
        self.grid, self.known, self.enrolled = grid, set(known), enrolled or {}
        self.asked: dict[str, int] = {}  # message id -> node id, questions not answered yet

    def poll(self) -> dict[int, dict[str, Any]]:
        """Ask the nodes that connected since the last call; return the descriptions
        ``{node_id: info}`` that came since (may be empty). Does not wait for replies."""
        connected = set(self.grid.get_node_ids())
        for mid, node in list(self.asked.items()):
            if node not in connected:  # gone before answering: ask again when it is back
                del self.asked[mid]
                self.known.discard(node)
        if new := sorted(connected - self.known):
            ids = self.grid.push_messages([_describe_message(n) for n in new])
            self.asked.update({mid: n for mid, n in zip(ids, new) if mid})
            self.known.update(new)
        got: dict[int, dict[str, Any]] = {}
        if self.asked:
            with reply_pulls_until(time.monotonic() + OBJECT_PULL_GRACE_S):
                replies = list(self.grid.pull_messages(list(self.asked)))
            for reply in replies:
                node = self.asked.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error() and reply.error.code in _UNDELIVERED:  # not the device's answer
                    self.known.discard(node)  # ask again once it is connected
                elif (d := _description(reply, node, self.enrolled)) is not None:
                    got[node] = d
        return got


def _use(info: dict[str, Any], mode: str) -> str | None:
    """What a run does with a device, from its description: ``"train"`` (a training device
    with labelled clips, or with an unlabelled pool in a mode that learns from it),
    ``"heldout"`` (a held-out device with clips: it only evaluates), or None (nothing)."""
    if info.get("role") == "train" and (
            info.get("n-labelled", 0) + info.get("n-answered", 0) > 0
            or (mode != "supervised" and info.get("n-pool", 0) > 0)):
        return "train"
    if info.get("role") == "heldout" and info.get("n-clips", 0) > 0:
        return "heldout"
    return None


def _left_out(replies: list[Message], messages: list[Message], names: dict[int, str], timeout: float) -> list[str]:
    """What became of the messages without a successful reply: ``"NAME: train failed (reason)"``
    or ``"NAME: no evaluate reply within T s"``, one entry per message."""
    out = []
    answered = {(r.metadata.src_node_id, r.metadata.message_type) for r in replies}
    for r in replies:
        if r.has_error():
            node = r.metadata.src_node_id
            out.append(f"{names.get(node, f'node {node}')}: {r.metadata.message_type} failed ({r.error.reason})")
    for m in messages:
        node, kind = m.metadata.dst_node_id, m.metadata.message_type
        if (node, kind) not in answered:
            out.append(f"{names.get(node, f'node {node}')}: no {kind} reply within {timeout:g} s")
    return out


def _evaluation_messages(node_ids: Iterable[int], arrays: ArrayRecord, server_round: int,
                         extra: dict[str, Any] | None = None) -> list[Message]:
    """``evaluate`` messages carrying the global model to ``node_ids``.

    ``extra`` entries are added to the round config (e.g. ``faireg``)."""
    config = ConfigRecord({"server-round": server_round, **(extra or {})})
    return [Message(RecordDict({"arrays": arrays, "config": config}), node_id, MessageType.EVALUATE)
            for node_id in node_ids]


#: Errors that say the ClientApp itself fails (its code, its config, its data), not that a
#: device is away: when every device of a round fails so, the run cannot make progress.
APP_ERRORS = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
              ErrorCode.MOD_FAILED_PRECONDITION, ErrorCode.INVALID_FAB)


#: Exchanges in a row in which every asked device failed before the run is failed.
ALL_FAILED_LIMIT = 3


class FailureWatch:
    """Fails a run whose devices cannot run it, and only then.

    A device that drops out (no reply, node unavailable) does not stop a round, and one
    device's error does not either, even when it was the only device sampled (fraction-train
    < 1, a pilot with one device). But when every asked device fails with a ClientApp error
    in the first exchange with two or more devices (a config no device can run, such as
    ``compute-device = cuda`` without a GPU), or in :data:`ALL_FAILED_LIMIT` exchanges in a
    row, the rounds would go on with nothing trained or evaluated and the run would end as
    "completed": the run fails instead. One watch per phase (``train``, ``evaluate``).
    """

    def __init__(self, what: str, limit: int = ALL_FAILED_LIMIT) -> None:
        self.what, self.limit, self.streak, self.ever_ok = what, limit, 0, False

    def check(self, replies: list[Message], sent: int, server_round: int) -> None:
        """Account one exchange: ``sent`` messages of this phase, their ``replies``.

        Raises
        ------
        RuntimeError
            Naming the phase, the round and the distinct errors (at most 3, with counts).
        """
        if not sent:
            return
        failed = [r for r in replies if r.has_error() and r.error.code in APP_ERRORS]
        if len(failed) < sent:
            # only a device that did the work shows the config can run: a dropped one says nothing
            self.ever_ok, self.streak = self.ever_ok or any(not r.has_error() for r in replies), 0
            return
        self.streak += 1
        if self.streak >= self.limit or (not self.ever_ok and sent >= 2):
            reasons = collections.Counter(
                (r.error.reason.strip().splitlines() or ["no reason given"])[-1][:300] for r in failed)
            listed = "; ".join(f"{reason} ({n}x)" for reason, n in reasons.most_common(3))
            raise RuntimeError(f"every device failed to {self.what} round {server_round}"
                               + (f" ({self.streak} exchanges in a row)" if self.streak > 1 else "")
                               + f": {listed}")
        log.warning("every device asked to %s round %d failed (%d in a row; the run fails at %d)",
                    self.what, server_round, self.streak, self.limit)


def _failure_text(err: BaseException, name: str, deployed: bool) -> str:
    """What the run store keeps of why run ``name`` ended: a stop is said in a line, anything
    else is its traceback."""
    from flwr.supercore.run import RunNotRunningException

    if not isinstance(err, (KeyboardInterrupt, SystemExit, RunNotRunningException)):
        return "".join(traceback.format_exception(err))
    if deployed:
        # Flower ends the ServerApp of a run stopped on the SuperLink (`fedaffect train`
        # interrupted or timed out, `flwr stop`, the coordinator stopped) with a signal
        return (f"stopped ({type(err).__name__}): the run was stopped on the SuperLink (fedaffect train "
                f"interrupted or timed out, flwr stop, or the coordinator stopped); `fedaffect train --resume "
                f"{name}` continues it")
    return f"stopped ({type(err).__name__}): interrupted"


def _trained(reply: Message) -> bool:
    """Whether a successful train reply holds a local update: a device that had nothing
    labelled this round (a cooperative device whose pool is still unlabelled) replies with
    ``num-examples`` 0 and a NaN ``train_loss`` and the model it received. Such replies are
    left out of aggregation: q-FFL would turn the model into NaN (its weights use the loss),
    FedAvg's round loss would be NaN, and a DP wrapper counts the device as a zero update."""
    metrics = reply.content["metrics"]
    return int(metrics.get("num-examples", 0)) > 0 and math.isfinite(float(metrics.get("train_loss", math.nan)))


def _evaluation_part(reply: Message, names: dict[int, str] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """``(stats, metrics, device row)`` of one device's evaluation of the global model: an
    ``evaluate`` reply, or a ``train`` reply carrying ``eval-stats`` (the model as received,
    before local training); None for an error (logged by the round) or a train reply without
    them. ``names``: node id -> the device's name in the run store (default: the name it sends)."""
    if reply.has_error():
        return None
    info = dict(reply.content["device"])
    info["name"] = (names or {}).get(reply.metadata.src_node_id, info["name"])
    if reply.metadata.message_type == MessageType.TRAIN:
        if "eval-stats" not in info:
            return None
        stats = json.loads(info["eval-stats"])
        m = {"num-examples": int(stats["num_examples"]), "eval_loss": float(info["eval-loss"])}
    else:
        stats = json.loads(info["stats"])
        m = dict(reply.content["metrics"])
    local = pooled_metrics([stats])[0]
    row = {"device": info["name"], "role": info["role"], "phase": "evaluate", "metrics": _json_safe({**m, **local})}
    return stats, m, row


def _pool_evaluation(parts: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]], expected: int):
    """Pooled metrics, device rows and per-group rows of a round's evaluation from its
    devices' :func:`_evaluation_part`; ``expected`` devices were asked (``eval_failures``
    counts the errors and the devices that never answered)."""
    stats = [s for s, _, _ in parts]
    devices = [row for _, _, row in parts]
    metrics, groups = pooled_metrics(stats)
    # a device without labels for the task evaluates nothing: its loss is NaN over 0 clips
    losses = [(l, n) for l, n in ((float(m["eval_loss"]), m["num-examples"]) for _, m, _ in parts)
              if n > 0 and math.isfinite(l)]
    total = sum(n for _, n in losses)
    metrics["eval_loss"] = float(sum(l * n for l, n in losses) / total) if total else float("nan")
    metrics["eval_failures"] = expected - len(devices)
    # the pooled confusion counts (rows true class, columns predicted): the report's matrix
    metrics[CONFUSION_KEY] = (np.sum([np.asarray(s["cm"], dtype=np.int64) for s in stats], axis=0).tolist()
                              if stats else None)
    return metrics, devices, groups


def _is_dimensional(name: str) -> bool:
    return "arousal" in name or "valence" in name


def task_metrics(metrics: dict[str, Any], groups: list[tuple[str, str, str, float]], task: str):
    """Blank the metrics of a head the run does not train.

    With ``task = "emotion"`` the arousal/valence head is never trained, so its CCC and
    fairness measures are set to NaN (and its group rows dropped); with ``task = "av"`` the
    categorical ones (UAR, WA, macro-F1, their group gaps) are. Counts and losses stay.
    """
    keep_dim, keep_cat = task in ("av", "both"), task in ("emotion", "both")

    def wanted(name: str) -> bool:
        base = name.split("/")[0]
        if _is_dimensional(base):
            return keep_dim
        if base.removeprefix("worst_").removeprefix("gap_") in ("uar", "wa", "macro_f1", "ea", "sp", CONFUSION_KEY):
            return keep_cat
        return True  # counts, losses

    out = {k: (v if wanted(k) else float("nan")) for k, v in metrics.items()}
    return out, [g for g in groups if wanted(g[2])]


def _weight_rows(strategy) -> list[tuple[str, str, str, float]]:
    """Per-group aggregation weights of the last round, from a strategy that keeps them
    (:class:`strategies.fair.FairAvg`): ``agg_weight`` (received) and ``count_weight``
    (what FedAvg's example counts would have given)."""
    attr = getattr(strategy, "attribute", "")
    rows = []
    for metric, table in (("agg_weight", getattr(strategy, "last_group_weights", None)),
                          ("count_weight", getattr(strategy, "last_count_weights", None))):
        rows += [(attr, str(g), metric, float(w)) for g, w in (table or {}).items()]
    return rows


def _faireg_config(grid: Grid, cfg: RunConfig, train_ids: list[int]) -> dict[str, Any]:
    """FaiReg set-up before round 1: ``{"faireg": JSON}`` for every round config, or ``{}``.

    Asks the training devices for their per-group label statistics (``query.label_stats``),
    pools them, and computes per-group means and standard deviations
    (:func:`shared_models.fairness.faireg_params`). Held-out devices are not asked.

    Raises
    ------
    RuntimeError
        If ``faireg`` is on and no training device sent arousal/valence label statistics.
    """
    if cfg.faireg != "on":
        return {}
    if cfg.task not in ("av", "both"):
        log.warning("faireg normalises arousal/valence labels; task %r has none: FaiReg is off", cfg.task)
        return {}
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), node_id, f"{MessageType.QUERY}.label_stats")
        for node_id in train_ids
    ]
    parts = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error():
            log.warning("device %s sent no label statistics: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        parts.append(json.loads(str(reply.content["device"]["label-stats"])))
    pooled = pool_label_stats(parts)
    if not pooled:
        raise RuntimeError("faireg is on but no training device has arousal/valence labels")
    params = faireg_params(pooled, cfg.protected_list, reference=cfg.faireg_reference)
    log.info("FaiReg: %d devices, groups %s", len(parts),
             {g: np.round(v, 3).tolist() for g, v in params.groups.items()})
    return {"faireg": params.to_json()}


def _wait_for_devices(grid: Grid, min_devices: int, timeout: float, key: str = "min-devices",
                      expected: dict[int, str] | None = None) -> None:
    """Wait until ``min_devices`` devices are connected (deployment: SuperNodes may still
    be starting when a run is submitted). ``expected``: node id -> name of the devices that
    should be there (the enrolled ones), named in the messages when they are not.

    Raises
    ------
    RuntimeError
        If fewer are connected after ``timeout`` seconds.
    """
    if min_devices <= 0:
        return
    deadline = time.monotonic() + timeout

    def absent(connected: set[int]) -> str:
        names = sorted(name for node, name in (expected or {}).items() if node not in connected)
        return f" (not connected: {', '.join(names)})" if names else ""

    while True:
        connected = set(grid.get_node_ids())
        n = len(connected)
        if n >= min_devices:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {n} of {key}={min_devices} devices connected after {timeout:.0f}s"
                               f"{absent(connected)}")
        log.info("waiting for devices: %d of %d connected%s", n, min_devices, absent(connected))
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))


class EnrolmentGrid(NodeSubset):
    """A view of a Grid that adds each device's enrolled group attributes to its messages.

    In a real federation the operator records a device's protected-group attributes at
    enrolment (``fedaffect server enrol --group gender=female``, the registry of
    :mod:`server.deployment`). Every message to an enrolled node gets a ``enrolment``
    ConfigRecord with them; the device uses them for clips whose manifest lacks the
    attribute (:func:`client.app.load_device`). Messages are copied, never mutated: a
    strategy may send one RecordDict to many nodes.

    Parameters
    ----------
    grid : Grid
    groups : dict
        ``{node_id: {attribute: value}}``.
    """

    def __init__(self, grid: Grid, groups: dict[int, dict[str, str]]) -> None:
        super().__init__(grid)
        self._groups = groups

    @classmethod
    def from_registry(cls, grid: Grid, store: RunStore) -> Grid:
        """``grid`` itself when no enrolled device has attributes, else the view."""
        groups = {int(d.node_id): dict(d.groups) for d in store.enrolled_devices(include_revoked=False) if d.groups}
        return cls(grid, groups) if groups else grid

    def _with_groups(self, messages):
        out = []
        for msg in messages:
            attrs = self._groups.get(msg.metadata.dst_node_id)
            if attrs:
                content = RecordDict({**dict(msg.content.items()), "enrolment": ConfigRecord(attrs)})
                msg = Message(content, msg.metadata.dst_node_id, msg.metadata.message_type,
                              group_id=msg.metadata.group_id, ttl=msg.metadata.ttl)
            out.append(msg)
        return out

    def push_messages(self, messages):  # noqa: D102
        return self._grid.push_messages(self._with_groups(messages))

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        return self._grid.send_and_receive(self._with_groups(messages), timeout=timeout)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    store: RunStore,
    engine: str = "",
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a whole federated run on ``grid`` and record it in ``store``.

    Parameters
    ----------
    grid : Grid
        Flower grid (Simulation Engine, Deployment Engine or fedaffect's in-process grid).
    cfg : RunConfig
        The run's configuration; ``emotions`` must be set for the categorical head.
    store : RunStore
    engine : str
        Name of the engine, stored with the run.
    on_round : callable, optional
        Called as ``on_round(round, metrics)`` after each stored round (progress display).

    Returns
    -------
    dict
        The run's summary (also stored): config, final metrics, per-group final metrics.

    Raises
    ------
    RuntimeError
        If no device is available for training.

    Notes
    -----
    One exchange with the devices a round. Round ``r``'s model goes out once, for its
    evaluation and for round ``r + 1``'s training: held-out devices get ``evaluate`` messages
    in the same batch as the training devices' ``train`` messages; without held-out devices
    the train messages ask for ``eval-stats`` (the device evaluates the model as received,
    before training it) and only training devices the strategy did not sample get an
    ``evaluate`` message. ``R`` rounds take ``R + 1`` exchanges instead of ``2R + 1``, each
    with the same messages' worth of work; round ``r`` is stored (metrics, checkpoint) when
    its exchange is over. A resumed run first trains the round after the last stored one.
    """
    name = cfg.run_name or f"run-{int(time.time())}"
    deployed = isinstance(grid, PollingGrid)  # a SuperLink's grid (main): `fedaffect train --resume` applies
    start_round, resumed = 0, None
    if cfg.resume:  # continue a stored run from its last valid checkpoint
        run, resumed = store.reopen_run(cfg.resume, cfg.to_mapping())
        name = run.name
        start_round = resumed[0] + 1 if resumed else 0
        log.info("resuming run %s at round %d", name, start_round)
    else:
        run = store.create_run(name, cfg.to_mapping(), engine)
    try:
        enrolled = {int(d.node_id): d.name for d in store.enrolled_devices(include_revoked=False)
                    if str(d.node_id).isdigit()}  # deployment's device registry (none in simulation)
        _wait_for_devices(grid, cfg.min_devices, cfg.round_timeout, expected=enrolled)
        grid = EnrolmentGrid.from_registry(grid, store)
        census = list(grid.get_node_ids())
        info = _describe(grid, census, cfg.round_timeout, enrolled)
        late = LateDevices(grid, census, enrolled)  # devices that connect later join from the next round
        names = {n: str(d["name"]) for n, d in info.items()}
        train_ids = [n for n, d in info.items() if _use(d, cfg.mode) == "train"]
        heldout_ids = [n for n, d in info.items() if _use(d, cfg.mode) == "heldout"]
        if not train_ids:
            raise RuntimeError(f"no training device with labelled clips among {len(info)} devices")
        eval_ids = heldout_ids or train_ids  # the list itself: devices that join later are evaluated too
        log.info(
            "run %s: %d training devices, %d held-out devices (%s)",
            name, len(train_ids), len(heldout_ids), "held-out evaluation" if heldout_ids else "in-sample evaluation",
        )
        emotions = cfg.emotion_list
        torch.manual_seed(cfg.seed)
        # Flower's strategies sample devices with Python's random module (fraction-train < 1):
        # seeded, so that runs with one seed (a fair and a FedAvg run, say) sample alike
        random.seed(cfg.seed * 1_000_003 + start_round)
        initial = build_model(cfg.model, max(len(emotions), 1))
        if cfg.init:  # transfer learning: start from a pre-trained checkpoint (client/transfer.py)
            log.info(load_initial(initial, cfg.init, cfg.model, emotions, task=cfg.task))
        arrays = to_record(initial)
        coop = CoopTracker(info[n] for n in train_ids)  # cooperative learning counts per round
        if resumed:
            initial.load_state_dict(resumed[1]["state_dict"])
            arrays = to_record(initial)
            coop.load_state_dict(resumed[1].get("coop", {}))
        strategy = build_strategy(cfg, len(train_ids))
        min_train = min_train_devices(cfg, len(train_ids))  # the strategy's minimum
        train_grid = NodeSubset(grid, train_ids)
        # aggregates of the devices' updates computed so far (differential privacy spends
        # budget on each): a resumed run counts those before its checkpoint, including one
        # that may have gone out in the exchange that was cut short
        aggregates = int(resumed[1].get("aggregates", start_round)) if resumed else 0
        round_extra = _faireg_config(grid, cfg, train_ids)
        ckpt_dir = Path(cfg.run_dir) / name / "checkpoints"

        in_sample = not heldout_ids
        watch = {"train": FailureWatch("train"), "evaluate": FailureWatch("evaluate")}

        def admit_late_devices(from_round: int) -> None:
            """Add the devices that connected since the census (:class:`LateDevices`): training
            devices train from ``from_round`` on; held-out devices evaluate, when the run
            evaluates on held-out devices (an in-sample run keeps its population)."""
            for node, d in late.poll().items():
                use = _use(d, cfg.mode)
                if use == "train":
                    train_ids.append(node)
                    train_grid.include(node)
                    coop.add(d)
                elif use == "heldout" and not in_sample:
                    heldout_ids.append(node)
                else:
                    log.info("device %s connected during the run; nothing for it to do in this run (role %s, "
                             "%s labelled clips)", d.get("name"), d.get("role"), d.get("n-labelled"))
                    continue
                names[node] = str(d["name"])
                log.info("device %s joined the run at round %d (%s)", names[node], from_round,
                         "training" if use == "train" else "held-out evaluation")

        def phase(eval_round: int | None, train_round: int | None, arrays: ArrayRecord):
            """One exchange with the devices: the global model ``arrays`` goes out once for the
            evaluation of ``eval_round`` and the training of ``train_round`` (either may be None).
            Returns (evaluation or None, train outcome or None, aggregated arrays or None)."""
            train_msgs: list[Message] = []
            if train_round is not None:
                admit_late_devices(train_round)
                train_config = ConfigRecord({
                    "local-epochs": cfg.local_epochs, "lr": cfg.lr, **round_extra, **round_settings(cfg, train_round),
                    # in-sample evaluation rides on the train message: the device evaluates the
                    # model it receives before training it (client.app.train, ``eval-stats``)
                    "eval-stats": in_sample and eval_round is not None,
                })
                # Flower's sampling would wait for the strategy's minimum without end
                _wait_for_devices(train_grid, min_train, cfg.round_timeout, "min-train-devices",
                                  {n: names[n] for n in train_ids})
                train_msgs = list(strategy.configure_train(train_round, arrays, train_config, train_grid))
            eval_msgs: list[Message] = []
            if eval_round is not None:
                training = {m.metadata.dst_node_id for m in train_msgs} if in_sample else set()
                eval_msgs = _evaluation_messages([n for n in eval_ids if n not in training], arrays, eval_round,
                                                 round_extra)
            replies = list(grid.send_and_receive(train_msgs + eval_msgs, timeout=cfg.round_timeout))
            if missing := _left_out(replies, train_msgs + eval_msgs, names, cfg.round_timeout):
                log.warning("round %d: left out %s", eval_round if eval_round is not None else train_round,
                            "; ".join(missing))
            train_replies = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
            watch["train"].check(train_replies, len(train_msgs), train_round)
            watch["evaluate"].check([r for r in replies if r.metadata.message_type == MessageType.EVALUATE],
                                    len(eval_msgs), eval_round)
            evaluation = None
            if eval_round is not None:
                parts = [p for r in replies if (p := _evaluation_part(r, names)) is not None]
                evaluation = _pool_evaluation(parts, len(eval_ids))
            if train_round is None:
                return evaluation, None, None
            updates = [r for r in train_replies if r.has_error() or _trained(r)]
            new_arrays, agg = (strategy.aggregate_train(train_round, updates)
                               if any(not r.has_error() for r in updates) else (None, None))
            ok = [r for r in train_replies if not r.has_error()]
            infos = [{**dict(r.content["device"]), "name": names.get(r.metadata.src_node_id, r.content["device"]["name"])}
                     for r in ok]  # the names CoopTracker was built with (enrolled ones in deployment)
            outcome = {
                "metrics": {
                    "train_loss": float(agg["train_loss"]) if agg and "train_loss" in agg else float("nan"),
                    "train_devices": len(ok),
                    "train_failures": len(train_msgs) - len(ok),
                },
                "devices": [{"device": d["name"], "role": d["role"], "phase": "train",
                             "metrics": dict(r.content["metrics"])} for d, r in zip(infos, ok)],
                "infos": infos,
                "weights": _weight_rows(strategy),
            }
            return evaluation, outcome, new_arrays

        # Round r is stored once its model has been evaluated. Its evaluation travels with the
        # next round's training (one exchange a round instead of two): held-out devices get
        # ``evaluate`` messages in the same batch as the training devices' ``train`` messages
        # of round r + 1, or, for in-sample evaluation, the training devices evaluate the model
        # they receive before training it. The last round is evaluated alone.
        pending = None  # the train outcome of the round evaluated next
        t0 = time.perf_counter()
        if 0 < start_round <= cfg.num_server_rounds:  # resumed: round start_round - 1 is stored
            _, pending, new_arrays = phase(None, start_round, arrays)
            if new_arrays is not None:
                arrays, aggregates = new_arrays, aggregates + 1
        for server_round in range(start_round, cfg.num_server_rounds + 1):
            next_round = server_round + 1 if server_round < cfg.num_server_rounds else None
            released = aggregates  # the aggregates devices have received so far
            (eval_metrics, eval_devices, groups), outcome, new_arrays = phase(server_round, next_round, arrays)
            aggregates += new_arrays is not None
            devices = list(pending["devices"]) if pending else []
            train_metrics: dict[str, Any] = dict(pending["metrics"]) if pending else {}
            train_metrics.update(coop.update(pending["infos"] if pending else []))
            if hasattr(strategy, "epsilon"):  # differential privacy (strategies/dp.py): spent so far
                train_metrics["dp_epsilon"] = strategy.epsilon(released)
            eval_metrics, groups = task_metrics(eval_metrics, groups, cfg.task)
            if pending:
                groups = groups + pending["weights"]
            now = time.perf_counter()
            metrics = {**train_metrics, **eval_metrics, "wall_s": now - t0}
            t0 = now
            store.add_round(run.id, server_round, _json_safe(metrics), devices + eval_devices, [
                g for g in groups if not np.isnan(g[3])
            ])
            store.save_checkpoint(
                run.id,
                server_round,
                {"round": server_round, "model": cfg.model, "emotions": emotions,
                 "state_dict": _state_dict(initial, arrays), "config": cfg.to_mapping(), "coop": coop.state_dict(),
                 "aggregates": aggregates,
                 # FaiReg: the model's arousal/valence are normalised; predict maps them back with these
                 "faireg": round_extra.get("faireg", "")},
                ckpt_dir,
            )
            if on_round:
                on_round(server_round, metrics)
            log.info(
                "round %d/%d  train_loss %s  UAR %s  CCC-A %s  CCC-V %s%s  (%.1fs)",
                server_round, cfg.num_server_rounds,
                *(_shown(metrics.get(k)) for k in ("train_loss", "uar", "ccc_arousal", "ccc_valence")),
                f"  epsilon {_shown(metrics['dp_epsilon'])}" if "dp_epsilon" in metrics else "", metrics["wall_s"],
            )
            pending = outcome
            if new_arrays is not None:
                arrays = new_arrays
        summary = run_summary(store, run.id)
        store.finish_run(run.id, "completed", summary)
        return summary
    except BaseException as err:
        store.finish_run(run.id, "failed", error=_failure_text(err, name, deployed))
        raise


def run_summary(store: RunStore, run_id: int) -> dict[str, Any]:
    """Summary of a stored run: config, per-round metrics, final metrics, per-group finals.

    With ``dp`` on, ``final`` has ``dp_epsilon`` and ``privacy`` the DP settings and the
    ``(epsilon, delta)`` spent by the last round."""
    run = store.get_run(run_id)
    rounds = store.rounds(run_id)
    last = rounds[-1] if rounds else {}
    final_round = last.get("round", 0)
    per_group: dict[str, dict[str, dict[str, float]]] = {}
    for row in store.group_metrics(run_id):
        if row["round"] == final_round:
            per_group.setdefault(row["attribute"], {}).setdefault(row["group"], {})[row["metric"]] = row["value"]
    final = {k: last.get(k) for k in FINAL_METRICS}
    final.update({k: v for k, v in last.items() if k.startswith(("worst_", "gap_"))})
    summary = {"run": run.name, "config": run.config, "rounds": rounds, "final": final, "per_group": per_group}
    if "dp_epsilon" in last:
        final["dp_epsilon"] = last["dp_epsilon"]
        summary["privacy"] = {"dp": run.config.get("dp"), "epsilon": last["dp_epsilon"],
                              "delta": run.config.get("dp-delta"), "rounds": final_round,
                              "clipping_norm": run.config.get("dp-clipping-norm"),
                              "noise_multiplier": run.config.get("dp-noise-multiplier")}
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """ServerApp entry point: run the federation described by the run config."""
    if not log.handlers and not logging.getLogger().handlers:
        # In a SuperLink's ServerApp process nobody configured logging: show round progress.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    cfg = RunConfig.from_mapping(context.run_config)
    # Deployment: `fedaffect server start` passes the run store's URL in the environment
    # when it holds a password (server/deployment.py).
    store = RunStore(cfg.store_url or os.environ.get("FEDAFFECT_STORE_URL") or default_store_url(cfg.run_dir))
    if type(grid).__name__ == "HttpGrid":  # a SuperLink's grid: 3 s between pulls (simulation grids poll fast)
        grid = PollingGrid(grid)
        shorten_object_pull_backoff()
    run_federation(grid, cfg, store, engine="flower")
