"""``fedaffect predict``: a checkpoint's model on a device's clips (client/inference.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from typer.testing import CliRunner

from client.inference import MIN_REFERENCE_CLIPS, predict_clips, reference_clips
from fedaffect.cli import app as cli


@pytest.fixture(scope="module")
def pretrained(tone_manifest, tmp_path_factory):
    """An egemaps-mlp checkpoint trained on the tone corpus (anger vs sadness), and its cache."""
    root = tmp_path_factory.mktemp("predict")
    ckpt, cache = root / "pre.pt", root / "cache"
    res = CliRunner().invoke(cli, ["pretrain", "--manifest", str(tone_manifest), "--model", "egemaps-mlp",
                                   "--out", str(ckpt), "--epochs", "20", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    return ckpt, cache


def test_predictions_follow_the_training_labels_and_skip_bad_clips(pretrained, tone_manifest, tmp_path):
    ckpt, cache = pretrained
    table = pd.read_csv(tone_manifest)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    clips = [*table["path"], str(silent), str(tmp_path / "gone.wav")]
    preds = predict_clips(ckpt, clips, reference=reference_clips(manifest=tone_manifest), cache_dir=cache)

    assert [p.path for p in preds] == [str(c) for c in clips]
    assert preds[-2].skipped == "silent" and preds[-1].skipped == "missing" and preds[-1].emotion is None
    good = preds[:-2]
    for p in good:
        assert set(p.probabilities) == {"anger", "sadness"}
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert np.isnan(p.arousal) and np.isnan(p.valence)  # pretrained for emotion: that head is untrained
        assert p.top(1)[0][0] == p.emotion
    accuracy = np.mean([p.emotion == e for p, e in zip(good, table["emotion"])])
    assert accuracy >= 0.8  # the clips it was trained on, standardised as on the devices


def test_statistics_need_enough_clips(pretrained, tone_manifest):
    ckpt, cache = pretrained
    one = pd.read_csv(tone_manifest)["path"][:1].tolist()
    with pytest.raises(ValueError, match=f"at least {MIN_REFERENCE_CLIPS}.*--data-dir"):
        predict_clips(ckpt, one, cache_dir=cache)
    with pytest.raises(ValueError, match="not both"):
        reference_clips(data_dir="x", manifest="y")


def test_cli_prints_a_table_and_writes_json(pretrained, tone_manifest, tmp_path):
    ckpt, cache = pretrained
    data_dir = tmp_path / "device"
    data_dir.mkdir()
    pd.read_csv(tone_manifest).to_csv(data_dir / "manifest.csv", index=False)
    clip = pd.read_csv(tone_manifest)["path"][0]
    out = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["predict", str(ckpt), clip, "--data-dir", str(data_dir), "--cache-dir", str(cache),
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "arousal" in res.output and "anger" in res.output
    rows = json.loads(out.read_text())
    assert rows[0]["path"] == clip and rows[0]["emotion"] in ("anger", "sadness")
    assert rows[0]["arousal"] is None and "nan" not in res.output  # the untrained head stays silent

    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "none.pt"), clip])
    assert res.exit_code == 2 and "not found" in res.output


def test_a_faireg_runs_predictions_come_back_on_the_label_scale(tone_manifest, tmp_path):
    # A FaiReg run trains on normalised arousal/valence; its checkpoints keep the run's
    # parameters and predict maps the model's outputs back with them, as devices do.
    import torch

    from server.simulation import simulate
    from server.store import RunStore
    from shared_models.config import RunConfig
    from shared_models.fairness import FaiRegParams

    cfg = RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=1, task="both", faireg="on",
                    protected="gender", run_name="faireg", run_dir=str(tmp_path / "runs"),
                    cache_dir=str(tmp_path / "cache"))
    summary = simulate(cfg, all_folds=False, progress=False)
    store = RunStore(summary["config"]["store-url"])
    _, payload = store.latest_checkpoint(store.get_run("faireg").id)
    params = FaiRegParams.from_json(payload["faireg"])
    ckpt = next((tmp_path / "runs" / "faireg" / "checkpoints").glob("*1.pt"))
    raw_ckpt = tmp_path / "without-faireg.pt"
    torch.save({**payload, "faireg": ""}, raw_ckpt)

    clips = pd.read_csv(tone_manifest)["path"].tolist()
    mapped = predict_clips(ckpt, clips, cache_dir=tmp_path / "cache")
    raw = predict_clips(raw_ckpt, clips, cache_dir=tmp_path / "cache")
    raw_av = np.array([[p.arousal, p.valence] for p in raw])
    mapped_av = np.array([[p.arousal, p.valence] for p in mapped])
    np.testing.assert_allclose(mapped_av, params.denormalise(raw_av), atol=1e-6)
    assert not np.allclose(mapped_av, raw_av, atol=1e-3)  # the mapping is not the identity here


def test_batch_norm_statistics_come_from_the_reference_clips(tone_manifest, tmp_path):
    # A run with bn-adapt (the default) evaluated its model with batch-norm statistics
    # re-estimated on each device's clips; predict does the same with the reference clips.
    import torch

    from shared_models.features import Standardiser, extract_features
    from shared_models.models import build_model, frontend_for
    from shared_models.training import LocalData, adapt_batch_norm, predict

    torch.manual_seed(0)
    model = build_model("logmel-crnn", 2)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.fill_(3.0)  # statistics that fit no device
    payload = {"model": "logmel-crnn", "emotions": ["anger", "sadness"], "state_dict": model.state_dict()}
    for flag in (0, 1):
        torch.save({**payload, "config": {"bn-adapt": flag}}, tmp_path / f"adapt{flag}.pt")
    clips = pd.read_csv(tone_manifest)["path"].tolist()
    cache = tmp_path / "cache"
    adapted = predict_clips(tmp_path / "adapt1.pt", clips, cache_dir=cache)
    plain = predict_clips(tmp_path / "adapt0.pt", clips, cache_dir=cache)

    feats = extract_features(clips, frontend_for("logmel-crnn"), cache)[0]
    scaler = Standardiser.for_frontend(frontend_for("logmel-crnn")).fit(feats)
    data = LocalData([scaler.transform(f) for f in feats], np.full(len(feats), -1), np.zeros((len(feats), 2)), {})
    expected = predict(adapt_batch_norm(model, data), data)[0]
    got = np.array([[p.probabilities["anger"], p.probabilities["sadness"]] for p in adapted])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, [[p.probabilities["anger"], p.probabilities["sadness"]] for p in plain], atol=1e-3)
