"""Local training and evaluation loops, shared by devices, centralised baselines and pre-training.

A device holds a :class:`LocalData` (standardised features plus whatever labels it has) and
trains the shared model on one of three tasks:

- ``"emotion"``: categorical head only, cross-entropy with inverse-frequency class weights;
- ``"av"``: arousal and valence head, loss ``1 - CCC`` averaged over the two dimensions
  (Trigeorgis et al., ICASSP 2016; CCC after Lin 1989);
- ``"both"``: the sum of the two.

Rows without the task's labels are ignored. With ``proximal_mu > 0`` the FedProx proximal term
``mu / 2 * ||w - w_global||^2`` keeps local weights near the round's global weights (Li et al.,
"Federated Optimization in Heterogeneous Networks", MLSys 2020).

:func:`evaluate_local` returns additive statistics only (confusion matrices and CCC sums,
overall and per group value, e.g. per gender), so that the coordinator computes exact pooled and
per-group metrics without seeing predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import TASKS
from .features import collate
from .metrics import ccc_from_sums, ccc_loss, ccc_sums, confusion

__all__ = ["TASKS", "LocalData", "compute_device", "train_local", "predict", "adapt_batch_norm", "evaluate_local"]


@dataclass
class LocalData:
    """One device's (or one split's) clips.

    Attributes
    ----------
    x : list of np.ndarray
        Standardised features per clip (as produced by a front-end).
    emotion : np.ndarray, shape (N,), int64
        Emotion class index, ``-1`` where unknown.
    av : np.ndarray, shape (N, 2), float32
        Arousal and valence in [-1, 1], NaN where unknown.
    groups : dict of str -> np.ndarray of str, shape (N,)
        Group attributes for per-group statistics, e.g. ``{"gender": ...}``.
    """

    x: list
    emotion: np.ndarray
    av: np.ndarray
    groups: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        self.emotion = np.asarray(self.emotion, dtype=np.int64).reshape(n)
        self.av = np.asarray(self.av, dtype=np.float32).reshape(n, 2)
        self.groups = {k: np.asarray(v, dtype=str).reshape(n) for k, v in self.groups.items()}

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx) -> "LocalData":
        """Rows ``idx`` (integer indices or a boolean mask) as a new LocalData."""
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return LocalData([self.x[i] for i in idx], self.emotion[idx], self.av[idx],
                         {k: v[idx] for k, v in self.groups.items()})

    def labelled(self, task: str) -> np.ndarray:
        """Boolean (N,): rows carrying a label that ``task`` trains on (an emotion for
        ``emotion``, arousal or valence for ``av``, either for ``both``).

        Raises
        ------
        ValueError
            For an unknown task.
        """
        _check_task(task)
        emo, av = self.emotion >= 0, np.isfinite(self.av).any(axis=1)
        return {"emotion": emo, "av": av, "both": emo | av}[task]


def compute_device(name: str) -> torch.device:
    """The torch device that ``compute-device`` names: ``cpu``, ``cuda`` or ``auto`` (CUDA
    when torch sees a GPU, else the CPU). Models go there (``model.to(...)``); the training
    and evaluation loops here move their batches to wherever the model is.

    Raises
    ------
    ValueError
        For ``cuda`` when torch sees no CUDA device, or an unknown name.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name in ("cuda", "auto"):
        if not torch.cuda.is_available():
            raise ValueError("compute-device = 'cuda', but torch sees no CUDA device here "
                             f"(torch {torch.__version__}); use 'cpu' or 'auto'")
        return torch.device("cuda")
    raise ValueError(f"unknown compute device {name!r}; known: cpu, cuda, auto")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _task_loss(out: dict, y: torch.Tensor, av: torch.Tensor, task: str,
               weight: torch.Tensor | None) -> torch.Tensor | None:
    """Loss of one batch; None when the batch carries nothing the task can learn from
    (CCC needs >= 2 labelled rows per dimension)."""
    parts = []
    if task in ("emotion", "both") and (m := y >= 0).any():
        parts.append(nn.functional.cross_entropy(out["emotion"][m], y[m], weight=weight))
    if task in ("av", "both"):
        dims = [ccc_loss(out["av"][m, d], av[m, d])
                for d in range(2) if (m := torch.isfinite(av[:, d])).sum() >= 2]
        if dims:
            parts.append(torch.stack(dims).mean())
    return sum(parts) if parts else None


