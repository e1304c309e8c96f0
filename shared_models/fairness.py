"""Fairness across protected groups: measures from sufficient statistics, and FaiReg.

Both halves work on what devices are allowed to send: counts and sums, never a prediction,
a label or a clip.

Fairness measures
-----------------
The coordinator adds the devices' per-group statistics (confusion matrices, the six CCC sums
per affect dimension; see :func:`shared_models.training.evaluate_local`) and computes, per
protected attribute, each group's metrics and how far apart the groups are. Equal Accuracy
(EA) and Statistical Parity (SP) are the fairness constraints of FaiReg (Mohamed and
Schuller, "Normalise for Fairness", arXiv 2202.00993). Only the paper's abstract was
readable; the formulas below are ours, the usual readings of the two constraints, written
as gaps (0 = fair, larger = less fair) over the groups that have data:

============================  ================================================================
classification (emotion)      regression (arousal, valence; ``<dim>`` below)
============================  ================================================================
EA: ``gap_ea`` = max - min    EA: ``gap_ea_<dim>`` = max - min over groups of the mean squared
over groups of accuracy (WA)  error, ``MSE_g = (sum p^2 + sum t^2 - 2 sum p t) / n``
SP: ``gap_sp`` = max over     SP: ``gap_sp_<dim>`` = max - min over groups of the mean
classes ``c`` of (max - min   prediction ``sum p / n`` (first-order demographic parity of a
over groups of the rate       regressor)
``P(pred = c | group)``),
i.e. the demographic-parity
difference of the worst class
============================  ================================================================

plus the worst group and the largest gap of the task metric: ``worst_uar``/``gap_uar``,
``worst_ccc_<dim>``/``gap_ccc_<dim>``. A group without data in a round (no confusion counts,
fewer than two CCC pairs) has a NaN metric and is skipped; a gap needs two groups with data
and is NaN otherwise, never a division by zero. Clips whose attribute value is missing count
in the group ``"unknown"`` (:data:`UNKNOWN_GROUP`; the devices map an empty value to it): its
metrics are reported like any group's, but it is left out of the worst group and the gaps,
since it is no group of the attribute (a handful of unlabelled clips would otherwise set them).

FaiReg: label normalisation for fairness in regression
------------------------------------------------------
FaiReg (same paper) counters *labelling bias*: annotators who rate one group's arousal on a
shifted or stretched scale. Our reading of it, in a federation:

1. *What is normalised*: the arousal and valence **training targets** of every labelled clip
   on a training device, each dimension separately, per **FaiReg group**. Features, emotion
   labels and unlabelled clips are untouched; held-out devices never send label statistics.
2. *FaiReg group*: the intersection of the values of all protected attributes of the clip
   (``"female"`` for ``protected = "gender"``; ``"female|young"`` for
   ``protected = "gender,age"``), so that a bias tied to any combination of attributes is
   removed, and several protected attributes are handled at once. A group with fewer than
   :data:`MIN_GROUP_LABELS` labels of a dimension, or a (near) constant one, uses the pooled
   statistics of all groups for that dimension (its offset is then not removed); a constant
   pooled dimension gets std 1 (centring only).
3. Devices send per group and dimension ``(n, sum y, sum y^2)`` (:func:`label_stats`); the
   server adds them (:func:`pool_label_stats`) and sends every device, with every round, the
   groups' means and population standard deviations (:func:`faireg_params`,
   :meth:`FaiRegParams.to_json`).
4. Devices train on ``y' = clip((y - mean_g) / (FAIREG_SCALE * std_g), -1, 1)``: a z-score
   divided by :data:`FAIREG_SCALE` = 3, so that +-3 standard deviations fill the model's tanh
   range [-1, 1] (:meth:`FaiRegParams.normalise`).
5. Predictions ``p'`` are mapped back to the label scale with the **pooled** mean and std of
   all training labels, ``p = clip(mean + FAIREG_SCALE * std * p', -1, 1)``
   (:meth:`FaiRegParams.denormalise`), and every evaluation statistic (CCC sums, per-group
   sums) is computed on that scale against the original labels. Mapping back with the
   group's own mean and std (:meth:`FaiRegParams.denormalise_group`, the exact inverse of
   the normalisation) would re-apply the very per-group affine transform FaiReg removes; the
   pooled mapping needs no group at inference time either.

Per-group standardisation removes a per-group affine bias ``y -> a_g y + b_g`` (``a_g > 0``)
exactly in the population, because ``(a y + b - (a m + b)) / (a s) = (y - m) / s``; it also
removes genuine differences between the groups' label distributions, which is FaiReg's
assumption that such differences are bias.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DIMENSIONS",
    "FAIREG_SCALE",
    "MIN_GROUP_LABELS",
    "GROUP_SEP",
    "UNKNOWN_GROUP",
    "prediction_rates",
    "regression_moments",
    "group_measures",
    "spread",
    "fairness_summary",
    "task_metric",
    "group_task_metrics",
    "device_group_shares",
    "faireg_group_keys",
    "label_stats",
    "pool_label_stats",
    "FaiRegParams",
    "faireg_params",
    "normalise_data",
]

DIMENSIONS = ("arousal", "valence")
FAIREG_SCALE = 3.0
"""Normalised targets are z-scores divided by this, so +-3 std fill the tanh range [-1, 1]."""
MIN_GROUP_LABELS = 2
"""A FaiReg group needs at least this many labels of a dimension for its own mean and std."""
GROUP_SEP = "|"
"""Separator of attribute values in an intersection group key (``female|young``)."""
UNKNOWN_GROUP = "unknown"
"""The group of clips whose protected attribute has no value."""
_MIN_STD = 1e-6


# --------------------------------------------------------------------------- measures


def prediction_rates(cm) -> np.ndarray:
    """Share of clips predicted as each class, ``P(pred = c)``, from a confusion matrix.

    Parameters
    ----------
    cm : array-like, shape (C, C)
        Confusion counts, rows true classes, columns predicted classes.

    Returns
    -------
    np.ndarray, shape (C,), float64
        Column sums over the total; all NaN for an empty matrix.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total <= 0:
        return np.full(cm.shape[1] if cm.ndim == 2 else 0, np.nan)
    return cm.sum(axis=0) / total


