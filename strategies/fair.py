"""Fairness-normalised aggregation: FedAvg whose device weights lean towards groups left behind.

After FairFed (Ezzeldin et al., "FairFed: Enabling Group Fairness in Federated Learning",
AAAI 2023), adapted to performance parity between speaker groups:

1. FedAvg's weights: ``w_k = n_k / n`` (``num-examples``; a device without examples gets 0),
   optionally re-balanced between groups (``balance``, :func:`group_balanced`): each group's
   total becomes proportional to its FedAvg total to the power ``balance``, so a group held
   by few devices is not outweighed by device count alone (the "fairness-normalised" part:
   FedAvg's weights normalised per group before the fairness step).
2. Every sampled device evaluates the round's *global* model on its own labelled clips before
   training, and sends the sufficient statistics (confusion counts, CCC sums, per protected
   group) as the JSON entry ``pre-stats`` of its reply's ``device`` ConfigRecord; its
   ``metrics`` MetricRecord is unchanged (FedAvg needs identical keys on every reply).
3. The strategy pools these statistics per group of ``attribute`` and computes each group's
   metric ``F_g`` and the global one ``F`` (UAR for the ``emotion`` and ``both`` tasks, the
   mean of the arousal and valence CCC for ``av``).
4. A device's gap is ``D_k = F - F_{g(k)}``, positive when its group is behind the global
   model (for a device holding several groups, the mean of ``F - F_g`` weighted by its share
   of clips in each group; a group without data, and the ``"unknown"`` group of clips
   without a value, count 0).
5. ``w_k <- w_k + beta * (D_k - mean_i D_i)`` (mean over the devices with examples), clipped
   at 0 and renormalised; the new global model is ``sum_k w_k theta_k``.

FairFed itself moves weight *away* from clients whose local fairness metric is far from the
global one, ``w_k <- w_k - beta * (|F_k - F| - mean)``; with a performance metric per group
the useful direction is signed: a group behind the global metric receives *more* weight,
a group ahead less, so the gap between groups closes. Weights are recomputed every round from
``n_k / n`` (no memory across rounds), so that devices may come, go or drop out freely: a
device whose reply failed simply does not appear. ``beta = 0`` is exactly FedAvg (the same
aggregation code runs).

Every round the strategy keeps the weight each group received (``last_group_weights``) and
the weight FedAvg would have given it (``last_count_weights``); the coordinator stores both
as per-group metrics ``agg_weight`` and ``count_weight``. ``history`` holds one entry per round.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from shared_models.fairness import UNKNOWN_GROUP, device_group_shares, group_task_metrics, task_metric

__all__ = ["FairAvg", "fair_weights", "group_balanced", "PRE_STATS_KEY"]

log = logging.getLogger("fedaffect.strategies")

PRE_STATS_KEY = "pre-stats"
"""Round-config flag asking devices for pre-training statistics, and the reply entry holding them."""


def _as_shares(group: str | Mapping[str, float]) -> dict[str, float]:
    """A device's group as ``{group: share of its clips}``."""
    return {group: 1.0} if isinstance(group, str) else dict(group)


