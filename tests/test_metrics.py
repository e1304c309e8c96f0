"""Metrics against hand-computed values and scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from shared_models.metrics import (
    ccc,
    ccc_from_sums,
    ccc_loss,
    ccc_sums,
    classification_metrics,
    confusion,
    macro_f1,
    uar,
    wa,
)


def test_hand_computed_example():
    # true: 0 0 0 1 1 2 ; pred: 0 0 1 1 2 2 ; class 3 never occurs.
    cm = confusion([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    assert cm[:3, :3].tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # recalls 2/3, 1/2, 1/1 -> UAR = (2/3 + 1/2 + 1) / 3 = 13/18
    assert uar(cm) == pytest.approx(13 / 18)
    assert wa(cm) == pytest.approx(4 / 6)
    # F1: class0 2*2/(2*2+0+1)=4/5, class1 2/(2+1+1)=1/2, class2 2/(2+1+0)=2/3 -> mean 59/90
    assert macro_f1(cm) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert classification_metrics(cm) == {"uar": uar(cm), "wa": wa(cm), "macro_f1": macro_f1(cm)}
    assert np.isnan(uar(np.zeros((3, 3)))) and np.isnan(wa(np.zeros((3, 3))))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(5))
def test_equal_to_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 5, 60), rng.integers(0, 6, 60)  # class 5 only predicted
    y[y == 4] = 3  # class 4 never true
    cm = confusion(y, p, 7)
    assert uar(cm) == pytest.approx(balanced_accuracy_score(y, p))
    assert wa(cm) == pytest.approx(accuracy_score(y, p))
    assert macro_f1(cm) == pytest.approx(f1_score(y, p, average="macro"))


def test_ccc_hand_example():
    # x = [1, 2, 3], y = [2, 4, 6]: means 2 and 4; var x = 2/3, var y = 8/3, cov = 4/3 (population)
    # CCC = 2 * 4/3 / (2/3 + 8/3 + (2 - 4)^2) = (8/3) / (22/3) = 4/11
    assert ccc([1, 2, 3], [2, 4, 6]) == pytest.approx(4 / 11)
    assert ccc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert ccc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(ccc([1.0], [1.0])) and np.isnan(ccc_from_sums(np.zeros(6)))


def test_ccc_sums_add_across_parts():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=100), rng.normal(size=100) * 0.5 + 0.3
    y[::7] = np.nan  # unknown labels are ignored
    parts = [ccc_sums(x[a:b], y[a:b]) for a, b in [(0, 10), (10, 55), (55, 100)]]
    assert parts[0].shape == (6,) and parts[0].dtype == np.float64
    keep = np.isfinite(y)
    assert ccc_from_sums(sum(parts)) == pytest.approx(ccc(x[keep], y[keep]))
    assert sum(parts)[0] == keep.sum()


def test_ccc_loss():
    rng = np.random.default_rng(0)
    t = torch.tensor(rng.normal(size=16), dtype=torch.float32)
    assert ccc_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor(rng.normal(size=16), dtype=torch.float32, requires_grad=True)
    loss = ccc_loss(p, t)
    loss.backward()
    assert torch.isfinite(p.grad).all()
    assert loss.item() == pytest.approx(1 - ccc(p.detach().numpy(), t.numpy()), abs=1e-5)
    c = torch.zeros(4, requires_grad=True)
    ccc_loss(c, torch.zeros(4)).backward()  # constant inputs: finite loss and gradient
    assert torch.isfinite(c.grad).all()