def regression_moments(sums) -> dict[str, float]:
    """Mean prediction, mean label, mean error and MSE from the six CCC sums.

    Parameters
    ----------
    sums : array-like, shape (6,)
        ``[n, sum p, sum t, sum p^2, sum t^2, sum p t]`` (:func:`shared_models.metrics.ccc_sums`).

    Returns
    -------
    dict
        ``n``, ``pred_mean`` (mean prediction), ``true_mean``, ``bias`` (mean of ``p - t``)
        and ``mse`` (mean of ``(p - t)^2``); NaN except ``n`` when ``n == 0``.
    """
    n, sp, st, spp, stt, spt = np.asarray(sums, dtype=np.float64).reshape(6)
    if n <= 0:
        return {"n": 0.0, "pred_mean": np.nan, "true_mean": np.nan, "bias": np.nan, "mse": np.nan}
    return {"n": float(n), "pred_mean": sp / n, "true_mean": st / n, "bias": (sp - st) / n,
            "mse": max((spp + stt - 2 * spt) / n, 0.0)}


def group_measures(parts: Iterable[Mapping]) -> dict[str, float]:
    """Regression measures of one group from its devices' statistics.

    Parameters
    ----------
    parts : iterable of dict
        Each with ``sums_arousal`` and ``sums_valence`` (6,) CCC sums.

    Returns
    -------
    dict
        ``mse_<dim>``, ``bias_<dim>`` (mean ``prediction - label``) and ``pred_mean_<dim>``
        for ``<dim>`` in arousal, valence; NaN where the group has no label of that dimension.
    """
    parts = list(parts)
    out = {}
    for dim in DIMENSIONS:
        sums = np.sum([np.asarray(p[f"sums_{dim}"], dtype=np.float64) for p in parts], axis=0) if parts else np.zeros(6)
        mom = regression_moments(sums)
        out[f"mse_{dim}"], out[f"bias_{dim}"], out[f"pred_mean_{dim}"] = mom["mse"], mom["bias"], mom["pred_mean"]
    return out


