"""Cooperative learning on a device: self-labelling, dynamic active learning, and their counts.

Labels are what devices lack. After local training in every round, a device runs the
*cooperative step* on its unlabelled pool, after Zhang, Coutinho, Deng and Schuller,
"Cooperative Learning and its Application to Emotion Recognition from Speech", IEEE/ACM
TASLP 23(1), 2015: clips the model labels with high confidence become machine labels
(pseudo-labels), clips it is least certain about are asked of a human.

Self-labelling (modes ``self-labelling`` and ``cooperative``)
    Every pool clip is predicted under ``pseudo-views`` views: view 0 is the clean input,
    the others add Gaussian noise of std ``view-noise`` to the standardised features (and,
    with ``uncertainty = mc-dropout``, every view also samples dropout masks: Monte-Carlo
    dropout, Yue Zhang et al., IEEE Trans. Cybernetics 2020). A clip becomes a pseudo-label
    when (Semi-FedSER, Feng and Narayanan, Interspeech 2022):

    - the mean probability of its predicted class is at least the round's threshold, which
      rises over the rounds: cosine (FedSTAR, Tsouvalas et al., ACM TECS 2022:
      ``c = 0.9 - 0.2 (1 + cos(pi r / R))``, i.e. 0.5 -> 0.9; fedaffect's defaults run the
      same shape from 0.9 to 0.98, see :class:`shared_models.config.RunConfig`) or linear
      (:func:`threshold_schedule`);
    - every view predicts the same class and the std of that class's probability across
      views is at most ``pseudo-max-std`` (view agreement);
    - it is among the ``pseudo-per-class`` most confident new clips of its class this round
      (0 = no cap);
    - with ``pseudo-global-view = 1`` (default), the global model as the device received it
      this round, before local training, is one more view that must agree: the local model
      has just fitted a handful of labels and is confidently wrong more often (co-training
      with the federation's model, in the spirit of Blum and Mitchell, COLT 1998);
    - with ``pseudo-align = 1`` (default), all of the above is judged on probabilities
      aligned with the class distribution of the device's own human labels (distribution
      alignment, Berthelot et al., ReMixMatch, ICLR 2020; :func:`align_distribution`): a
      model that calls much of the pool one class is believed less for that class.

    Large inputs (log-Mel, waveform) are scored in two stages: the clean view first, the
    noisy views only for clips that :func:`could_pass` (``TWO_STAGE_MIN_NUMBERS``); the
    queries of mode ``cooperative`` are ranked on the clean view, known for every clip.

    For arousal/valence the uncertainty is the std of the views' predictions (both
    dimensions at most ``av-max-std``), and the per-class cap applies to the four
    arousal/valence quadrants. Every accepted pseudo-label is re-checked each round and
    dropped when the current model no longer supports it (its class is no longer the
    prediction, its mean probability fell below ``pseudo-keep``, or its arousal/valence
    prediction moved by more than 0.5 or became uncertain): enhanced semi-supervised
    learning (Zhang et al., ICASSP 2016). Optionally the labelled set is upsampled to an even class distribution
    before training (cross-task self-labelling).

    Arousal/valence are handled on the label scale ([-1, 1], as in the manifest). With FaiReg
    (``faireg = "on"``) the model predicts targets normalised per protected group, and the
    device normalises its whole training set, pseudo-labels included, after
    :meth:`CoopState.before_training`; the predictions are therefore mapped back per group
    (:func:`av_to_label_scale`) before the re-check, the queue and the selection, so that a
    pseudo-label is normalised exactly once, like a human label.

Dynamic active learning (modes ``active`` and ``cooperative``)
    Each round, after the re-check and before new pseudo-labels are chosen, the least
    certain pool clips (the normalised entropy of the trained model's clean prediction,
    least-confidence sampling as in the paper below; for arousal/valence only, the views'
    std) go to the device's label queue, ``query-per-round``
    per round and ``query-total`` in all. In deployment the person answers them with
    ``fedaffect device label``; in simulation an :class:`Oracle` answers from the hidden
    labels through simulated raters of configurable reliability, asked one at a time, most
    reliable first, until ``a`` of them agree, where ``a`` rises with the model's
    uncertainty from ``agreement-min`` to ``agreement-max``, at most ``max-raters`` raters
    (Yue Zhang, Coutinho, Zixing Zhang, Quan and Schuller, "Dynamic active learning based on
    agreement and applied to emotion recognition in spoken interactions", ICMI 2015). Human
    effort is counted in rater answers. Answered clips join the labelled set at the next round,
    with their categorical label and/or arousal/valence (the person gives what the run's task
    uses; the device records its task and classes in the store for the labelling session).
    Answers are human labels: a device trains on them in every mode, ``supervised`` included
    (answers given during an earlier run; a supervised run queues nothing itself), while
    pseudo-labels, machine labels, join the training set only in the self-labelling modes
    (:meth:`CoopState.training_data`).

Transfer learning
    While the server says ``freeze`` (rounds up to ``freeze-rounds``), only the heads train:
    the front-end's parameters get no gradient and its batch-norm layers keep their running
    statistics (:func:`freeze_frontend`).

Cost
    Scoring a pool clip takes ``pseudo-views`` forward passes after training (plus one with
    the received model before it) in the self-labelling modes, one in mode ``active``
    (categorical queries). A device whose unlabelled pool is larger than
    ``pool-sample`` (default 512) scores its pseudo-labelled clips and a new random sample of
    ``pool-sample`` others each round, so that the step's cost does not grow with the number
    of recordings; the re-check still covers every pseudo-label each round.

Everything a device keeps lives in :class:`client.device_store.DeviceStore` under its data
directory. The pure pieces (schedule, label split, selection, re-check, rater stopping rule,
round aggregation) are plain functions of arrays, tested on hand-made inputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from shared_models.config import MODES
from shared_models.fairness import FaiRegParams, faireg_group_keys
from shared_models.features import collate
from shared_models.training import LocalData

if TYPE_CHECKING:  # imported when first used: SQLAlchemy costs every ClientApp process ~0.4 s
    from .device_store import DeviceStore

__all__ = [
    "MODES",
    "threshold_schedule",
    "round_settings",
    "label_split",
    "view_predictions",
    "select_pseudo_labels",
    "recheck_pseudo_labels",
    "select_av_pseudo_labels",
    "recheck_av_pseudo_labels",
    "av_quadrant",
    "faireg_of",
    "av_to_label_scale",
    "emotion_uncertainty",
    "av_uncertainty",
    "least_certain",
    "required_agreement",
    "RaterResult",
    "ask_raters",
    "Oracle",
    "CoopState",
    "attach",
    "CoopTracker",
    "freeze_frontend",
    "device_slug",
]

log = logging.getLogger("fedaffect.client.cooperative")

SELF_LABELLING = ("self-labelling", "cooperative")
ACTIVE = ("active", "cooperative")
HEADS = ("emotion.", "av.")
AV_TOLERANCE = 0.5  # how far an arousal/valence prediction may move before its pseudo-label is dropped


# ---------------------------------------------------------------------------------------
# Server side: what each round asks of the devices
# ---------------------------------------------------------------------------------------
def threshold_schedule(server_round: int, total_rounds: int, schedule: str = "cosine",
                       start: float = 0.5, end: float = 0.9) -> float:
    """Pseudo-label confidence threshold of a round.

    ``cosine``: ``end - (end - start) / 2 * (1 + cos(pi * r / R))``; with the defaults this
    is FedSTAR's ``0.9 - 0.2 * (1 + cos(pi * r / R))`` (0.5 at round 0, 0.7 half-way, 0.9 at
    the last round). ``linear``: ``start + (end - start) * r / R``. Rounds past ``R`` keep
    the final value.

    Raises
    ------
    ValueError
        For an unknown schedule or ``total_rounds < 1``.
    """
    if total_rounds < 1:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    t = min(max(server_round, 0), total_rounds) / total_rounds
    if schedule == "cosine":
        return float(end - (end - start) / 2 * (1 + math.cos(math.pi * t)))
    if schedule == "linear":
        return float(start + (end - start) * t)
    raise ValueError(f"unknown threshold schedule {schedule!r}; known: cosine, linear")


def round_settings(cfg, server_round: int) -> dict[str, Any]:
    """The cooperative part of a train message's round config (a Flower ConfigRecord).

    Parameters
    ----------
    cfg : shared_models.config.RunConfig
    server_round : int

    Returns
    -------
    dict
        ``coop-mode``, ``pseudo-threshold`` (this round's, :func:`threshold_schedule`),
        ``pseudo-max-std``, ``pseudo-per-class``, ``pseudo-keep``, ``pseudo-recheck``,
        ``pseudo-global-view``, ``pseudo-knn``, ``pseudo-align``, ``pseudo-max-share``,
        ``pseudo-views``, ``view-noise``, ``uncertainty``, ``av-max-std``, ``upsample``,
        ``query-per-round``, ``query-total``, ``pool-sample``, ``rater-reliability``, ``agreement-min``,
        ``agreement-max``, ``max-raters`` and ``freeze`` (1 while ``server_round <=
        freeze-rounds``: devices train only the heads).
    """
    return {
        "coop-mode": cfg.mode,
        "pseudo-threshold": threshold_schedule(server_round, cfg.num_server_rounds, cfg.pseudo_schedule,
                                               cfg.pseudo_start, cfg.pseudo_end),
        "pseudo-max-std": float(cfg.pseudo_max_std),
        "pseudo-per-class": int(cfg.pseudo_per_class),
        "pseudo-keep": float(cfg.pseudo_keep),
        "pseudo-recheck": int(cfg.pseudo_recheck),
        "pseudo-global-view": int(cfg.pseudo_global_view),
        "pseudo-knn": int(cfg.pseudo_knn),
        "pseudo-align": int(cfg.pseudo_align),
        "pseudo-max-share": float(cfg.pseudo_max_share),
        "pseudo-views": int(cfg.pseudo_views),
        "view-noise": float(cfg.view_noise),
        "uncertainty": cfg.uncertainty,
        "av-max-std": float(cfg.av_max_std),
        "upsample": int(cfg.upsample),
        "query-per-round": int(cfg.query_per_round),
        "query-total": int(cfg.query_total),
        "pool-sample": int(cfg.pool_sample),
        "rater-reliability": cfg.rater_reliability,
        "agreement-min": int(cfg.agreement_min),
        "agreement-max": int(cfg.agreement_max),
        "max-raters": int(cfg.max_raters),
        "freeze": int(server_round <= cfg.freeze_rounds),
    }


# ---------------------------------------------------------------------------------------
# Labelled and unlabelled clips
# ---------------------------------------------------------------------------------------
def label_split(strata: Sequence[Any], fraction: float, seed: int | Sequence[int]) -> np.ndarray:
    """Which clips keep their labels: a seeded stratified fraction.

    ``round(fraction * n)`` clips (at least one) keep their labels, spread over the strata
    (e.g. emotion classes) in proportion to their sizes by largest remainder, with every
    stratum getting at least one clip while the budget allows; within a stratum the clips
    are drawn with ``seed``. A pure function: the same inputs give the same split.

    Parameters
    ----------
    strata : sequence, shape (N,)
        Stratum of each clip (e.g. its emotion; ``None``/``""`` for clips without a label,
        which are never kept).
    fraction : float
        In (0, 1].
    seed : int or sequence of int
        Seed of :func:`numpy.random.default_rng` (e.g. ``(run seed, partition id)``).

    Returns
    -------
    np.ndarray of bool, shape (N,)
        True where the label is kept.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    strata = np.array(["" if s is None else str(s) for s in strata], dtype=object)
    keep = np.zeros(len(strata), dtype=bool)
    labelled = np.flatnonzero(strata != "")
    if labelled.size == 0:
        return keep
    if fraction >= 1:
        keep[labelled] = True
        return keep
    rng = np.random.default_rng(seed)
    names = sorted(set(strata[labelled]))
    sizes = np.array([(strata == s).sum() for s in names])
    budget = max(1, int(round(fraction * labelled.size)))
    quota = np.zeros(len(names), dtype=int)
    if budget >= len(names):
        quota[:] = 1
        rest = budget - len(names)
        ideal = (sizes - 1) / max((sizes - 1).sum(), 1) * rest
    else:
        rest, ideal = budget, sizes / sizes.sum() * budget
    base = np.minimum(np.floor(ideal).astype(int), sizes - quota)
    quota += base
    left = budget - quota.sum()
    order = sorted(range(len(names)), key=lambda i: (-(ideal[i] - np.floor(ideal[i])), rng.random()))
    while left > 0:
        progressed = False
        for i in order:
            if left > 0 and quota[i] < sizes[i]:
                quota[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    for name, q in zip(names, quota):
        idx = np.flatnonzero(strata == name)
        keep[rng.permutation(idx)[:q]] = True
    return keep


# ---------------------------------------------------------------------------------------
# Predictions under views, and the selection rules (pure functions of arrays)
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def view_predictions(model: nn.Module, xs: list, *, views: int, noise: float, mc_dropout: bool = False,
                     seed: int = 0, batch_size: int = 64, max_numbers: int = 2**22,
                     include_clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Predict every clip under ``views`` views.

    View 0 is the clean input; views 1.. add ``N(0, noise^2)`` to the (standardised)
    features (``include_clean=False``: every view is a noisy one). The model is in eval mode, except its dropout layers with ``mc_dropout``
    (Monte-Carlo dropout, every view samples new masks; batch-norm stays in eval mode). Every
    module's mode and the global torch random state are restored afterwards. All views of a batch
    go through the model in one forward pass; a batch holds as many clips as keep the
    stacked views under ``max_numbers`` input numbers (every clip when features are small).

    Returns
    -------
    probs : np.ndarray, shape (views, N, C)
        Softmax class probabilities.
    av : np.ndarray, shape (views, N, 2)
        Arousal and valence.
    """
    n_classes = getattr(model, "n_classes", 0)
    probs = np.zeros((views, len(xs), n_classes), np.float32)
    avs = np.zeros((views, len(xs), 2), np.float32)
    if not xs:
        return probs, avs
    gen = torch.Generator().manual_seed(int(seed))  # the views' noise
    size = max(x.size if isinstance(x, np.ndarray) else int(np.prod(np.shape(x))) for x in xs[:batch_size])  # numbers per clip
    step = max(1, min(len(xs), max_numbers // max(1, size * views)))  # clips per forward pass
    modes = [(m, m.training) for m in model.modules()]  # restored exactly afterwards
    for m, _ in modes:  # eval mode; setting the flag directly (no nn.Module.__setattr__) costs a tenth of model.eval()
        object.__setattr__(m, "training", mc_dropout and isinstance(m, nn.Dropout))
    try:
        # Dropout draws from torch's global generator: seeded (and restored afterwards) for
        # Monte-Carlo dropout only. The CPU generator only (what fork_rng restores);
        # torch.manual_seed would also queue lazy CUDA/XPU seeding (~0.5 ms a call).
        with torch.random.fork_rng(devices=[]) if mc_dropout else contextlib.nullcontext():
            if mc_dropout:
                torch.default_generator.manual_seed(int(seed))
            for start in range(0, len(xs), step):  # all views of a batch in one forward pass
                x, lengths = collate(xs[start : start + step])
                b = x.shape[0]
                if views > 1:
                    x = x.repeat(views, *([1] * (x.dim() - 1)))
                    lengths = None if lengths is None else lengths.repeat(views)
                first = b if include_clean else 0  # the rows that get noise
                if noise > 0 and x.shape[0] > first:
                    x[first:] += noise * torch.randn(x[first:].shape, generator=gen, dtype=x.dtype)
                out = model(x, lengths)
                probs[:, start : start + b] = torch.softmax(out["emotion"], dim=1).cpu().numpy().reshape(views, b, -1)
                avs[:, start : start + b] = out["av"].cpu().numpy().reshape(views, b, 2)
    finally:
        for m, training in modes:
            object.__setattr__(m, "training", training)
    return probs, avs


def _cap_per_class(ok: np.ndarray, classes: np.ndarray, score: np.ndarray, per_class: int) -> np.ndarray:
    """Positions where ``ok``, at most ``per_class`` per class (highest ``score`` first; 0 = no cap)."""
    chosen = []
    for c in np.unique(classes[ok]):
        idx = np.flatnonzero(ok & (classes == c))
        idx = idx[np.argsort(-score[idx], kind="stable")]
        chosen.append(idx if per_class <= 0 else idx[:per_class])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def select_pseudo_labels(probs: np.ndarray, threshold: float, max_std: float, per_class: int,
                         candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clips that become categorical pseudo-labels this round.

    A clip is accepted when the mean (over views) probability of its predicted class is at
    least ``threshold``, every view predicts that class, and that class's probability varies
    across views by a std of at most ``max_std``; then at most ``per_class`` per class are
    kept, the most confident first (``per_class = 0``: no cap).

    Parameters
    ----------
    probs : np.ndarray, shape (V, N, C)
        Class probabilities under V views (:func:`view_predictions`).
    threshold, max_std : float
    per_class : int
    candidates : np.ndarray of bool, shape (N,), optional
        Clips that may be selected (default all).

    Returns
    -------
    idx : np.ndarray of int, shape (K,)
        Positions of the accepted clips, ascending.
    labels : np.ndarray of int, shape (K,)
    confidence : np.ndarray of float, shape (K,)
    """
    probs = np.asarray(probs, dtype=np.float64)
    n = probs.shape[1]
    mean = probs.mean(axis=0)
    label = mean.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    conf = mean[np.arange(n), label]
    agree = (probs.argmax(axis=2) == label[None, :]).all(axis=0)
    std = probs[:, np.arange(n), label].std(axis=0)
    ok = (conf >= threshold) & agree & (std <= max_std)
    if candidates is not None:
        ok &= np.asarray(candidates, dtype=bool)
    idx = _cap_per_class(ok, label, conf, per_class)
    return idx, label[idx], conf[idx]


def align_distribution(probs: np.ndarray, prior: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Distribution alignment (Berthelot et al., "ReMixMatch", ICLR 2020): scale every class
    probability by ``prior / mean`` and renormalise, where ``mean`` is the class distribution
    the model predicts over the clips (all views of ``reference``, by default ``probs``).

    A device's model that calls most of the pool one class (on synth: bored clips called sad)
    then has that class's probabilities lowered and the neglected ones raised, so that the
    predictions on the pool follow the class distribution the device's labels show.

    Parameters
    ----------
    probs : np.ndarray, shape (V, N, C)
        Class probabilities of N clips under V views.
    prior : np.ndarray, shape (C,)
        Expected class distribution (positive; normalised here).
    reference : np.ndarray, shape (V', N, C), optional
        The views whose mean sets the weights (the cooperative step uses the clean ones, so
        that the weights are known before the noisy views are).

    Returns
    -------
    np.ndarray, shape (V, N, C)
        Aligned probabilities (each row sums to 1). ``probs`` itself when N is 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 0:
        return probs
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    mean = np.asarray(probs if reference is None else reference, dtype=np.float64).mean(axis=(0, 1))
    aligned = probs * (prior / np.maximum(mean, 1e-12))
    return aligned / np.maximum(aligned.sum(axis=2, keepdims=True), 1e-12)


def could_pass(clean: Sequence[np.ndarray], threshold: float, n_views: int) -> np.ndarray:
    """Clips that :func:`select_pseudo_labels` could still accept once all ``n_views`` views
    are known, judged from some of them (the clean ones, which cost one forward pass).

    Every view must predict the class and the mean of its probability over ``n_views`` views
    must reach ``threshold``; as each unseen view gives at most 1, a known view's
    probability must be at least ``n_views * threshold - (n_views - 1)``. A necessary
    condition only: the clips it rejects cannot pass, the ones it keeps still have to.

    Parameters
    ----------
    clean : list of np.ndarray, each of shape (N, C)
        Probabilities under the views already known.
    threshold : float
    n_views : int
        Views the selection will see in all (known ones included).

    Returns
    -------
    np.ndarray of bool, shape (N,)
    """
    clean = [np.asarray(c, dtype=np.float64) for c in clean]
    label = clean[0].argmax(axis=1)
    bound = n_views * threshold - (n_views - 1)
    rows = np.arange(label.size)
    ok = np.ones(label.size, dtype=bool)
    for c in clean:
        ok &= (c.argmax(axis=1) == label) & (c[rows, label] >= bound)
    return ok


#: Numbers per clip from which the cooperative step scores the pool in two stages (the clean
#: view first, the noisy views only for the clips that could become pseudo-labels): log-Mel
#: and waveform inputs, where a forward pass costs more than the extra call; not eGeMAPS (88).
TWO_STAGE_MIN_NUMBERS = 4096


def clip_vectors(xs: Sequence[Any]) -> np.ndarray | None:
    """One fixed-size vector per clip for nearest-neighbour votes, from a device's standardised
    features: functionals (F,) as they are, frame sequences (T, F) averaged over time; None
    for raw waveforms (T,) longer than 1024 numbers, which have no such summary.

    Returns
    -------
    np.ndarray, shape (N, F), or None
    """
    if not len(xs):
        return None
    first = np.asarray(xs[0])
    if first.ndim == 1 and first.size > 1024:
        return None
    return np.stack([np.asarray(x, dtype=np.float32).reshape(-1) if np.ndim(x) == 1
                     else np.asarray(x, dtype=np.float32).mean(axis=0) for x in xs])


def knn_labels(reference: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Majority class of each query's ``k`` nearest reference vectors (Euclidean); ties go to
    the nearer neighbour's class. -1 where there are no references.

    Parameters
    ----------
    reference : np.ndarray, shape (R, F)
        Vectors of clips labelled by a person.
    labels : np.ndarray of int, shape (R,)
    queries : np.ndarray, shape (Q, F)
    k : int (>= 1)

    Returns
    -------
    np.ndarray of int, shape (Q,)
    """
    if len(reference) == 0 or len(queries) == 0:
        return np.full(len(queries), -1, dtype=np.int64)
    d = ((queries[:, None, :] - reference[None, :, :]) ** 2).sum(axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, : max(1, min(k, len(reference)))]
    out = np.empty(len(queries), dtype=np.int64)
    for q, nearest in enumerate(order):
        votes = Counter(labels[nearest].tolist())
        best = max(votes.values())
        out[q] = next(int(labels[j]) for j in nearest if votes[int(labels[j])] == best)  # nearest of the tied
    return out


def recheck_pseudo_labels(probs: np.ndarray, labels: np.ndarray, keep: float) -> np.ndarray:
    """Which accepted pseudo-labels the current model still supports (ICASSP 2016 re-check).

    Parameters
    ----------
    probs : np.ndarray, shape (V, K, C)
        Current class probabilities of the K pseudo-labelled clips under V views.
    labels : np.ndarray of int, shape (K,)
        Their pseudo-labels.
    keep : float
        Least mean probability of the pseudo-label to keep it.

    Returns
    -------
    np.ndarray of bool, shape (K,)
        True where the model still predicts the label (argmax of the view mean) with mean
        probability >= ``keep``; False where it changed its mind.
    """
    mean = np.asarray(probs, dtype=np.float64).mean(axis=0)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=bool)
    return (mean.argmax(axis=1) == labels) & (mean[np.arange(labels.size), labels] >= keep)


def recheck_av_pseudo_labels(av: np.ndarray, values: np.ndarray, max_std: float,
                             tolerance: float = AV_TOLERANCE) -> np.ndarray:
    """Which arousal/valence pseudo-labels the current model still supports.

    Parameters
    ----------
    av : np.ndarray, shape (V, K, 2)
        Current predictions of the K pseudo-labelled clips under V views.
    values : np.ndarray, shape (K, 2)
        Their pseudo-labels.
    max_std : float
        Largest std across views (both dimensions).
    tolerance : float
        Largest distance, per dimension, between the current mean prediction and the
        pseudo-label (0.5: a quarter of the [-1, 1] scale).

    Returns
    -------
    np.ndarray of bool, shape (K,)
    """
    av = np.asarray(av, dtype=np.float64)
    if av.shape[1] == 0:
        return np.zeros(0, dtype=bool)
    moved = np.abs(av.mean(axis=0) - np.asarray(values, dtype=np.float64).reshape(-1, 2)).max(axis=1)
    return (moved <= tolerance) & (av.std(axis=0) <= max_std).all(axis=1)


def av_quadrant(av: np.ndarray) -> np.ndarray:
    """Arousal/valence quadrant of each row of (N, 2): ``2 * (arousal >= 0) + (valence >= 0)``."""
    av = np.asarray(av, dtype=np.float64).reshape(-1, 2)
    return 2 * (av[:, 0] >= 0).astype(np.int64) + (av[:, 1] >= 0).astype(np.int64)


def faireg_of(round_cfg: Mapping[str, Any] | None) -> FaiRegParams | None:
    """The round's FaiReg parameters (JSON under the round config's key ``faireg``), or None.

    The ClientApp reads them this way for training and evaluation too; the server sends
    them with every round when ``faireg = "on"`` (``server/app.py``).
    """
    text = round_cfg.get("faireg", "") if round_cfg is not None else ""
    return FaiRegParams.from_json(str(text)) if text else None


def av_to_label_scale(av: np.ndarray, faireg: FaiRegParams | None, keys: Sequence[str] | None = None) -> np.ndarray:
    """Arousal/valence predictions mapped back to the label scale ([-1, 1], as in the manifest).

    With FaiReg on, the model is trained on targets normalised per FaiReg group
    (:meth:`shared_models.fairness.FaiRegParams.normalise`), so its outputs are on that
    normalised scale. A pseudo-label is a *label*: it joins the labelled set and is normalised
    again, with its clip's group, before training (``client/app.py`` ``train`` applies
    :func:`shared_models.fairness.normalise_data` to what :meth:`CoopState.before_training`
    returns). It is therefore mapped back with the clip's own group statistics
    (:meth:`~shared_models.fairness.FaiRegParams.denormalise_group`, the exact inverse of the
    normalisation), so that normalising it again gives back the model's prediction: the
    training target of a pseudo-label is the prediction it came from, as in self-training
    without FaiReg. (The pooled :meth:`~shared_models.fairness.FaiRegParams.denormalise` used
    for evaluation would, after the per-group normalisation, shift every group's target by
    ``(mean_pooled - mean_g) / (FAIREG_SCALE * std_g)`` and stretch it by
    ``std_pooled / std_g``: a bias that self-training would feed back round after round.) The
    result is clipped to [-1, 1], the manifest's scale; only a value clipped there does not
    round-trip exactly.

    Parameters
    ----------
    av : np.ndarray, shape (V, N, 2) or (N, 2)
        Model outputs (views first, as from :func:`view_predictions`).
    faireg : FaiRegParams or None
        None (FaiReg off): ``av`` is already on the label scale and is returned unchanged.
    keys : sequence of str, shape (N,)
        FaiReg group of every clip (:func:`shared_models.fairness.faireg_group_keys`); an
        unknown group uses the pooled statistics. Needed when ``faireg`` is given.

    Returns
    -------
    np.ndarray, same shape as ``av``, float32
    """
    if faireg is None:
        return av
    av = np.asarray(av, dtype=np.float64)
    views = av.reshape(-1, av.shape[-2], 2)  # (V, N, 2); an (N, 2) input is one view
    keys = np.asarray([] if keys is None else keys, dtype=str).reshape(-1)
    if keys.size != views.shape[1]:
        raise ValueError(f"{keys.size} FaiReg group keys for {views.shape[1]} clips")
    out = faireg.denormalise_group(views.reshape(-1, 2), np.tile(keys, views.shape[0]))
    return np.clip(out, -1.0, 1.0).reshape(av.shape).astype(np.float32)


def select_av_pseudo_labels(av: np.ndarray, max_std: float, per_class: int = 0,
                            candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clips whose arousal/valence prediction is certain enough to become a pseudo-label.

    Accepted when the std across views (or Monte-Carlo dropout samples) is at most
    ``max_std`` in both dimensions; at most ``per_class`` per quadrant, least uncertain first.

    Parameters
    ----------
    av : np.ndarray, shape (V, N, 2)

    Returns
    -------
    idx : np.ndarray of int, shape (K,)
    values : np.ndarray, shape (K, 2)
        Mean over views.
    """
    av = np.asarray(av, dtype=np.float64)
    mean, std = av.mean(axis=0), av.std(axis=0)
    ok = (std <= max_std).all(axis=1)
    if candidates is not None:
        ok &= np.asarray(candidates, dtype=bool)
    idx = _cap_per_class(ok, av_quadrant(mean), -std.max(axis=1), per_class)
    return idx, mean[idx]


def emotion_uncertainty(probs: np.ndarray) -> np.ndarray:
    """Normalised entropy in [0, 1] of the views' mean class probabilities, (V, N, C) -> (N,)."""
    mean = np.clip(np.asarray(probs, dtype=np.float64).mean(axis=0), 1e-12, 1.0)
    c = mean.shape[1]
    if c < 2:
        return np.zeros(mean.shape[0])
    return np.clip(-(mean * np.log(mean)).sum(axis=1) / math.log(c), 0.0, 1.0)


def av_uncertainty(av: np.ndarray) -> np.ndarray:
    """Arousal/valence uncertainty in [0, 1]: twice the mean std across views, capped, (V, N, 2) -> (N,)."""
    return np.clip(2 * np.asarray(av, dtype=np.float64).std(axis=0).mean(axis=1), 0.0, 1.0)


def least_certain(uncertainty: np.ndarray, budget: int, candidates: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``budget`` most uncertain candidates, most uncertain first (ties: lower position)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    idx = np.arange(u.size) if candidates is None else np.flatnonzero(candidates)
    if budget <= 0 or idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    return idx[np.argsort(-u[idx], kind="stable")][:budget]


# ---------------------------------------------------------------------------------------
# Dynamic active learning: raters asked until enough agree
# ---------------------------------------------------------------------------------------
def required_agreement(uncertainty: float, a_min: int, a_max: int) -> int:
    """Agreeing raters required for a clip: ``a_min + round((a_max - a_min) * u)``, u in [0, 1].

    The less certain the model (Yue Zhang et al., ICMI 2015), the more raters must agree.
    """
    u = min(max(float(uncertainty), 0.0), 1.0)
    return int(a_min + round((a_max - a_min) * u))


@dataclass
class RaterResult:
    """The outcome of asking raters about one clip.

    Attributes
    ----------
    label : int
        The agreed label, or the majority label when agreement was never reached.
    answers : list of int
        Every rater answer, in the order asked (``len(answers)`` is the human effort).
    agreed : bool
        Whether ``required`` raters agreed before the cap.
    required : int
    """

    label: int
    answers: list
    agreed: bool
    required: int

    @property
    def effort(self) -> int:
        """Rater answers spent."""
        return len(self.answers)


def ask_raters(answers: Iterable[int], required: int, max_raters: int,
               reliabilities: Sequence[float] | None = None) -> RaterResult:
    """Ask raters one at a time until ``required`` of them agree (dynamic active learning).

    Parameters
    ----------
    answers : iterable of int
        The raters' answers in the order they are asked (most reliable first); consumed
        lazily, so a rater after the stop is never asked.
    required : int
        Raters that must give the same label.
    max_raters : int
        Stop after this many answers.
    reliabilities : sequence of float, optional
        The raters' reliabilities in the same order; break majority ties.

    Returns
    -------
    RaterResult
        Stops as soon as some label has ``required`` votes (``agreed``). If the cap (or the
        end of ``answers``) comes first, the label is the majority of the answers; a tie goes
        to the label whose raters have the larger summed reliability, then to the label
        given first.
    """
    votes: Counter = Counter()
    given: list[int] = []
    for answer in answers:
        if len(given) >= max_raters:
            break
        given.append(int(answer))
        votes[int(answer)] += 1
        if votes[int(answer)] >= required:
            return RaterResult(int(answer), given, True, required)
    if not given:
        raise ValueError("no rater answered")
    rel = list(reliabilities or [])
    trust = Counter()
    for i, a in enumerate(given):
        trust[a] += rel[i] if i < len(rel) else 0.0
    first = {a: given.index(a) for a in votes}
    label = max(votes, key=lambda a: (votes[a], trust[a], -first[a]))
    return RaterResult(label, given, False, required)


class Oracle:
    """Simulated raters answering from the hidden labels (simulation only).

    Rater ``r`` gives the true label with probability ``reliability[r]``, else a label drawn
    uniformly from the other classes; for arousal/valence it gives the true value plus
    ``N(0, (1 - reliability)^2)``, clipped to [-1, 1]. Raters are asked most reliable first
    (:func:`ask_raters`) until :func:`required_agreement` of them agree, at most
    ``min(max_raters, number of raters)``; a required agreement above that cap can never be
    reached, and the majority is taken. The arousal/valence answer is the mean of the asked
    raters' ratings; for a clip without a categorical label (task ``av``), the required number
    of raters is asked and their ratings averaged.

    Parameters
    ----------
    reliabilities : sequence of float
        Probability of each rater giving the true label.
    a_min, a_max, max_raters : int
    n_classes : int
    """

    def __init__(self, reliabilities: Sequence[float], a_min: int, a_max: int, max_raters: int, n_classes: int):
        self.reliabilities = sorted((float(r) for r in reliabilities), reverse=True)
        self.a_min, self.a_max, self.n_classes = int(a_min), int(a_max), int(n_classes)
        self.cap = max(1, min(int(max_raters), len(self.reliabilities)))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], n_classes: int) -> "Oracle":
        rel = [float(r) for r in str(settings["rater-reliability"]).split(",") if r.strip()]
        return cls(rel, int(settings["agreement-min"]), int(settings["agreement-max"]),
                   int(settings["max-raters"]), n_classes)

    def rater_label(self, truth: int, reliability: float, rng: np.random.Generator) -> int:
        if self.n_classes < 2 or rng.random() < reliability:
            return int(truth)
        others = [c for c in range(self.n_classes) if c != truth]
        return int(others[rng.integers(len(others))])

    def answer(self, truth_emotion: int, truth_av: np.ndarray | None, uncertainty: float,
               rng: np.random.Generator) -> tuple[int, np.ndarray | None, RaterResult]:
        """Ask the raters about one clip.

        Returns
        -------
        emotion : int
            Agreed (or majority) label; -1 when the clip has no categorical truth.
        av : np.ndarray of shape (2,) or None
            Mean rating of the asked raters; None without an arousal/valence truth.
        result : RaterResult
        """
        required = required_agreement(uncertainty, self.a_min, self.a_max)
        if truth_emotion >= 0:
            rel = self.reliabilities[: self.cap]
            result = ask_raters((self.rater_label(truth_emotion, r, rng) for r in rel), required, self.cap, rel)
            emotion = result.label
        else:
            n = min(required, self.cap)
            result = RaterResult(-1, [-1] * n, True, required)
            emotion = -1
        av = None
        if truth_av is not None and np.isfinite(truth_av).all():
            ratings = [np.clip(truth_av + rng.normal(0, 1 - r, size=2), -1, 1)
                       for r in self.reliabilities[: result.effort]]
            av = np.mean(ratings, axis=0).astype(np.float32)
        return emotion, av, result


# ---------------------------------------------------------------------------------------
# Transfer learning on the device: train only the heads while the front-end is frozen
# ---------------------------------------------------------------------------------------
def _is_head(name: str) -> bool:
    """Whether a parameter or module name belongs to a head (``emotion``, ``av`` and below)."""
    return (name + ".").startswith(HEADS)


def _hold_eval(module: nn.Module, _args) -> None:
    """Forward pre-hook of a frozen front-end normalisation layer: run it in eval mode."""
    module.training = False


def _drop_hold_eval(module: nn.Module) -> bool:
    """Remove the :func:`_hold_eval` hooks of ``module``; whether it had one.

    The hooks are found in the module's own hook table rather than through handles kept
    aside, so a copy of a frozen model (``copy.deepcopy``, pickling) unfreezes as well.
    """
    hooks = module._forward_pre_hooks
    keys = [k for k, h in hooks.items() if h is _hold_eval]
    for k in keys:
        del hooks[k]
    return bool(keys)


def freeze_frontend(model: nn.Module, freeze: bool = True) -> int:
    """Freeze (or unfreeze) the front-end: every parameter and norm layer but the heads
    (``emotion.*``, ``av.*``).

    Frozen parameters get no gradient (``requires_grad = False``), so Adam leaves them as
    they are. A frozen layer with running statistics (batch norm: ``running_mean``,
    ``running_var``, ``num_batches_tracked``; any :class:`torch.nn.modules.batchnorm._NormBase`)
    is also held in eval mode: it normalises with its stored statistics and never updates
    them, so a frozen front-end does not change at all (as Keras does for frozen batch-norm
    layers in fine-tuning). Eval mode cannot simply be set once:
    :func:`shared_models.training.train_local` calls ``model.train()`` at its start, which
    puts every submodule back into training mode. So each frozen norm layer gets a forward
    pre-hook that sets ``module.training = False`` just before it runs, whatever ``train()``
    calls came before; the layer is also put in eval mode at once. Unfreezing removes the
    hooks and gives the layers the model's mode again. Dropout in the front-end keeps
    following the model's mode (it has no state).

    Parameters
    ----------
    model : nn.Module
        A model of :mod:`shared_models.models` (heads ``emotion`` and ``av``).
    freeze : bool
        True: freeze the front-end; False: unfreeze everything. Freezing twice is harmless.

    Returns
    -------
    int
        Number of frozen parameter tensors (0 when unfreezing).
    """
    n = 0
    for name, p in model.named_parameters():
        head = _is_head(name)
        p.requires_grad_(head or not freeze)
        n += int(freeze and not head)
    for name, m in model.named_modules():
        if not isinstance(m, _NormBase) or _is_head(name) or not m.track_running_stats:
            continue
        _drop_hold_eval(m)
        if freeze:
            m.register_forward_pre_hook(_hold_eval)
            m.eval()
        else:
            m.train(model.training)
    return n


# ---------------------------------------------------------------------------------------
# The device's state and its per-round step
# ---------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    """Folder name of a device: ``dev-03 (synth-f1)`` -> ``dev-03-synth-f1``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _settings(cfg, round_cfg: Mapping[str, Any], server_round: int) -> dict[str, Any]:
    """The round's cooperative settings: the server's round config over the run config's."""
    settings = round_settings(cfg, server_round)
    settings.update({k: round_cfg[k] for k in settings if k in round_cfg})
    return settings


@dataclass
class CoopState:
    """Cooperative learning state of one training device (built by :func:`attach`).

    Attributes
    ----------
    cfg : RunConfig
    data_dir : Path
        Where the device's :class:`DeviceStore` lives.
    paths : list of str
        Path of every usable clip, in the order of the device's ``LocalData``.
    durations : np.ndarray, shape (N,)
        Clip durations in seconds (NaN when unknown).
    emotions : list of str
    labelled0 : np.ndarray of bool, shape (N,)
        Clips with a (kept) label at the start.
    truth_emotion, truth_av : np.ndarray or None
        Hidden labels (simulation only): for the oracle and pseudo-label precision.
    seed : int
    """

    cfg: Any
    data_dir: Path
    paths: list
    durations: np.ndarray
    emotions: list
    labelled0: np.ndarray
    truth_emotion: np.ndarray | None = None
    truth_av: np.ndarray | None = None
    seed: int = 0
    _store: DeviceStore | None = field(default=None, repr=False)
    _t_train: float = field(default=0.0, repr=False)
    _index_cache: dict | None = field(default=None, repr=False)
    _meta_written: bool = field(default=False, repr=False)
    _global_view: tuple | None = field(default=None, repr=False)  # (clip rows, probs, av)
    _t_global: float = field(default=0.0, repr=False)
    _frozen: bool = field(default=False, repr=False)  # before_training froze the round's model
    _scored: tuple | None = field(default=None, repr=False)  # (round, clip rows the step scores)
    _clip_vectors: tuple | None = field(default=None, repr=False)  # (features list, clip_vectors of it)

    @property
    def simulated(self) -> bool:
        return self.truth_emotion is not None

    @property
    def store(self) -> DeviceStore:
        if self._store is None:
            from .device_store import DeviceStore

            self._store = DeviceStore(self.data_dir)
        return self._store

    @property
    def active(self) -> bool:
        """Whether the run's mode does anything beyond supervised training."""
        return self.cfg.mode != "supervised"

    @property
    def reads_store(self) -> bool:
        """Whether this run reads the device's store (:attr:`store`): in every mode but
        ``supervised``; in a supervised run, on a real device whose store exists, for the
        answers its person gave (human labels count in every mode). Never in a supervised
        simulation: no rater answers one, and it opens no store."""
        if self.active:
            return True
        if self.simulated:
            return False
        from .device_store import STORE_FILE

        return (self.data_dir / STORE_FILE).exists()

    def info(self) -> dict[str, Any]:
        """Counts for the device's description: ``n-pool``, clips without a label at the start;
        ``n-answered``, those of them its person (or the simulated raters) has answered, which
        it trains on in every mode (a device whose only labels are answers is a training device)."""
        out = {"n-pool": int((~self.labelled0).sum())}
        if self.reads_store:
            out["n-answered"] = int(self._counts()["answered"])
        return out

    # -- the training set -------------------------------------------------------------
    def training_data(self, data: LocalData) -> LocalData:
        """``data`` with the answered queries filled in, in every mode, and the active
        pseudo-labels, in modes ``self-labelling`` and ``cooperative`` (features shared).

        A person's answers (``fedaffect device label``) are human labels, trained on whatever
        the run's mode; pseudo-labels are machine labels, trained on only by the modes that
        make them (a store keeps those of earlier runs, which an ``active`` or ``supervised``
        run leaves out). A supervised simulation has no answers: ``data`` as it is.
        """
        if not self.reads_store:
            return data
        emotion, av = self._human_labels(data)
        if self.cfg.mode not in SELF_LABELLING:
            return LocalData(data.x, emotion, av, data.groups)
        index = self._index
        for clip, p in self.store.active_pseudo().items():
            i = index.get(clip)
            if i is None:
                continue
            # a human label wins over a machine label, kind by kind: a clip in an av run's
            # pool may have a human emotion but no arousal/valence, and the other way round
            if p["emotion"] in self.emotions and emotion[i] < 0:
                emotion[i] = self.emotions.index(p["emotion"])
            if p["arousal"] is not None and p["valence"] is not None and not np.isfinite(av[i]).any():
                av[i] = (p["arousal"], p["valence"])
        return LocalData(data.x, emotion, av, data.groups)

    def _human_labels(self, data: LocalData) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``data``'s emotion (N,) and arousal/valence (N, 2) labels with the
        person's (or, in simulation, the raters') answers filled in; no machine label."""
        emotion, av = data.emotion.copy(), data.av.copy()
        for clip, a in self.store.answers().items():
            i = self._index.get(clip)
            if i is None:
                continue
            if a["emotion"] in self.emotions:
                emotion[i] = self.emotions.index(a["emotion"])
            if a["arousal"] is not None and a["valence"] is not None:
                av[i] = (a["arousal"], a["valence"])
        return emotion, av

    def before_training(self, model: nn.Module, data: LocalData, round_cfg: Mapping[str, Any],
                        server_round: int) -> LocalData:
        """The round's training set (labels + answers + pseudo-labels, optionally upsampled);
        freezes the front-end while the server says so (:func:`freeze_frontend`; undone by
        :meth:`after_training`).

        Arousal/valence in the returned set are on the label scale; with FaiReg the caller
        normalises them (``client/app.py`` ``train``).
        """
        with self._unchecked_reads():
            return self._before_training(model, data, round_cfg, server_round)

    def _unchecked_reads(self):
        """The store's :meth:`DeviceStore.unchecked_reads` (nothing for a run that reads no
        store, :attr:`reads_store`): within one step, another process's answers can wait for
        the next."""
        return self.store.unchecked_reads() if self.reads_store else contextlib.nullcontext()

    def _before_training(self, model, data, round_cfg, server_round) -> LocalData:
        t0 = time.perf_counter()
        settings = _settings(self.cfg, round_cfg, server_round)
        self._global_view = None
        if settings["coop-mode"] in SELF_LABELLING and settings["pseudo-global-view"]:
            # The received global model's clean predictions of the clips without a label at
            # the start (the pool is among them): one more view for the step.
            unlabelled = self._round_candidates(settings, server_round)
            self._global_view = (unlabelled, *view_predictions(model, [data.x[i] for i in unlabelled],
                                                               views=1, noise=0.0))
        self._frozen = bool(settings["freeze"])
        if self._frozen:
            freeze_frontend(model, True)
        train = self.training_data(data)
        if settings["upsample"]:
            train = upsample(train)
        self._t_train = time.perf_counter()
        # part of the cooperative step's time: the global model's view and merging the
        # person's answers and the pseudo-labels into the training set
        self._t_global = self._t_train - t0
        return train

    def _round_candidates(self, settings: Mapping[str, Any], server_round: int) -> np.ndarray:
        """Sorted rows of the clips without a label at the start that this round's step scores.

        All of them, unless there are more than ``pool-sample``: then every clip holding a
        pseudo-label (each is re-checked every round) plus a seeded random sample of
        ``pool-sample`` others, a new one each round. Scoring a clip costs ``pseudo-views`` + 1
        forward passes, so a device with thousands of unlabelled recordings would otherwise
        spend most of a round predicting them. The same rows for the received model's view
        (before training) and the step (after).
        """
        if self._scored is not None and self._scored[0] == server_round:
            return self._scored[1]
        rows = np.flatnonzero(~self.labelled0)
        cap = int(settings.get("pool-sample", 0))
        if 0 < cap < rows.size:
            active = self.store.active_pseudo()
            held = np.array([self.paths[i] in active for i in rows], dtype=bool)
            rng = np.random.default_rng([self.seed, server_round, 11])
            rest = rows[~held]
            rows = np.sort(np.concatenate([rows[held], rng.choice(rest, size=min(cap, rest.size), replace=False)]))
        self._scored = (server_round, rows)
        return rows

    # -- the cooperative step ---------------------------------------------------------
    def after_training(self, model: nn.Module, data: LocalData, round_cfg: Mapping[str, Any],
                       server_round: int) -> dict[str, Any]:
        """Run the cooperative step on the pool after local training; return the round's counts.

        Unfreezes the front-end. The round config's ``faireg`` (FaiReg parameters, JSON) maps
        the model's arousal/valence predictions back to the label scale first
        (:func:`av_to_label_scale`).

        Returns
        -------
        dict
            Counts reported to the coordinator (see :meth:`_counts`) plus ``added``,
            ``dropped``, ``queries``, ``rater_answers`` (this round), ``skipped`` (1 when the
            pool was empty and the step skipped), ``seconds`` (the step, with what it does
            before training: the global model's view and building the training set from
            the person's answers and the pseudo-labels) and ``train_seconds`` (local training).
        """
        t0 = time.perf_counter()
        with self._unchecked_reads():
            return self._after_training(model, data, round_cfg, server_round, t0)

    def _after_training(self, model, data, round_cfg, server_round, t0: float) -> dict[str, Any]:
        if self._frozen:
            freeze_frontend(model, False)
            self._frozen = False
        settings = _settings(self.cfg, round_cfg, server_round)
        mode = settings["coop-mode"]
        step = {"mode": mode, "added": 0, "added_correct": 0, "dropped": 0, "queries": 0,
                "rater_answers": 0, "skipped": 0, "train_seconds": t0 - self._t_train if self._t_train else 0.0}
        if mode != "supervised":
            if not self._meta_written:  # what `fedaffect device label` offers the person
                meta = {"emotions": list(self.emotions),  # the answers the person may give
                        "task": self.cfg.task}  # which answers (labels, arousal/valence) it uses
                self.store.update_meta({k: v for k, v in meta.items() if self.store.get_meta(k) != v})
                self._meta_written = True
            answered = set(self.store.answers())
            pool = ~self.labelled0 & np.array([p not in answered for p in self.paths], dtype=bool)
            scored = np.zeros_like(pool)
            scored[self._round_candidates(settings, server_round)] = True
            pool &= scored
            if not pool.any():
                log.info("%s: the unlabelled pool is empty; cooperative step skipped", self.data_dir.name)
                step["skipped"] = 1
            else:
                self._step(model, data, settings, server_round, np.flatnonzero(pool), step, faireg_of(round_cfg))
            if self.simulated and mode in ACTIVE:
                self._oracle(settings, server_round, step)
        step["seconds"] = time.perf_counter() - t0 + self._t_global
        self._t_global, self._scored = 0.0, None
        return {**self._counts(), **step}

    def _pool_views(self, model, data, settings, server_round, pool_idx,
                    prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The trained model's ``pseudo-views`` views of the pool clips: ``probs`` (V, N, C),
        ``av`` (V, N, 2), and ``full`` (N,) bool, the clips all views were computed for.

        Only the clean view (V = 1) where no pseudo-label is chosen and queries are ranked on
        it (mode ``active``, tasks ``emotion`` and ``both``).

        For large inputs (:data:`TWO_STAGE_MIN_NUMBERS`) in a self-labelling round (modes
        ``self-labelling`` and ``cooperative``), the clean view comes first and the noisy views only for
        the clips that hold a pseudo-label (re-checked) or :func:`could_pass` the selection
        given the clean view and the received model's (aligned with ``prior`` as the step
        aligns them, :func:`align_distribution`); the others keep the clean view in
        every row and are left out of the selection (they could not pass it). The same
        pseudo-labels, for a fraction of the forward passes.
        """
        views, mode, task = int(settings["pseudo-views"]), settings["coop-mode"], self.cfg.task
        if mode not in SELF_LABELLING and task != "av":
            views = 1  # a categorical query is ranked on the clean view alone: no noisy view needed
        kw = dict(noise=float(settings["view-noise"]), mc_dropout=settings["uncertainty"] == "mc-dropout",
                  seed=self.seed * 1_000_003 + server_round)
        xs = [data.x[i] for i in pool_idx]
        full = np.ones(len(xs), dtype=bool)
        two_stage = (views > 1 and not kw["mc_dropout"] and task in ("emotion", "both")
                     and mode in SELF_LABELLING and max(np.size(x) for x in xs) >= TWO_STAGE_MIN_NUMBERS)
        if not two_stage:
            return (*view_predictions(model, xs, views=views, **kw), full)
        probs, av = view_predictions(model, xs, views=1, **kw)
        received = self._global_rows(pool_idx)
        clean = [probs[0]] if received is None else [probs[0], received[0][0]]
        active = self.store.active_pseudo()
        if prior is not None and prior.size == clean[0].shape[1]:
            clean = list(align_distribution(np.stack(clean), prior))
        full = could_pass(clean, float(settings["pseudo-threshold"]), views + len(clean) - 1)
        full |= np.array([self.paths[i] in active for i in pool_idx], dtype=bool)
        probs, av = np.repeat(probs, views, axis=0), np.repeat(av, views, axis=0)
        if full.any():  # the noisy views 1.. of those clips
            at = np.flatnonzero(full)
            probs[1:, at], av[1:, at] = view_predictions(model, [xs[j] for j in at], views=views - 1,
                                                         include_clean=False, **kw)
        return probs, av, full

    def _query_budget(self, settings) -> int:
        """Clips this round's step may queue for a person: ``query-per-round``, within what is
        left of ``query-total`` (0 outside the active modes)."""
        if settings["coop-mode"] not in ACTIVE:
            return 0
        left = int(settings["query-total"]) - len(self.store.queued_clips())
        return max(0, min(int(settings["query-per-round"]), left))

    def _global_rows(self, pool_idx) -> tuple[np.ndarray, np.ndarray] | None:
        """The received model's view (:meth:`before_training`) of the pool clips: probabilities
        (1, N, C) and arousal/valence (1, N, 2); None without that view."""
        if self._global_view is None:
            return None
        unlabelled, g_probs, g_av = self._global_view
        at = np.searchsorted(unlabelled, pool_idx)  # the pool is a subset of the unlabelled clips
        return g_probs[:, at], g_av[:, at]

    def _step(self, model, data, settings, server_round, pool_idx, step, faireg: FaiRegParams | None = None) -> None:
        task = self.cfg.task
        prior = None
        if settings.get("pseudo-align") and task in ("emotion", "both") and len(pool_idx):
            # the class distribution of the device's human labels (add-one: uniform without any)
            emotion, _ = self._human_labels(data)
            n = len(self.emotions)  # the model's classes
            prior = np.bincount(emotion[(emotion >= 0) & (emotion < n)], minlength=n) + 1.0
        probs, av, full = self._pool_views(model, data, settings, server_round, pool_idx, prior)
        if faireg is not None:  # everything below (re-check, queue, selection) works on the label scale
            keys = faireg_group_keys(data.groups, faireg.attributes, len(data))[pool_idx]
            av = av_to_label_scale(av, faireg, keys)
        sel_probs, sel_av = probs, av  # the views that pseudo-labels are chosen and re-checked with
        clean = probs[:1]  # the clean views: the trained model's, and the received one's
        received = self._global_rows(pool_idx)
        if received is not None:
            g_probs, g_av = received
            if faireg is not None:
                g_av = av_to_label_scale(g_av, faireg, keys)
            sel_probs, sel_av = np.concatenate([probs, g_probs]), np.concatenate([av, g_av])
            clean = np.concatenate([probs[:1], g_probs])
            self._global_view = None
        if prior is not None and prior.size == sel_probs.shape[2]:
            # weights from the clean views: known before the noisy views, so that two-stage
            # scoring (_pool_views) can bound the aligned selection
            sel_probs = align_distribution(sel_probs, prior, reference=clean)
        clips = [self.paths[i] for i in pool_idx]
        pos = {c: j for j, c in enumerate(clips)}
        mode = settings["coop-mode"]
        active = self.store.active_pseudo()
        # 1. re-check the machine labels in force; 2. queue the least certain clips for a
        # human; 3. machine-label the confident clips among the rest.
        if mode in SELF_LABELLING and settings["pseudo-recheck"] and active:
            self._recheck(sel_probs, sel_av, pos, active, settings, server_round, step)
            active = self.store.active_pseudo()
        if mode in ACTIVE:
            queued = self.store.queued_clips()
            budget = self._query_budget(settings)
            if budget > 0:
                # Least confident under the trained model's clean view (its normalised
                # entropy); arousal/valence: the spread over the views (or dropout samples).
                uncertainty = emotion_uncertainty(probs[:1]) if task in ("emotion", "both") else av_uncertainty(av)
                cand = np.array([c not in active and c not in queued for c in clips], dtype=bool)
                chosen = least_certain(uncertainty, budget, cand)
                mean, mean_av = probs[0], av[0]
                items = []
                for j in chosen:
                    # The person sees the model's clean guesses of what the task learns (an
                    # av run's emotion head is untrained); arousal/valence on the label scale.
                    top = np.argsort(-mean[j], kind="stable")[:3] if task in ("emotion", "both") else []
                    items.append({
                        "clip": clips[j], "uncertainty": float(uncertainty[j]),
                        "duration": None if not np.isfinite(self.durations[pool_idx[j]]) else float(self.durations[pool_idx[j]]),
                        "guesses": [[self.emotions[k], round(float(mean[j, k]), 4)] for k in top if k < len(self.emotions)],
                        "av_guess": ([round(float(mean_av[j, 0]), 4), round(float(mean_av[j, 1]), 4)]
                                     if task in ("av", "both") else None),
                    })
                step["queries"] = self.store.enqueue(server_round, items)
                queued |= {it["clip"] for it in items}
        if mode in SELF_LABELLING:
            if mode not in ACTIVE:
                queued = self.store.queued_clips()  # a clip waiting for its human is not machine-labelled
            free = np.array([c not in active and c not in queued for c in clips], dtype=bool) & full
            items = self._select(sel_probs, sel_av, free, clips, settings, task, data, pool_idx)
            share = float(settings.get("pseudo-max-share", 1.0))
            if share < 1.0:  # curriculum: only the most confident part of the pool at once
                room = max(0, int(share * np.count_nonzero(~self.labelled0)) - len(active))
                items = sorted(items, key=lambda it: -it["confidence"])[:room]
            step["added"] = self.store.add_pseudo(server_round, items)
            if self.simulated:
                step["added_correct"] = sum(self._correct(it) for it in items)

    def _recheck(self, probs, av, pos, active, settings, server_round, step) -> None:
        """Drop the pseudo-labels the current model no longer supports."""
        drop = {}
        emo = [(c, p) for c, p in active.items() if c in pos and p["emotion"] in self.emotions]
        if emo:
            j = np.array([pos[c] for c, _ in emo])
            labels = np.array([self.emotions.index(p["emotion"]) for _, p in emo])
            ok = recheck_pseudo_labels(probs[:, j], labels, float(settings["pseudo-keep"]))
            drop.update({c: "model changed its mind" for (c, _), k in zip(emo, ok) if not k})
        dims = [(c, p) for c, p in active.items() if c in pos and c not in drop and p["arousal"] is not None]
        if dims:
            j = np.array([pos[c] for c, _ in dims])
            then = np.array([[p["arousal"], p["valence"]] for _, p in dims])
            ok = recheck_av_pseudo_labels(av[:, j], then, float(settings["av-max-std"]))
            drop.update({c: "arousal/valence no longer supported" for (c, _), k in zip(dims, ok) if not k})
        for reason in set(drop.values()):
            step["dropped"] += self.store.drop_pseudo(server_round, [c for c, r in drop.items() if r == reason], reason)
        # A categorical pseudo-label the model still supports survives the loss of its
        # arousal/valence part: it is re-added without it (the history keeps both rows).
        keep_emotion = [{"clip": c, "emotion": active[c]["emotion"], "confidence": active[c]["confidence"]}
                        for c, r in drop.items() if r.startswith("arousal") and active[c]["emotion"]]
        if keep_emotion:
            self.store.add_pseudo(server_round, keep_emotion)
            step["dropped"] -= len(keep_emotion)
            step["av_dropped"] = step.get("av_dropped", 0) + len(keep_emotion)

    def _knn_agrees(self, probs, data: LocalData, pool_idx: np.ndarray, k: int) -> np.ndarray:
        """Per pool clip: whether the majority label of its ``k`` nearest clips labelled by a
        person (labels kept at the start and answers) is the model's predicted class. All
        True when the features have no per-clip vector (raw waveforms) or nobody labelled a clip."""
        cached = self._clip_vectors  # a device's features never change: computed once per process
        if cached is None or cached[0] is not data.x:
            self._clip_vectors = cached = (data.x, clip_vectors(data.x))
        vectors = cached[1]
        emotion, _ = self._human_labels(data)
        ref = np.flatnonzero(emotion >= 0)
        if vectors is None or ref.size == 0:
            return np.ones(len(pool_idx), dtype=bool)
        votes = knn_labels(vectors[ref], emotion[ref], vectors[pool_idx], k)
        return votes == np.asarray(probs).mean(axis=0).argmax(axis=1)

    def _select(self, probs, av, free, clips, settings, task, data=None, pool_idx=None) -> list[dict[str, Any]]:
        """New pseudo-labels among the free pool clips (items for :meth:`DeviceStore.add_pseudo`)."""
        per_class, av_std = int(settings["pseudo-per-class"]), float(settings["av-max-std"])
        items = []
        if task in ("emotion", "both"):
            k = int(settings.get("pseudo-knn", 0))
            if k > 0:  # the device's human labels must agree too (nearest neighbours in feature space)
                free = free & self._knn_agrees(probs, data, pool_idx, k)
            idx, labels, conf = select_pseudo_labels(probs, float(settings["pseudo-threshold"]),
                                                     float(settings["pseudo-max-std"]), per_class, free)
            av_ok = set()
            if task == "both" and idx.size:
                av_idx, _ = select_av_pseudo_labels(av[:, idx], av_std)
                av_ok = set(idx[av_idx].tolist())
            mean_av = av.mean(axis=0)
            for j, c, p in zip(idx, labels, conf):
                item = {"clip": clips[j], "emotion": self.emotions[c], "confidence": float(p)}
                if j in av_ok:
                    item.update(arousal=float(mean_av[j, 0]), valence=float(mean_av[j, 1]))
                items.append(item)
        else:
            idx, values = select_av_pseudo_labels(av, av_std, per_class, free)
            std = av.std(axis=0).max(axis=1)
            items = [{"clip": clips[j], "arousal": float(v[0]), "valence": float(v[1]),
                      "confidence": float(1 - min(1.0, 2 * std[j]))} for j, v in zip(idx, values)]
        return items

    def _correct(self, item: Mapping[str, Any]) -> bool:
        """Whether a pseudo-label matches the hidden truth (emotion; else the av quadrant)."""
        i = self._index.get(item["clip"])
        if i is None:
            return False
        if item.get("emotion"):
            t = int(self.truth_emotion[i])  # -1: no hidden emotion among the run's classes
            return t >= 0 and self.emotions[t] == item["emotion"]
        t = self.truth_av[i]
        return bool(np.isfinite(t).all() and av_quadrant(t)[0] == av_quadrant([item["arousal"], item["valence"]])[0])

    @property
    def _index(self) -> dict[str, int]:
        if self._index_cache is None:
            self._index_cache = {p: i for i, p in enumerate(self.paths)}
        return self._index_cache

    def _oracle(self, settings, server_round, step) -> None:
        """Simulation: the raters answer every pending query from the hidden labels."""
        pending = self.store.pending()
        if not pending:
            return
        oracle = Oracle.from_settings(settings, len(self.emotions))
        rng = np.random.default_rng([self.seed, server_round, 7])
        given = []
        for item in pending:
            i = self._index.get(item["clip"])
            truth_e = int(self.truth_emotion[i]) if i is not None else -1
            truth_av = self.truth_av[i] if i is not None else None
            if i is None or (truth_e < 0 and not np.isfinite(truth_av).all()):
                self.store.drop_queued(item["clip"], "no hidden label to answer from")
                continue
            emotion, av, result = oracle.answer(truth_e, truth_av, item["uncertainty"], rng)
            given.append({
                "clip": item["clip"], "emotion": self.emotions[emotion] if emotion >= 0 else "",
                "arousal": None if av is None else float(av[0]), "valence": None if av is None else float(av[1]),
                "source": "oracle", "n_raters": result.effort,
                "rater_labels": [self.emotions[a] if a >= 0 else "" for a in result.answers],
                "server_round": server_round})
            step["rater_answers"] += result.effort
        self.store.answer_many(given)  # one transaction for the round's answers

    def _counts(self) -> dict[str, Any]:
        """Cumulative counts: clips, human labels (answers count in every mode, as in
        :meth:`training_data`), pseudo-labels (in the self-labelling modes) and their precision."""
        n = len(self.paths)
        initial = int(self.labelled0.sum())
        counts = {"n_clips": n, "initial_labelled": initial, "labelled": initial, "answered": 0,
                  "pool": n - initial, "pseudo_total": 0, "pseudo_correct": 0, "pseudo_checked": 0,
                  "queries_total": 0, "pending": 0, "rater_answers_total": 0, "human_labels": initial}
        if not self.reads_store:
            return counts
        answers = self.store.answers()
        index = self._index
        answered = [c for c in answers if c in index and not self.labelled0[index[c]]]
        active = self.store.active_pseudo() if self.cfg.mode in SELF_LABELLING else {}
        queue = self.store.queue()
        effort = sum(answers[c]["n_raters"] for c in answered)
        counts.update(labelled=initial + len(answered), answered=len(answered), pool=n - initial - len(answered),
                      pseudo_total=len(active), queries_total=len(queue),
                      pending=sum(q["status"] == "pending" for q in queue),
                      rater_answers_total=effort, human_labels=initial + effort)
        if self.simulated:
            counts["pseudo_checked"] = sum(c in index for c in active)
            counts["pseudo_correct"] = sum(self._correct(p) for p in active.values())
        return counts


def upsample(data: LocalData, seed: int = 0) -> LocalData:
    """Repeat labelled rows of the rarer emotion classes until every class present is as
    frequent as the largest (cross-task self-labelling); rows without an emotion stay once."""
    labels = data.emotion
    known = labels >= 0
    if not known.any():
        return data
    counts = np.bincount(labels[known])
    target = counts.max()
    rng = np.random.default_rng(seed)
    extra = []
    for c in np.flatnonzero(counts):
        idx = np.flatnonzero(labels == c)
        extra += rng.choice(idx, size=target - idx.size, replace=True).tolist()
    order = np.concatenate([np.arange(len(data)), np.asarray(extra, dtype=np.int64)])
    return data.subset(order)


def attach(device, cfg, table, node_config: Mapping[str, Any]) -> CoopState | None:
    """Give a training device its cooperative-learning state; hide labels in simulation.

    Simulation (node config ``partition-id``): the device keeps the labels of a seeded
    stratified ``label-fraction`` of its clips (:func:`label_split`, strata = emotion, else
    arousal/valence quadrant, seed ``(seed, partition-id)``); the other labels are removed
    from ``device.data`` (in place) and kept on the state as the hidden truth. The store
    lives in ``<run-dir>/<run-name>/devices/<device-slug>/``. Deployment (``data-dir``): the
    clips without a label form the pool; the store lives in the data directory.

    Parameters
    ----------
    device : client.app.Device
    cfg : RunConfig
    table : pandas.DataFrame
        The manifest rows of the device's usable clips, in ``device.data`` order.
    node_config : mapping

    Returns
    -------
    CoopState or None
        None for held-out devices (they only evaluate).
    """
    if device.role != "train":
        return None
    data = device.data
    paths = [str(p) for p in table["path"]]
    durations = table["duration"].to_numpy(dtype=np.float64) if "duration" in table else np.full(len(paths), np.nan)
    task_label, has_av = data.labelled(cfg.task), data.labelled("av")
    seed = cfg.seed * 1_009 + max(device.partition_id, 0)
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        return CoopState(cfg, data_dir, paths, durations, list(device.emotions), task_label.copy(), seed=seed)
    truth_emotion, truth_av = data.emotion.copy(), data.av.copy()
    # Strata: the emotion; clips with only arousal/valence, their quadrant.
    quadrant = av_quadrant(np.nan_to_num(data.av))
    strata = [device.emotions[e] if e >= 0 and cfg.task != "av" else (f"av{q}" if ok and cfg.task != "emotion" else "")
              for e, q, ok in zip(data.emotion, quadrant, has_av)]
    keep = label_split(strata, cfg.label_fraction, (cfg.seed, max(device.partition_id, 0)))
    data.emotion[~keep] = -1
    data.av[~keep] = np.nan
    run_name = cfg.run_name or "unnamed-run"
    data_dir = Path(cfg.run_dir) / run_name / "devices" / device_slug(device.name)
    state = CoopState(cfg, data_dir, paths, durations, list(device.emotions), keep & task_label,
                      truth_emotion, truth_av, seed=seed)
    if cfg.label_fraction < 1:
        log.info("%s: %d of %d clips keep their labels, %d form the pool", device.name, int(keep.sum()),
                 len(paths), int((~keep).sum()))
    return state


# ---------------------------------------------------------------------------------------
# Server side: per-round aggregation of the devices' counts
# ---------------------------------------------------------------------------------------
class CoopTracker:
    """Aggregates the devices' cooperative counts into round metrics (coordinator side).

    Each training device's last report is remembered, so cumulative totals (human labels,
    labelled fraction, pseudo-labels in force) stay right when a round samples only some
    devices. Before a device has reported, its description's ``n-labelled`` and ``n-clips``
    stand in.

    Parameters
    ----------
    infos : iterable of dict
        The training devices' descriptions (``name``, ``n-clips``, ``n-labelled``).
    """

    def __init__(self, infos: Iterable[Mapping[str, Any]]) -> None:
        self.last: dict[str, dict[str, Any]] = {}
        for d in infos:
            self.add(d)

    def add(self, info: Mapping[str, Any]) -> None:
        """Count a training device from its description (``name``, ``n-clips``,
        ``n-labelled``, ``n-pool``) until it reports; one already counted is kept."""
        n, lab = int(info.get("n-clips", 0)), int(info.get("n-labelled", 0))
        self.last.setdefault(str(info["name"]), {
            "n_clips": n, "labelled": lab, "human_labels": lab, "pseudo_total": 0, "pseudo_correct": 0,
            "pseudo_checked": 0, "pool": int(info.get("n-pool", 0)), "rater_answers_total": 0, "queries_total": 0})

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Each device's last report (saved with every checkpoint, so a resumed run keeps
        its cumulative counts)."""
        return {name: dict(counts) for name, counts in self.last.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore :meth:`state_dict` (devices not in ``state`` keep their start values)."""
        for name, counts in state.items():
            self.last[str(name)] = dict(counts)

    def update(self, device_records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Round metrics from this round's train replies' ``device`` records.

        Returns
        -------
        dict
            Per round: ``coop_pseudo_added``, ``coop_pseudo_dropped``, ``coop_queries``,
            ``coop_rater_answers``, ``coop_skipped`` (devices whose pool was empty),
            ``coop_seconds`` and ``coop_train_seconds`` (summed over devices);
            cumulative over all training devices: ``coop_labelled``,
            ``coop_labelled_fraction``, ``coop_pool``, ``coop_pseudo_total``,
            ``coop_pseudo_precision`` (NaN without hidden truth or pseudo-labels),
            ``coop_human_labels`` (initially labelled clips + rater answers),
            ``coop_queries_total``, ``coop_rater_answers_total``.
        """
        per_round = {k: 0.0 for k in ("added", "dropped", "queries", "rater_answers", "skipped", "seconds",
                                      "train_seconds")}
        for rec in device_records:
            if "coop" not in rec:
                continue
            report = json.loads(rec["coop"])
            self.last[str(rec.get("name", len(self.last)))] = report
            for k in per_round:
                per_round[k] += float(report.get(k, 0))
        total = lambda k: float(sum(r.get(k, 0) for r in self.last.values()))  # noqa: E731
        clips, checked = total("n_clips"), total("pseudo_checked")
        return {
            "coop_pseudo_added": per_round["added"],
            "coop_pseudo_dropped": per_round["dropped"],
            "coop_queries": per_round["queries"],
            "coop_rater_answers": per_round["rater_answers"],
            "coop_skipped": per_round["skipped"],
            "coop_seconds": per_round["seconds"],
            "coop_train_seconds": per_round["train_seconds"],
            "coop_labelled": total("labelled"),
            "coop_labelled_fraction": total("labelled") / clips if clips else float("nan"),
            "coop_pool": total("pool"),
            "coop_pseudo_total": total("pseudo_total"),
            "coop_pseudo_precision": total("pseudo_correct") / checked if checked else float("nan"),
            "coop_human_labels": total("human_labels"),
            "coop_queries_total": total("queries_total"),
            "coop_rater_answers_total": total("rater_answers_total"),
        }
