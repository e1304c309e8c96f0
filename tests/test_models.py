"""Model registry: output shapes, padding invariance, heads' ranges, parameter counts, weights."""

import numpy as np
import pytest
import torch

from shared_models.features import collate
from shared_models.models import (
    MODELS,
    build_model,
    count_parameters,
    frontend_for,
)

# Per model: lengths of three clips (frames or samples) and the feature shape after length.
INPUTS = {
    "egemaps-mlp": ([88, 88, 88], ()),
    "logmel-crnn": ([37, 101, 64], (64,)),
    "wave-cnn-gru": ([5000, 16000, 9001], ()),
}
PARAMS = {"egemaps-mlp": (40_000, 70_000), "logmel-crnn": (50_000, 120_000),
          "wave-cnn-gru": (200_000, 500_000)}


def clips(name, seed=0):
    rng = np.random.default_rng(seed)
    lengths, rest = INPUTS[name]
    return [rng.standard_normal((n, *rest)).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("name", MODELS)
def test_shapes_ranges_and_padding(name):
    torch.manual_seed(0)
    model = build_model(name, n_classes=5).eval()
    feats = clips(name)
    with torch.no_grad():
        out = model(*collate(feats))
        assert out["emotion"].shape == (3, 5) and out["av"].shape == (3, 2)
        assert out["av"].abs().max() <= 1 and torch.isfinite(out["emotion"]).all()
        for i, f in enumerate(feats):  # each clip alone (no padding) gives the same output
            alone = model(*collate([f]))
            torch.testing.assert_close(alone["emotion"][0], out["emotion"][i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone["av"][0], out["av"][i], atol=1e-5, rtol=1e-4)
        if MODELS[name].frontend != "egemaps":  # garbage in the padding changes nothing
            x, lengths = collate(feats)
            noisy = x + 100 * (torch.arange(x.shape[1])[None, :] >= lengths[:, None]).reshape(
                *x.shape[:2], *([1] * (x.dim() - 2))).float()
            torch.testing.assert_close(model(noisy, lengths)["av"], out["av"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts(name):
    n = count_parameters(build_model(name, 4))
    print(f"{name}: {n} parameters")
    lo, hi = PARAMS[name]
    assert lo <= n <= hi


def test_frontends_match_models():
    assert {n: frontend_for(n).name for n in MODELS} == {
        "egemaps-mlp": "egemaps", "logmel-crnn": "logmel", "wave-cnn-gru": "wave"}


def test_short_input_and_backward():
    model = build_model("wave-cnn-gru", 3)
    x, lengths = collate([np.random.randn(300).astype(np.float32), np.random.randn(700).astype(np.float32)])
    out = model(x, lengths)
    (out["emotion"].sum() + out["av"].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="egemaps-mlp, logmel-crnn, wave-cnn-gru"):
        build_model("resnet", 4)


# --------------------------------------------------------------------------- wire format


def test_a_model_travels_as_one_flat_array_without_integer_buffers():
    from flwr.app import ArrayRecord

    from shared_models.models import PACKED_KEY, load_record, to_record

    torch.manual_seed(0)
    sent = build_model("logmel-crnn", 6)
    counters_sent = [v for v in sent.state_dict().values() if not v.is_floating_point()]
    assert counters_sent  # BatchNorm's num_batches_tracked
    for v in counters_sent:
        v.fill_(7)
    record = to_record(sent)
    assert list(record.keys()) == [PACKED_KEY]
    floats = [v for v in sent.state_dict().values() if v.is_floating_point()]
    assert record[PACKED_KEY].numpy().shape == (sum(v.numel() for v in floats),)

    torch.manual_seed(1)
    received = build_model("logmel-crnn", 6)
    counters = {k: v.clone() for k, v in received.state_dict().items() if not v.is_floating_point()}
    load_record(received, record)
    for key, value in received.state_dict().items():
        expected = sent.state_dict()[key] if value.is_floating_point() else counters[key]
        assert torch.equal(value, expected), key  # floats arrive exactly, counters stay local

    # a per-tensor record (older tools) still loads
    other = build_model("logmel-crnn", 6)
    load_record(other, ArrayRecord(sent.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sent.state_dict().values()))


def test_averaging_packed_records_averages_every_tensor():
    from flwr.app import Array, ArrayRecord

    from shared_models.models import PACKED_KEY, load_record, to_record

    torch.manual_seed(0)
    a, b = build_model("egemaps-mlp", 4), build_model("egemaps-mlp", 4)
    mean = (to_record(a)[PACKED_KEY].numpy() + to_record(b)[PACKED_KEY].numpy()) / 2
    out = build_model("egemaps-mlp", 4)
    load_record(out, ArrayRecord({PACKED_KEY: Array(mean)}))
    for key, value in out.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (a.state_dict()[key] + b.state_dict()[key]) / 2), key


def test_a_record_of_another_model_is_refused_with_both_sizes():
    from shared_models.models import load_record, to_record

    with pytest.raises(ValueError, match="classes"):
        load_record(build_model("egemaps-mlp", 4), to_record(build_model("egemaps-mlp", 6)))


@pytest.mark.parametrize("name", MODELS)
def test_inference_copy_folds_batch_norm_and_gives_the_same_outputs(name):
    from shared_models.models import for_inference

    torch.manual_seed(0)
    model = build_model(name, n_classes=5).eval()
    for m in model.modules():  # statistics other than the initial 0/1, so that folding matters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    fast = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == (name != "egemaps-mlp")
    assert not any(p.requires_grad for p in fast.parameters()) and model.training is False
    with torch.no_grad():
        batch = collate(clips(name))
        ref, out = model(*batch), fast(*batch)
    for head in ("emotion", "av"):
        torch.testing.assert_close(out[head], ref[head], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["logmel-crnn", "wave-cnn-gru"])
@pytest.mark.parametrize("chunk_values", [1, 5000, 1 << 18])
def test_eval_mode_conv_blocks_in_time_chunks_give_the_same_values_as_one_pass(name, chunk_values, monkeypatch):
    import shared_models.models as models

    monkeypatch.setattr(models, "MIN_CHUNK", 16)  # many chunks, also for the short log-Mel input
    torch.manual_seed(1)
    model = build_model(name, n_classes=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    # lengths that are not multiples of a pool or a chunk, one clip shorter than all the pools
    steps = 40_003 if name == "wave-cnn-gru" else 403
    x = torch.randn(3, steps) if name == "wave-cnn-gru" else torch.randn(3, steps, 64)
    lengths = torch.tensor([steps, steps // 3 + 7, 5])
    with torch.no_grad():
        model.chunk_values = 0
        ref = model(x, lengths)
        model.chunk_values = chunk_values
        out = model(x, lengths)
        single = model(x[:1])  # unpadded path
        model.chunk_values = 0
        single_ref = model(x[:1])
    for head in ("emotion", "av"):  # the same sums, up to the convolution kernels' float rounding
        torch.testing.assert_close(out[head], ref[head], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single[head], single_ref[head], atol=1e-6, rtol=1e-5)