def spread(values: Mapping[str, float] | Iterable[float], *, higher_is_better: bool = True) -> tuple[float, float]:
    """Worst value and largest gap over the finite values (groups without data are skipped).

    Parameters
    ----------
    values : mapping or iterable of float
        One value per group; NaN (no data) is skipped.
    higher_is_better : bool
        The worst value is the minimum (True, e.g. UAR) or the maximum (False, e.g. MSE).

    Returns
    -------
    worst : float
        NaN when no group has a finite value.
    gap : float
        ``max - min``; NaN when fewer than two groups have a finite value.
    """
    vals = np.asarray(list(values.values() if isinstance(values, Mapping) else values), dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    worst = float(vals.min() if higher_is_better else vals.max())
    return worst, float(vals.max() - vals.min()) if vals.size > 1 else float("nan")


def fairness_summary(per_group: Mapping[str, Mapping[str, float]],
                     confusions: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """Worst groups, largest gaps, Equal Accuracy and Statistical Parity of one attribute.

    Parameters
    ----------
    per_group : mapping group -> metrics
        Each group's metrics: ``uar``, ``wa``, ``ccc_<dim>``, ``mse_<dim>``,
        ``pred_mean_<dim>`` (missing or NaN = no data).
    confusions : mapping group -> (C, C) array, optional
        Each group's pooled confusion matrix, for classification Statistical Parity.

    Returns
    -------
    dict
        Classification keys (present when some group has categorical data): ``gap_ea``,
        ``gap_sp``. Regression keys per dimension (present when some group has that
        dimension): ``worst_ccc_<dim>``, ``gap_ccc_<dim>``, ``worst_mse_<dim>``,
        ``gap_ea_<dim>``, ``gap_sp_<dim>``. See the module docstring for definitions;
        gaps with fewer than two groups with data are NaN.
    """
    def col(key):
        return {g: float(m.get(key, np.nan)) for g, m in per_group.items()}

    out: dict[str, float] = {}
    wa = col("wa")
    if any(np.isfinite(v) for v in wa.values()):
        out["gap_ea"] = spread(wa)[1]
        rates = [prediction_rates(cm) for cm in (confusions or {}).values()]
        rates = np.array([r for r in rates if r.size and np.isfinite(r).all()])
        out["gap_sp"] = float((rates.max(axis=0) - rates.min(axis=0)).max()) if len(rates) > 1 else float("nan")
    for dim in DIMENSIONS:
        ccc = col(f"ccc_{dim}")
        mse = col(f"mse_{dim}")
        if not any(np.isfinite(v) for v in list(ccc.values()) + list(mse.values())):
            continue
        out[f"worst_ccc_{dim}"], out[f"gap_ccc_{dim}"] = spread(ccc)
        out[f"worst_mse_{dim}"], out[f"gap_ea_{dim}"] = spread(mse, higher_is_better=False)
        out[f"gap_sp_{dim}"] = spread(col(f"pred_mean_{dim}"))[1]
    return out


def _pooled(parts: Sequence[Mapping]) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    cms = [np.asarray(p["cm"], dtype=np.float64) for p in parts if "cm" in p]
    cm = np.sum(cms, axis=0) if cms else None
    sums = {d: np.sum([np.asarray(p[f"sums_{d}"], dtype=np.float64) for p in parts], axis=0)
            if parts else np.zeros(6) for d in DIMENSIONS}
    return cm, sums


def task_metric(parts: Sequence[Mapping], task: str) -> float:
    """The task's headline metric of pooled statistics: UAR (``emotion``, ``both``) or the mean
    of the arousal and valence CCC (``av``; the finite ones). NaN without data.

    Parameters
    ----------
    parts : sequence of dict
        Statistics with ``cm``, ``sums_arousal``, ``sums_valence`` (devices' or groups').
    task : {"emotion", "av", "both"}
    """
    from .metrics import ccc_from_sums, uar

    parts = list(parts)
    if not parts:
        return float("nan")
    cm, sums = _pooled(parts)
    if task in ("emotion", "both"):
        return float(uar(cm)) if cm is not None and cm.sum() > 0 else float("nan")
    cccs = [ccc_from_sums(s) for s in sums.values()]
    cccs = [c for c in cccs if np.isfinite(c)]
    return float(np.mean(cccs)) if cccs else float("nan")


def group_task_metrics(stats: Sequence[Mapping], attribute: str, task: str) -> dict[str, float]:
    """Per group of ``attribute``: :func:`task_metric` of the devices' pooled group statistics.

    Parameters
    ----------
    stats : sequence of dict
        Devices' statistics, each with ``groups: {attribute: {group: {...}}}``.
    attribute : str
    task : str

    Returns
    -------
    dict group -> float
        NaN for a group without data.
    """
    names = sorted({g for s in stats for g in s.get("groups", {}).get(attribute, {})})
    return {g: task_metric([s["groups"][attribute][g] for s in stats
                            if g in s.get("groups", {}).get(attribute, {})], task) for g in names}


def device_group_shares(stats: Mapping, attribute: str) -> dict[str, float]:
    """Share of a device's clips in each group of ``attribute`` (from its statistics' ``n``).

    Returns an empty dict when the device reports no such attribute or no clip.
    """
    groups = stats.get("groups", {}).get(attribute, {})
    counts = {g: float(v.get("n", 0)) for g, v in groups.items()}
    total = sum(counts.values())
    return {g: c / total for g, c in counts.items() if c > 0} if total > 0 else {}


# --------------------------------------------------------------------------- FaiReg


def faireg_group_keys(groups: Mapping[str, np.ndarray], attributes: Sequence[str], n: int) -> np.ndarray:
    """FaiReg group of every clip: its protected attribute values joined by ``|``.

    Parameters
    ----------
    groups : mapping attribute -> array of str, shape (N,)
        The clips' attribute values (``LocalData.groups``).
    attributes : sequence of str
        The protected attributes, in order; missing ones are left out of the key.
    n : int
        Number of clips (for the all-clips-in-one-group case without attributes).

    Returns
    -------
    np.ndarray of str, shape (N,)
        ``"female"``, ``"female|young"``...; ``""`` for every clip when no attribute is known.
    """
    cols = [np.asarray(groups[a], dtype=str) for a in attributes if a in groups]
    if not cols:
        return np.full(n, "", dtype=object).astype(str)
    keys = cols[0].astype(object)
    for c in cols[1:]:
        keys = keys + GROUP_SEP + c.astype(object)
    return keys.astype(str)


def label_stats(av, keys) -> dict[str, dict[str, list[float]]]:
    """Per-group label statistics ``(n, sum y, sum y^2)`` of arousal and valence.

    Parameters
    ----------
    av : array-like, shape (N, 2)
        Arousal and valence labels; NaN where unknown (left out, per dimension).
    keys : array-like of str, shape (N,)
        FaiReg group of every clip (:func:`faireg_group_keys`).

    Returns
    -------
    dict
        ``{group: {"arousal": [n, s, ss], "valence": [n, s, ss]}}`` for groups with at least
        one label; counts and sums only.
    """
    av = np.asarray(av, dtype=np.float64).reshape(-1, 2)
    keys = np.asarray(keys, dtype=str).reshape(-1)
    out: dict[str, dict[str, list[float]]] = {}
    for g in np.unique(keys):
        m = keys == g
        entry = {}
        for d, dim in enumerate(DIMENSIONS):
            y = av[m, d]
            y = y[np.isfinite(y)]
            entry[dim] = [float(y.size), float(y.sum()), float(y @ y)]
        if any(v[0] > 0 for v in entry.values()):
            out[str(g)] = entry
    return out


def pool_label_stats(parts: Iterable[Mapping]) -> dict[str, dict[str, list[float]]]:
    """Add devices' :func:`label_stats` (they are sums, so pooling is exact)."""
    pooled: dict[str, dict[str, np.ndarray]] = {}
    for part in parts:
        for g, dims in part.items():
            entry = pooled.setdefault(g, {d: np.zeros(3) for d in DIMENSIONS})
            for dim in DIMENSIONS:
                entry[dim] = entry[dim] + np.asarray(dims.get(dim, (0, 0, 0)), dtype=np.float64)
    return {g: {d: v.tolist() for d, v in dims.items()} for g, dims in pooled.items()}


def _moments(n: float, s: float, ss: float) -> tuple[float, float]:
    mean = s / n
    return mean, float(np.sqrt(max(ss / n - mean * mean, 0.0)))


@dataclass
class FaiRegParams:
    """Per-group label means and standard deviations sent by the server to every device.

    Attributes
    ----------
    attributes : tuple of str
        Protected attributes whose value intersection forms the FaiReg group.
    groups : dict group -> np.ndarray, shape (2, 2)
        ``[[mean_arousal, std_arousal], [mean_valence, std_valence]]`` per group.
    pooled : np.ndarray, shape (2, 2)
        The same over all training labels: used for groups never seen and for mapping
        predictions back to the label scale.
    scale : float
        :data:`FAIREG_SCALE`.
    """

    attributes: tuple[str, ...]
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    pooled: np.ndarray = field(default_factory=lambda: np.array([[0.0, 1.0], [0.0, 1.0]]))
    scale: float = FAIREG_SCALE

    def _table(self, keys) -> np.ndarray:
        keys = np.asarray(keys, dtype=str).reshape(-1)
        return np.stack([self.groups.get(str(k), self.pooled) for k in keys]) if keys.size else np.zeros((0, 2, 2))

    def normalise(self, av, keys) -> np.ndarray:
        """Training targets: ``clip((y - mean_g) / (scale * std_g), -1, 1)``; NaN stays NaN.

        Parameters
        ----------
        av : array-like, shape (N, 2)
        keys : array-like of str, shape (N,)
            FaiReg group per clip; an unknown group uses the pooled statistics.

        Returns
        -------
        np.ndarray, shape (N, 2), float32
        """
        av = np.asarray(av, dtype=np.float64).reshape(-1, 2)
        t = self._table(keys)
        z = (av - t[:, :, 0]) / (self.scale * t[:, :, 1])
        return np.clip(z, -1.0, 1.0).astype(np.float32)

    def denormalise(self, av_norm) -> np.ndarray:
        """Predictions back on the label scale with the pooled statistics, clipped to [-1, 1].

        Parameters
        ----------
        av_norm : array-like, shape (N, 2)
            The model's (normalised) arousal/valence predictions.

        Returns
        -------
        np.ndarray, shape (N, 2), float32
        """
        z = np.asarray(av_norm, dtype=np.float64).reshape(-1, 2)
        return np.clip(self.pooled[:, 0] + self.scale * self.pooled[:, 1] * z, -1.0, 1.0).astype(np.float32)

    def denormalise_group(self, av_norm, keys) -> np.ndarray:
        """Exact inverse of :meth:`normalise` (for values that were not clipped): each clip
        mapped back with its own group's mean and std (no clipping, float64)."""
        z = np.asarray(av_norm, dtype=np.float64).reshape(-1, 2)
        t = self._table(keys)
        return t[:, :, 0] + self.scale * t[:, :, 1] * z

    def to_json(self) -> str:
        """Serialise for a round's ConfigRecord."""
        return json.dumps({"attributes": list(self.attributes), "scale": self.scale,
                           "pooled": np.asarray(self.pooled).tolist(),
                           "groups": {g: np.asarray(v).tolist() for g, v in self.groups.items()}})

    @classmethod
    def from_json(cls, text: str) -> "FaiRegParams":
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(tuple(d["attributes"]), {g: np.asarray(v, dtype=np.float64) for g, v in d["groups"].items()},
                   np.asarray(d["pooled"], dtype=np.float64), float(d["scale"]))


def faireg_params(pooled_stats: Mapping[str, Mapping[str, Sequence[float]]], attributes: Sequence[str], *,
                  min_labels: int = MIN_GROUP_LABELS, scale: float = FAIREG_SCALE,
                  reference: str = "") -> FaiRegParams:
    """Per-group means and standard deviations from pooled :func:`label_stats`.

    Parameters
    ----------
    pooled_stats : mapping
        ``{group: {"arousal": [n, s, ss], "valence": [n, s, ss]}}`` summed over devices.
    attributes : sequence of str
        The protected attributes the group keys were built from.
    min_labels : int
        A group with fewer labels of a dimension takes the pooled statistics of that dimension.
    scale : float
    reference : str
        Empty: ``pooled`` (the label scale predictions are mapped back to, and the statistics
        of unseen groups) is that of all training labels. A group key: that group's
        statistics instead, so that a labelling bias in other groups does not reach the
        label scale.

    Returns
    -------
    FaiRegParams

    Raises
    ------
    ValueError
        When ``reference`` names a group without training labels (the known groups are listed).
    """
    total = {d: np.sum([np.asarray(v[d], dtype=np.float64) for v in pooled_stats.values()], axis=0)
             if pooled_stats else np.zeros(3) for d in DIMENSIONS}
    pooled = np.zeros((2, 2))
    for i, dim in enumerate(DIMENSIONS):
        n, s, ss = total[dim]
        mean, std = _moments(n, s, ss) if n > 0 else (0.0, 1.0)
        pooled[i] = (mean, std if std > _MIN_STD else 1.0)
    groups = {}
    for g, dims in pooled_stats.items():
        table = pooled.copy()
        for i, dim in enumerate(DIMENSIONS):
            n, s, ss = np.asarray(dims[dim], dtype=np.float64)
            if n >= min_labels:
                mean, std = _moments(n, s, ss)
                if std > _MIN_STD:
                    table[i] = (mean, std)
        groups[str(g)] = table
    if reference:
        if reference not in groups:
            raise ValueError(f"faireg-reference {reference!r} is not a group with arousal/valence labels; "
                             f"known: {', '.join(sorted(groups)) or 'none'}")
        pooled = groups[reference].copy()
    return FaiRegParams(tuple(attributes), groups, pooled, float(scale))


def normalise_data(data, params: FaiRegParams):
    """A copy of a :class:`~shared_models.training.LocalData` whose arousal/valence are FaiReg
    training targets (:meth:`FaiRegParams.normalise`, group = intersection of
    ``params.attributes``); features, emotions and groups are shared, not copied."""
    from .training import LocalData

    keys = faireg_group_keys(data.groups, params.attributes, len(data))
    return LocalData(data.x, data.emotion, params.normalise(data.av, keys), data.groups)
