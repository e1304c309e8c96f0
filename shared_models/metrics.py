"""Affect metrics: UAR, WA, macro-F1 from confusion matrices, and CCC from sufficient statistics.

Everything a device reports is additive: a confusion matrix (counts) for categorical emotion and
six sums per affect dimension for the concordance correlation coefficient (CCC). The coordinator
adds the devices' statistics and computes the metrics of the pooled predictions exactly, without
seeing a single prediction.

- UAR (unweighted average recall, macro recall over the classes that occur) is the standard
  speech-emotion metric; WA (weighted accuracy) is plain accuracy.
- CCC is Lin's concordance correlation coefficient (Lin, "A concordance correlation coefficient
  to evaluate reproducibility", Biometrics 45(1), 1989) with population moments,
  ``2 cov(x, y) / (var x + var y + (mean x - mean y) ** 2)``; ``1 - CCC`` is the loss of the
  arousal/valence head (Trigeorgis et al., ICASSP 2016).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "confusion",
    "uar",
    "wa",
    "macro_f1",
    "classification_metrics",
    "ccc",
    "ccc_sums",
    "ccc_from_sums",
    "ccc_loss",
]


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Confusion matrix of integer class labels.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (N,)
        True and predicted class indices in ``[0, n_classes)``.
    n_classes : int
        Number of classes ``C``.

    Returns
    -------
    np.ndarray, shape (C, C), int64
        ``cm[i, j]`` counts clips of true class ``i`` predicted as ``j`` (rows are true classes).
        All zeros when ``N == 0``.
    """
    # Imported here: scikit-learn takes ~1.5 s to import, paid by every deployed ClientApp
    # process (one per message in Flower's Deployment Engine).
    from sklearn.metrics import confusion_matrix

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


def _safe_mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def uar(cm: np.ndarray) -> float:
    """Unweighted average recall: mean per-class recall over classes with true samples.

    Classes absent from the ground truth (all-zero rows) are left out, as in scikit-learn's
    ``balanced_accuracy_score``. Returns NaN for an empty matrix.
    """
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    present = support > 0
    return _safe_mean(np.diag(cm)[present] / support[present])


def wa(cm: np.ndarray) -> float:
    """Weighted accuracy (plain accuracy): ``trace(cm) / sum(cm)``; NaN for an empty matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")


def macro_f1(cm: np.ndarray) -> float:
    """Macro-averaged F1 over classes that occur in the ground truth or in the predictions.

    Matches scikit-learn's ``f1_score(average="macro")`` with default labels. NaN when empty.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2 tp + fp + fn
    present = denom > 0
    return _safe_mean(2 * tp[present] / denom[present])


def classification_metrics(cm: np.ndarray) -> dict[str, float]:
    """``{"uar": ..., "wa": ..., "macro_f1": ...}`` of one confusion matrix (rows true)."""
    return {"uar": uar(cm), "wa": wa(cm), "macro_f1": macro_f1(cm)}


def ccc_sums(pred, target) -> np.ndarray:
    """Sufficient statistics of the CCC; they add across batches and devices.

    Parameters
    ----------
    pred, target : array-like of float, shape (N,)
        Predictions and gold values of one affect dimension. Pairs where either value is not
        finite (e.g. NaN for an unknown label) are left out.

    Returns
    -------
    np.ndarray, shape (6,), float64
        ``[n, sum p, sum t, sum p**2, sum t**2, sum p*t]``.
    """
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    keep = np.isfinite(p) & np.isfinite(t)
    p, t = p[keep], t[keep]
    return np.array([p.size, p.sum(), t.sum(), p @ p, t @ t, p @ t], dtype=np.float64)


def ccc_from_sums(s) -> float:
    """Lin's CCC (population moments) from the sums of :func:`ccc_sums`.

    Returns NaN when fewer than two pairs were seen or the denominator is zero (both constant
    and equal means).
    """
    n, sp, st, spp, stt, spt = np.asarray(s, dtype=np.float64)
    if n < 2:
        return float("nan")
    mp, mt = sp / n, st / n
    vp, vt = max(spp / n - mp * mp, 0.0), max(stt / n - mt * mt, 0.0)
    cov = spt / n - mp * mt
    denom = vp + vt + (mp - mt) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def ccc(x, y) -> float:
    """Lin's concordance correlation coefficient of two sequences of shape (N,) (population
    moments; Lin 1989). Non-finite pairs are ignored; NaN for fewer than two pairs."""
    return ccc_from_sums(ccc_sums(x, y))


def ccc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable ``1 - CCC`` of one batch.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (B,)
        Predictions and gold values of one dimension, ``B >= 2``.
    eps : float
        Added to the denominator so that constant inputs give a finite loss (1) and gradient.

    Returns
    -------
    torch.Tensor, scalar
        ``1 - CCC`` in ``[0, 2]``; 0 for identical non-constant inputs.
    """
    pred, target = pred.reshape(-1), target.reshape(-1).to(pred.dtype)
    mp, mt = pred.mean(), target.mean()
    dp, dt = pred - mp, target - mt
    cov = (dp * dt).mean()
    denom = dp.pow(2).mean() + dt.pow(2).mean() + (mp - mt).pow(2) + eps
    return 1 - 2 * cov / denom