def _group_totals(weights: Sequence[float], shares: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each group's total of the device ``weights``, devices counting by their ``shares``."""
    totals: dict[str, float] = {}
    for w, sh in zip(weights, shares):
        for g, share in sh.items():
            totals[g] = totals.get(g, 0.0) + float(w) * share
    return totals


def _device_gap(group: str | Mapping[str, float], group_metric: Mapping[str, float], global_metric: float) -> float:
    if not np.isfinite(global_metric):
        return 0.0
    gap = 0.0
    for g, share in _as_shares(group).items():
        f = group_metric.get(g, float("nan"))
        if f is not None and np.isfinite(f):
            gap += share * (global_metric - f)
    return gap


def group_balanced(base: np.ndarray, groups: Sequence[str | Mapping[str, float]], balance: float) -> np.ndarray:
    """Re-weight devices so that each group's total weight becomes proportional to its
    FedAvg total raised to ``balance``: 1 leaves ``base`` as it is, 0 gives every group the
    same total (within a group, devices keep FedAvg's proportions).

    Parameters
    ----------
    base : np.ndarray, shape (K,)
        FedAvg's weights (non-negative, summing to 1).
    groups : sequence, length K
        Each device's group, or its share of clips per group (mapping group -> share); the
        devices without a group (empty mapping) count as one group of their own.
    balance : float in [0, 1]

    Returns
    -------
    np.ndarray, shape (K,)
        Non-negative weights summing to 1 (``base`` itself when ``balance`` is 1).
    """
    if balance == 1 or base.sum() <= 0:
        return base
    shares = [_as_shares(group) or {"": 1.0} for group in groups]
    totals = _group_totals(base, shares)
    factor = np.array([sum(share * totals[g] ** (balance - 1.0) for g, share in sh.items() if totals[g] > 0)
                       for sh in shares])
    w = base * factor
    return w / w.sum() if w.sum() > 0 else base


def fair_weights(
    num_examples: Sequence[float],
    groups: Sequence[str | Mapping[str, float]],
    group_metric: Mapping[str, float],
    global_metric: float,
    beta: float,
    balance: float = 1.0,
) -> np.ndarray:
    """Fairness-normalised aggregation weights of one round.

    Parameters
    ----------
    num_examples : sequence of float, length K
        ``num-examples`` of each replying device (>= 0).
    groups : sequence, length K
        Each device's group (str), or its share of clips per group (mapping group -> share).
    group_metric : mapping group -> float
        Each group's metric of the current global model (higher is better; NaN = no data).
    global_metric : float
        The same metric over all devices' data (NaN: all gaps 0, FedAvg weights).
    beta : float
        Step size (>= 0); 0 gives FedAvg's weights ``n_k / n`` exactly (with ``balance`` 1).
    balance : float in [0, 1] (default: 1)
        Group re-balancing of FedAvg's weights before the step (:func:`group_balanced`):
        1 none, 0 equal total weight per group.

    Returns
    -------
    np.ndarray, shape (K,)
        Non-negative weights summing to 1 (all 0 when no device has examples). A device
        with no examples gets 0 and does not enter the mean gap.

    Raises
    ------
    ValueError
        For mismatched lengths, negative or non-finite counts, or a negative beta.
    """
    n = np.asarray(num_examples, dtype=np.float64).reshape(-1)
    if len(groups) != n.size:
        raise ValueError(f"{n.size} example counts but {len(groups)} groups")
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"example counts must be finite and >= 0, got {n.tolist()}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not 0 <= balance <= 1:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    total = n.sum()
    if total <= 0:
        return np.zeros_like(n)
    base = group_balanced(n / total, groups, balance)
    if beta == 0:
        return base
    active = n > 0
    gaps = np.array([_device_gap(g, group_metric, global_metric) for g in groups], dtype=np.float64)
    w = np.where(active, base + beta * (gaps - gaps[active].mean()), 0.0)
    w = np.clip(w, 0.0, None)
    # Before clipping the active weights sum to 1 (the gap deviations sum to 0), so s >= 1.
    return w / w.sum()


def _weighted_arrays(records: list[RecordDict], weights: np.ndarray) -> ArrayRecord:
    """``sum_k w_k theta_k`` with FedAvg's accumulation order (weights already normalised)."""
    out: dict[str, np.ndarray] = {}
    for record, w in zip(records, weights, strict=True):
        for arrays in record.array_records.values():
            for key, value in arrays.items():
                if key not in out:
                    out[key] = value.numpy() * float(w)
                else:
                    out[key] += value.numpy() * float(w)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})


