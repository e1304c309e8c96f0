"""Local training and evaluation loops on toy data."""

import numpy as np
import pytest
import torch

from shared_models.metrics import ccc_from_sums
from shared_models.models import build_model
from shared_models.training import LocalData, adapt_batch_norm, compute_device, evaluate_local, predict, train_local


def blobs(n=120, seed=0, unknown=0):
    """Two Gaussian blobs in 88-d; arousal/valence a noisy function of the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.standard_normal((n, 88)).astype(np.float32) + 1.5 * (2 * y[:, None] - 1) * (np.arange(88) < 8)
    av = np.stack([0.8 * (2 * y - 1), 0.5 - y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    y = y.astype(np.int64)
    y[:unknown] = -1
    av[:unknown] = np.nan
    gender = np.where(rng.random(n) < 0.5, "female", "male")
    return LocalData(list(x), y, av.astype(np.float32), {"gender": gender})


def train(data, task="emotion", seed=0, **kw):
    torch.manual_seed(123)
    model = build_model("egemaps-mlp", 2)
    stats = train_local(model, data, task=task, epochs=kw.pop("epochs", 3), lr=3e-3,
                        batch_size=16, seed=seed, **kw)
    return model, stats


def test_learns_separable_blobs():
    data = blobs()
    model, stats = train(data)
    assert stats["num_examples"] == 120 and stats["steps"] == 3 * 8
    assert np.isfinite(stats["train_loss"])
    probs, av = predict(model, data)
    assert probs.shape == (120, 2) and av.shape == (120, 2)
    assert (probs.argmax(1) == data.emotion).mean() > 0.9


def test_unlabelled_rows_are_ignored():
    data = blobs(unknown=40)
    _, stats = train(data)
    assert stats["num_examples"] == 80
    assert len(data.subset([])) == 0 and len(data.subset(data.emotion >= 0)) == 80
    _, stats = train(data.subset(np.arange(40)))
    assert np.isnan(stats.pop("train_loss")) and stats == {"num_examples": 0, "steps": 0}


def test_av_task_lowers_ccc_loss():
    data = blobs()
    torch.manual_seed(123)
    model = build_model("egemaps-mlp", 2)
    before = evaluate_local(model, data, task="av", n_classes=2)["loss"]
    train_local(model, data, task="av", epochs=3, lr=3e-3, batch_size=16, seed=0)
    after = evaluate_local(model, data, task="av", n_classes=2)
    assert after["loss"] < before - 0.2
    assert after["loss"] == pytest.approx(
        1 - (ccc_from_sums(after["sums_arousal"]) + ccc_from_sums(after["sums_valence"])) / 2)


def test_fedprox_keeps_the_local_model_near_the_global_one():
    """The proximal term mu/2 ||w - w_global||^2 (Li et al., MLSys 2020) pulls local training
    back towards the weights it started from; mu = 0 is plain local training."""
    torch.manual_seed(123)
    start = [p.detach().clone() for p in build_model("egemaps-mlp", 2).parameters()]

    def drift(mu: float) -> float:
        model, stats = train(blobs(unknown=10), task="both", proximal_mu=mu, epochs=2)
        assert stats["num_examples"] == 110 and np.isfinite(stats["train_loss"])
        return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)).sqrt())

    assert drift(10.0) < 0.5 * drift(0.0)


def test_evaluate_groups_add_up():
    data = blobs(unknown=20)
    model, _ = train(data, epochs=1)
    res = evaluate_local(model, data, task="emotion", n_classes=2)
    assert res["num_examples"] == 100 and res["cm"].sum() == 100 and res["cm"].dtype == np.int64
    groups = res["groups"]["gender"]
    assert set(groups) == {"female", "male"}
    assert sum(g["n"] for g in groups.values()) == 120
    np.testing.assert_array_equal(sum(g["cm"] for g in groups.values()), res["cm"])
    for key in ("sums_arousal", "sums_valence"):
        np.testing.assert_allclose(sum(g[key] for g in groups.values()), res[key])
        assert res[key][0] == 100
    assert np.isfinite(res["loss"])


def test_deterministic_for_a_seed():
    data = blobs()
    (a, sa), (b, sb), (c, _) = train(data, seed=1), train(data, seed=1), train(data, seed=2)
    assert sa == sb
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("name,shape", [("logmel-crnn", (64,)), ("wave-cnn-gru", ())])
def test_sequence_models_train_and_evaluate(name, shape):
    rng = np.random.default_rng(0)
    lengths = [40, 80, 60, 30] if shape else [3200, 8000, 6400, 4800]
    data = LocalData([rng.standard_normal((n, *shape)).astype(np.float32) for n in lengths],
                     np.array([0, 1, 2, -1]), np.full((4, 2), 0.1, np.float32), {})
    model = build_model(name, 3)
    stats = train_local(model, data, task="emotion", epochs=1, lr=1e-3, batch_size=2, seed=0)
    assert stats["num_examples"] == 3 and stats["steps"] == 2
    res = evaluate_local(model, data, task="both", n_classes=3)
    assert res["cm"].shape == (3, 3) and res["groups"] == {} and res["num_examples"] == 4


def test_unknown_task():
    with pytest.raises(ValueError, match="emotion, av, both"):
        train(blobs(), task="valence")


def _clips(lengths, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = [scale * rng.standard_normal((n, 64)).astype(np.float32) + 0.5 for n in lengths]
    return LocalData(x, np.array([0, 1, 2, 0, 1]), np.full((5, 2), 0.1, np.float32), {})


def test_adapt_batch_norm_takes_the_device_statistics_and_leaves_the_model():
    torch.manual_seed(0)
    model = build_model("logmel-crnn", 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _clips([40, 80, 60, 30, 50])
    adapted = adapt_batch_norm(model, data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert not adapted.training and adapted is not model
    # The first batch norm's running mean is the mean over clips of each clip's conv output mean.
    conv = model.convs[0]
    means = [conv[1](conv[0](torch.as_tensor(x).T.unsqueeze(0)))[0].mean(dim=1) for x in data.x]
    with torch.no_grad():
        expected = torch.stack(means).mean(dim=0)
    assert torch.allclose(adapted.convs[0][2].running_mean, expected, atol=1e-5)
    mlp = build_model("egemaps-mlp", 3)  # no batch norm: nothing to adapt
    assert adapt_batch_norm(mlp, blobs()) is mlp


def test_adapted_statistics_of_a_waveform_model_are_per_clip_not_per_chunk():
    """wave-cnn-gru computes long clips in time chunks in eval mode; AdaBN must see each
    clip whole (one batch a clip, as documented), or every chunk counts as a batch."""
    torch.manual_seed(0)
    model = build_model("wave-cnn-gru", 3).eval()
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(n) * np.linspace(0.2, 2.0, n)).astype(np.float32) for n in (64000, 40000, 20000)]
    data = LocalData(clips, np.zeros(3, np.int64), np.full((3, 2), np.nan))
    adapted = adapt_batch_norm(model, data)
    model.chunk_values = 0
    whole = adapt_batch_norm(model, data)
    for a, b in zip(adapted.convs, whole.convs):
        assert int(a[2].num_batches_tracked) == 3
        assert torch.allclose(a[2].running_var, b[2].running_var, rtol=1e-4)


def test_adapted_evaluation_does_not_see_a_per_channel_gain():
    """A device whose features come at 3x the gain: with AdaBN its predictions are the ones the
    model gives at the original gain (each batch norm absorbs the scale); without, they are not."""
    torch.manual_seed(0)
    model = build_model("logmel-crnn", 3)
    train_local(model, _clips([40, 80, 60, 30, 50], seed=1), task="emotion", epochs=2, lr=3e-3, batch_size=2, seed=0)
    model.eval()
    plain, loud = _clips([40, 80, 60, 30, 50]), _clips([40, 80, 60, 30, 50])
    loud.x = [3 * x for x in plain.x]
    p_plain = predict(adapt_batch_norm(model, plain), plain)[0]
    p_loud = predict(adapt_batch_norm(model, loud), loud)[0]
    np.testing.assert_allclose(p_loud, p_plain, atol=1e-4)
    assert np.abs(predict(model, loud)[0] - predict(model, plain)[0]).max() > 1e-2
    res = evaluate_local(model, loud, task="emotion", n_classes=3, adapt_bn=True)
    assert np.array_equal(res["cm"], evaluate_local(model, plain, task="emotion", n_classes=3, adapt_bn=True)["cm"])


def test_compute_device_names():
    assert compute_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert compute_device("cuda").type == compute_device("auto").type == "cuda"
    else:
        assert compute_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device.*'cpu' or 'auto'"):
            compute_device("cuda")
    with pytest.raises(ValueError, match="cpu, cuda, auto"):
        compute_device("tpu")
