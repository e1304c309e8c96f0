"""Feature front-ends, feature cache, per-device standardisation and batching."""


import numpy as np
import pytest
import soundfile as sf
import torch

from shared_models.audio import ClipError, SkippedClipsWarning, load_audio
from shared_models.features import (
    FeatureCache,
    LogMelFrontEnd,
    Standardiser,
    collate,
    extract_features,
    get_frontend,
)

SR = 16_000


def vowel(seconds=1.0, f0=140.0, seed=0):
    """A vowel-like signal: harmonics of f0 with a formant-ish envelope, vibrato and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / SR
    amps = [1.0 / k * (2.0 if 4 <= k <= 6 else 1.0) for k in range(1, 16)]
    x = sum(a * np.sin(k * phase) for k, a in enumerate(amps, 1))
    x = x * np.hanning(t.size) ** 0.3 + 0.01 * rng.standard_normal(t.size)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "vowel.wav"
    sf.write(path, vowel(), SR)
    return path


def test_egemaps_gives_88_finite_values(clip):
    f = get_frontend("egemaps")(load_audio(clip))
    assert f.shape == (88,) and f.dtype == np.float32
    assert np.isfinite(f).all() and np.abs(f).sum() > 0
    # the first functional is the mean F0 in semitones above 27.5 Hz: the vowel's 140 Hz
    assert f[0] == pytest.approx(12 * np.log2(140 / 27.5), abs=0.5)


def test_logmel_shape_and_crop():
    fe = get_frontend("logmel")
    f = fe(vowel(1.0))
    assert f.shape == (1 + SR // 160, 64) and f.dtype == np.float32 and np.isfinite(f).all()
    assert fe(vowel(8.0)).shape == (1 + 6 * SR // 160, 64)  # centre crop to 6 s


def test_wave_crop_keeps_amplitude():
    w = vowel(5.0)
    out = get_frontend("wave")(w)
    assert out.shape == (4 * SR,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, w[SR // 2 : SR // 2 + 4 * SR])


def test_unknown_frontend_lists_names():
    with pytest.raises(ValueError, match="egemaps, logmel, wave"):
        get_frontend("mfcc")


def test_cache_hit_and_key_changes(clip, tmp_path):
    cache, fe = FeatureCache(tmp_path / "cache"), LogMelFrontEnd()
    first = cache.load_or_compute(clip, fe)
    stored = cache.path_for(clip, fe)
    assert stored.exists() and stored.parent.name == fe.key
    stamp = stored.stat().st_mtime_ns
    second = cache.load_or_compute(clip, fe)
    np.testing.assert_array_equal(first, second)
    assert stored.stat().st_mtime_ns == stamp  # read, not recomputed
    assert len(list((tmp_path / "cache").rglob("*"))) == 2  # one folder, one file, no tmp left
    other = LogMelFrontEnd(n_mels=40)
    assert other.key != fe.key and cache.path_for(clip, other) != stored
    assert LogMelFrontEnd().key == fe.key  # stable


def test_corrupt_clip_raises_and_is_skipped(clip, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(ClipError) as err:
        FeatureCache(tmp_path / "c").load_or_compute(bad, get_frontend("wave"))
    assert err.value.reason == "unreadable"
    with pytest.warns(SkippedClipsWarning):
        feats, skipped = extract_features([clip, bad, tmp_path / "missing.wav"], get_frontend("wave"),
                                          tmp_path / "c", progress=False)
    assert feats[0].shape == (SR,) and feats[1] is None and feats[2] is None
    assert skipped.total == 2 and skipped.as_dict() == {"unreadable": 1, "missing": 1}


def test_a_cache_that_cannot_be_written_costs_no_clip(clip, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        feats, skipped = extract_features([clip, clip], get_frontend("wave"), blocked / "cache", progress=False)
    assert [f.shape for f in feats] == [(SR,), (SR,)] and skipped.total == 0


def test_standardiser_round_trip():
    rng = np.random.default_rng(0)
    seqs = [rng.normal(3.0, 2.0, size=(n, 5)).astype(np.float32) for n in (10, 20, 30)]
    st = Standardiser().fit(seqs)
    z = np.concatenate([st.transform(s) for s in seqs])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)
    copy = Standardiser()
    copy.load_state_dict(st.state_dict())
    np.testing.assert_array_equal(copy.transform(seqs[0]), st.transform(seqs[0]))
    waves = [rng.normal(0.5, 0.1, size=n) for n in (100, 300)]
    ws = Standardiser.for_frontend(get_frontend("wave")).fit(waves)
    assert ws.scalar and ws.mean.shape == () and ws.transform(waves[0]).shape == (100,)
    const = Standardiser().fit([np.ones((4, 3))])
    assert np.isfinite(const.transform(np.ones((2, 3)))).all()  # std floor
    with pytest.raises(RuntimeError):
        Standardiser().transform(seqs[0])


def test_collate_pads_and_counts():
    x, lengths = collate([np.ones((3, 4)), np.ones((5, 4))])
    assert x.shape == (2, 5, 4) and lengths.tolist() == [3, 5] and lengths.dtype == torch.int64
    assert x[0, 3:].abs().sum() == 0 and x[0, :3].sum() == 12
    x, lengths = collate([np.ones(7), np.ones(4)])
    assert x.shape == (2, 7) and lengths.tolist() == [7, 4] and x[1, 4:].sum() == 0
    x, lengths = collate([np.zeros(88), np.zeros(88)])
    assert x.shape == (2, 88) and x.dtype == torch.float32


def test_parallel_extraction_equals_serial_and_counts_missing_files(tmp_path, monkeypatch):
    import shared_models.features as features

    paths = []
    for i in range(6):
        p = tmp_path / f"v{i}.wav"
        sf.write(p, vowel(0.6, f0=120 + 20 * i, seed=i), 16000)
        paths.append(str(p))
    paths.append(str(tmp_path / "gone.wav"))  # listed in a manifest, deleted since
    monkeypatch.setattr(features, "PARALLEL_MIN_CLIPS", 2)
    frontend = LogMelFrontEnd()
    parallel, skipped = extract_features(paths, frontend, tmp_path / "cache_p", progress=False, workers=2)
    serial, _ = extract_features(paths, frontend, tmp_path / "cache_s", progress=False, workers=1)
    assert skipped.as_dict() == {"missing": 1} and parallel[-1] is None
    for a, b in zip(parallel[:-1], serial[:-1]):
        np.testing.assert_array_equal(a, b)