def _class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (k * count_c)`` over the k classes present (1 for absent)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def _batches(idx: np.ndarray, batch_size: int):
    return (idx[i : i + batch_size] for i in range(0, len(idx), batch_size))


def train_local(
    model: nn.Module,
    data: LocalData,
    *,
    task: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
    class_weights: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``model`` in place on the labelled rows of ``data`` with Adam.

    Parameters
    ----------
    model : nn.Module
        A model from :mod:`shared_models.models` (forward returns ``{"emotion", "av"}``).
    data : LocalData
        Standardised features and labels; rows without the task's labels are ignored.
    task : {"emotion", "av", "both"}
    epochs, lr, batch_size : int, float, int
        Local epochs, Adam learning rate, clips per batch.
    seed : int
        Seeds torch (initial dropout state) and the shuffling generator: equal seeds, equal
        inputs and equal start weights give equal results.
    proximal_mu : float
        FedProx coefficient (Li et al. 2020); the anchor is the weights at the start.
    class_weights : bool
        Weight cross-entropy by inverse class frequency of this device's labelled rows.
    on_epoch : callable, optional
        ``on_epoch(epoch, loss)`` after each epoch (1-based; the epoch's mean task loss).

    Returns
    -------
    dict
        ``train_loss`` (float, mean task loss over the last epoch's batches, weighted by batch
        size, without the proximal term; NaN when nothing was trained), ``num_examples`` (int,
        labelled rows used), ``steps`` (int, optimiser steps).

    Raises
    ------
    ValueError
        For an unknown task.
    """
    _check_task(task)
    idx = np.flatnonzero(data.labelled(task))
    result = {"train_loss": float("nan"), "num_examples": int(idx.size), "steps": 0}
    if idx.size == 0 or epochs <= 0:
        return result
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device  # the model's compute device (compute_device)
    emotion, av = torch.from_numpy(data.emotion).to(dev), torch.from_numpy(data.av).to(dev)
    weight, labels = None, data.emotion[idx][data.emotion[idx] >= 0]
    if class_weights and task in ("emotion", "both") and labels.size:
        weight = _class_weights(labels, getattr(model, "n_classes", int(labels.max()) + 1)).to(dev)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(1, epochs + 1):
        total, rows = 0.0, 0
        for batch in _batches(idx[torch.randperm(idx.size, generator=gen).numpy()], batch_size):
            x, lengths = collate([data.x[i] for i in batch])
            loss = _task_loss(model(x, lengths), emotion[batch], av[batch], task, weight)
            if loss is None:
                continue
            objective = loss
            if anchor is not None:
                objective = loss + proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            optimiser.zero_grad()
            objective.backward()
            optimiser.step()
            result["steps"] += 1
            total, rows = total + loss.item() * len(batch), rows + len(batch)
        result["train_loss"] = total / rows if rows else float("nan")
        if on_epoch is not None:
            on_epoch(epoch, result["train_loss"])
    return result


@torch.no_grad()
def predict(model: nn.Module, data: LocalData, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Predictions in eval mode (the model's mode is restored afterwards).

    Returns
    -------
    probs : np.ndarray, shape (N, C), float32
        Softmax class probabilities.
    av : np.ndarray, shape (N, 2), float32
        Arousal and valence in [-1, 1].
    """
    was_training = model.training
    model.eval()
    probs, avs = [], []
    for batch in _batches(np.arange(len(data)), batch_size):
        out = model(*collate([data.x[i] for i in batch]))
        probs.append(torch.softmax(out["emotion"], dim=1).cpu().numpy())
        avs.append(out["av"].cpu().numpy())
    model.train(was_training)
    if not probs:
        return np.zeros((0, getattr(model, "n_classes", 0)), np.float32), np.zeros((0, 2), np.float32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(avs).astype(np.float32)


@torch.no_grad()
def adapt_batch_norm(model: nn.Module, data: LocalData) -> nn.Module:
    """A copy of ``model`` whose batch-norm statistics are re-estimated on ``data``'s clips (AdaBN).

    Adaptive batch normalisation (Li, Wang, Shi, Hou and Liu, "Adaptive Batch Normalization
    for practical domain adaptation", Pattern Recognition 2018): a model meeting a new domain
    keeps its weights and replaces every batch norm's running mean and variance by those of
    the new domain's data. Here the domain is a device's speaker: a device evaluating a
    global model first runs its own clips (labels unused) through it, so the model normalises
    each layer with the statistics of the voice it is evaluated on, as the front-end's
    per-device standardisation already does for its input. The averaged running statistics a
    federation ends with are the mean of the devices' within-speaker statistics, which fits
    no speaker, least an unseen one (FedBN, Li et al. ICLR 2021, makes the same observation
    for training).

    Each clip is one batch (no padding enters the statistics); the statistics are the
    cumulative average over the clips (``momentum=None``). Only the batch norms run in
    training mode (dropout stays off).

    Parameters
    ----------
    model : nn.Module
        Left unchanged.
    data : LocalData
        The clips (standardised features); labels are not used.

    Returns
    -------
    nn.Module
        The adapted copy, in eval mode; ``model`` itself when it has no batch norm or
        ``data`` is empty.
    """
    from .models import copy_model

    if len(data) == 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    adapted = copy_model(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for clip in data.x:
        adapted(*collate([clip]))
    for bn in norms:
        bn.eval()
    return adapted


def _stats(y: np.ndarray, pred: np.ndarray, av: np.ndarray, av_pred: np.ndarray, n_classes: int) -> dict:
    known = y >= 0
    return {
        "cm": confusion(y[known], pred[known], n_classes),
        "sums_arousal": ccc_sums(av_pred[:, 0], av[:, 0]),
        "sums_valence": ccc_sums(av_pred[:, 1], av[:, 1]),
    }


def evaluate_local(model: nn.Module, data: LocalData, *, task: str, n_classes: int,
                   batch_size: int = 64, av_map=None, adapt_bn: bool = False) -> dict:
    """Evaluate on ``data`` and return additive statistics.

    ``adapt_bn``: evaluate a copy of ``model`` with its batch-norm statistics re-estimated on
    ``data`` (:func:`adapt_batch_norm`; ``model`` itself is left unchanged).

    ``av_map``, if given, maps the model's arousal/valence outputs (N, 2) to the label scale
    before any statistic is computed (FaiReg: :meth:`shared_models.fairness.FaiRegParams.denormalise`).

    Returns
    -------
    dict
        - ``loss`` (float): the training loss of the task on all labelled rows: unweighted
          cross-entropy and/or ``1 - CCC`` of the whole set averaged over arousal and valence
          (NaN when there is no label for the task);
        - ``num_examples`` (int): rows with the task's labels;
        - ``cm`` ((C, C) int64): confusion over rows with emotion labels (rows true);
        - ``sums_arousal``, ``sums_valence`` ((6,) float64): :func:`~shared_models.metrics.ccc_sums`
          over rows with that label;
        - ``groups``: ``{attr: {value: {"cm", "sums_arousal", "sums_valence", "n"}}}`` with ``n``
          the rows of that value; the per-value statistics add up to the overall ones.

    Raises
    ------
    ValueError
        For an unknown task.
    """
    _check_task(task)
    if adapt_bn:
        model = adapt_batch_norm(model, data)
    probs, av_pred = predict(model, data, batch_size=batch_size)
    if av_map is not None and len(av_pred):
        av_pred = np.asarray(av_map(av_pred), dtype=np.float32).reshape(-1, 2)
    if probs.shape[1] == 0:
        probs = np.zeros((0, n_classes), np.float32)
    pred = probs.argmax(axis=1)
    y, av = data.emotion, data.av
    result = {**_stats(y, pred, av, av_pred, n_classes),
              "num_examples": int(data.labelled(task).sum())}
    parts = []
    if task in ("emotion", "both") and (known := y >= 0).any():
        parts.append(float(-np.log(np.clip(probs[known, y[known]], 1e-12, None)).mean()))
    if task in ("av", "both"):
        dims = [1 - c for key in ("sums_arousal", "sums_valence")
                if np.isfinite(c := ccc_from_sums(result[key]))]
        if dims:
            parts.append(float(np.mean(dims)))
    result["loss"] = float(sum(parts)) if parts else float("nan")
    result["groups"] = {
        attr: {str(v): {**_stats(y[m], pred[m], av[m], av_pred[m], n_classes), "n": int(m.sum())}
               for v in np.unique(values) for m in [values == v]}
        for attr, values in data.groups.items()
    }
    return result