class FairAvg(FedAvg):
    """FedAvg with fairness-normalised device weights (FairFed-style, signed group gaps).

    Parameters
    ----------
    beta : float (default: 1.0)
        Fairness step size; 0 is FedAvg. FairFed's implementations use 1 to 5.
    attribute : str (default: "gender")
        Protected attribute whose groups are balanced (one of the run's protected ones).
    balance : float in [0, 1] (default: 1.0)
        Each group's total weight before the fairness step is its FedAvg total to this power
        (:func:`group_balanced`): 1 FedAvg's, 0 equal per group.
    task : str (default: "emotion")
        ``emotion``/``both`` balance UAR; ``av`` balances the mean arousal/valence CCC.
    stats_key : str (default: "pre-stats")
        Round-config flag sent to devices and the reply's ``device`` ConfigRecord entry
        holding their JSON statistics of the global model before training.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As :class:`flwr.serverapp.strategy.FedAvg`.

    Attributes
    ----------
    last_group_weights : dict group -> float
        Aggregation weight each group received in the last aggregated round.
    last_count_weights : dict group -> float
        What FedAvg (``n_k / n``) would have given each group in that round.
    history : list of dict
        Per round: ``round``, ``global_metric``, ``group_metric``, ``weights``,
        ``count_weights`` (per device, in reply order), ``group_weights``, ``count_group_weights``.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        beta: float = 1.0,
        attribute: str = "gender",
        balance: float = 1.0,
        task: str = "emotion",
        stats_key: str = PRE_STATS_KEY,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 0 <= balance <= 1:
            raise ValueError(f"balance must be in [0, 1], got {balance}")
        self.beta = float(beta)
        self.balance = float(balance)
        self.attribute = attribute
        self.task = task
        self.stats_key = stats_key
        self.last_group_weights: dict[str, float] = {}
        self.last_count_weights: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    def summary(self) -> None:
        """Log the configuration."""
        log.info("FairAvg: beta %s, balance %s, attribute %r, task %r", self.beta, self.balance, self.attribute,
                 self.task)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg, and ask every device for its statistics of the global model."""
        config[self.stats_key] = True
        return super().configure_train(server_round, arrays, config, grid)

    def _device_stats(self, content: RecordDict) -> tuple[dict | None, dict[str, float]]:
        """A reply's pre-training statistics and its group shares (from them, else from
        the ``groups`` lists of its description)."""
        info = content.config_records.get("device")
        stats = None
        if info is not None and self.stats_key in info:
            try:
                stats = json.loads(str(info[self.stats_key]))
            except (TypeError, ValueError):
                stats = None
        shares = device_group_shares(stats, self.attribute) if stats else {}
        if not shares and info is not None and "groups" in info:
            try:
                values = json.loads(str(info["groups"])).get(self.attribute, [])
            except (TypeError, ValueError, AttributeError):
                values = []
            shares = {str(v): 1.0 / len(values) for v in values} if values else {}
        return stats, shares

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies with fairness-normalised weights (see the module docstring)."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        self.last_group_weights, self.last_count_weights = {}, {}
        if not valid_replies:
            return None, None
        contents = [msg.content for msg in valid_replies]
        counts = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        parsed = [self._device_stats(c) for c in contents]
        stats = [s for s, _ in parsed if s is not None]
        shares = [sh for _, sh in parsed]
        global_metric = task_metric(stats, self.task) if stats else float("nan")
        # clips without a value (UNKNOWN_GROUP) are no group to pull towards: no gap step for them
        group_metric = {g: v for g, v in (group_task_metrics(stats, self.attribute, self.task) if stats else {}).items()
                        if g != UNKNOWN_GROUP}
        weights = fair_weights(counts, shares, group_metric, global_metric, self.beta, self.balance)
        count_weights = fair_weights(counts, shares, group_metric, global_metric, 0.0)

        self.last_group_weights = _group_totals(weights, shares)
        self.last_count_weights = _group_totals(count_weights, shares)
        self.history.append({
            "round": server_round, "global_metric": global_metric, "group_metric": group_metric,
            "weights": weights.tolist(), "count_weights": count_weights.tolist(),
            "group_weights": self.last_group_weights, "count_group_weights": self.last_count_weights,
        })
        log.info("round %d: %s global %.3f, groups %s, group weights %s (FedAvg %s)", server_round, self.task,
                 global_metric, {g: round(v, 3) for g, v in group_metric.items()},
                 {g: round(v, 3) for g, v in self.last_group_weights.items()},
                 {g: round(v, 3) for g, v in self.last_count_weights.items()})

        if sum(counts) <= 0:
            arrays = None  # nobody trained on anything: keep the global model
        elif self.beta == 0 and self.balance == 1:
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key)  # FedAvg itself
        else:
            arrays = _weighted_arrays(contents, weights)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if sum(counts) > 0 else None
        return arrays, metrics
