"""Audio input: resampling to 16 kHz mono, bad-clip detection, skip counting."""

import numpy as np
import pytest
import soundfile as sf

from shared_models.audio import SAMPLE_RATE, ClipError, SkipCounter, SkippedClipsWarning, load_audio, probe_duration


def tone(seconds, sr, f=220.0, amp=0.3, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def test_resamples_stereo_44k_to_16k_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, tone(0.5, 44_100, channels=2), 44_100)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert wav.shape[0] == pytest.approx(0.5 * SAMPLE_RATE, abs=1)
    # mono is the mean of the channels: amplitude 0.75 * 0.3
    assert np.abs(wav).max() == pytest.approx(0.225, rel=0.05)
    assert probe_duration(path) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("fmt,sr", [("flac", 16_000), ("ogg", 48_000)])
def test_other_formats(tmp_path, fmt, sr):
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, tone(0.6, sr), sr)
    assert load_audio(path).shape[0] == pytest.approx(0.6 * SAMPLE_RATE, abs=2)


@pytest.mark.parametrize(
    "reason,write",
    [
        ("silent", lambda p: sf.write(p, np.zeros(16_000, np.float32), 16_000)),
        ("empty", lambda p: sf.write(p, np.zeros(0, np.float32), 16_000)),
        ("too-short", lambda p: sf.write(p, tone(0.1, 16_000), 16_000)),
        ("unreadable", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000))),
    ],
)
def test_bad_clips_raise_with_reason(tmp_path, reason, write):
    path = tmp_path / f"{reason}.wav"
    write(path)
    with pytest.raises(ClipError) as info:
        load_audio(path)
    assert info.value.reason == reason and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ClipError, match="unreadable"):
        probe_duration(tmp_path / "nope.wav")


def test_skip_counter_counts_and_warns_once():
    skipped = SkipCounter()
    skipped.add("a.wav", "silent")
    skipped.add("b.wav", "silent")
    other = SkipCounter()
    other.add("c.wav", "unreadable")
    skipped.update(other)
    assert skipped.total == 3
    assert skipped.as_dict() == {"silent": 2, "unreadable": 1}
    assert skipped.examples["silent"] == ["a.wav", "b.wav"]
    with pytest.warns(SkippedClipsWarning) as record:
        msg = skipped.warn("clips", of=120)
    assert len(record) == 1
    assert msg == "skipped 3 of 120 clips (2 silent, 1 unreadable), e.g. a.wav"
    assert SkipCounter().warn() is None


def dominant_hz(wav, sr):
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    return np.fft.rfftfreq(wav.size, 1 / sr)[spectrum.argmax()]


def amplitude_at(wav, sr, f):
    """Least-squares amplitude of a sinusoid of ``f`` Hz in ``wav``."""
    t = np.arange(wav.size) / sr
    basis = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, wav.astype(np.float64), rcond=None)
    return float(np.hypot(*coef))


@pytest.mark.parametrize("f", [1000.0, 7000.0])
def test_tess_rate_24414_hz_is_resampled_to_16k_keeping_frequency_and_amplitude(tmp_path, f):
    # TESS's rate: 16000/24414 = 8000/12207, a ratio torchaudio's polyphase filter handles slowly
    # and, near 8 kHz, with 19 % amplitude loss; this one must keep both frequency and level
    path = tmp_path / "tess.wav"
    sf.write(path, tone(1.2, 24_414, f=f), 24_414, subtype="FLOAT")
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert wav.shape[0] == pytest.approx(1.2 * SAMPLE_RATE, abs=1)
    inner = wav[1600:-1600]  # away from the filter's edges
    assert dominant_hz(inner, SAMPLE_RATE) == pytest.approx(f, abs=2)
    assert amplitude_at(inner, SAMPLE_RATE, f) == pytest.approx(0.3, rel=0.01)


def test_common_rates_keep_torchaudio_resampling_and_odd_rates_do_not_use_it(monkeypatch):
    import torch
    import torchaudio.functional as AF

    from shared_models.audio import resample

    x = tone(0.5, 44_100)
    expected = AF.resample(torch.from_numpy(x), 44_100, SAMPLE_RATE).numpy()
    assert np.array_equal(resample(x, 44_100, SAMPLE_RATE), expected)  # features at 44.1 kHz unchanged
    calls = []
    monkeypatch.setattr(AF, "resample", lambda *a, **k: calls.append(a[1:]) or torch.zeros(1))
    for sr in (8_000, 22_050, 48_000):
        resample(tone(0.5, sr), sr, SAMPLE_RATE)
    out = resample(tone(0.5, 24_414), 24_414, SAMPLE_RATE)
    assert calls == [(8_000, SAMPLE_RATE), (22_050, SAMPLE_RATE), (48_000, SAMPLE_RATE)]
    assert out.shape == (8_000,) and out.dtype == np.float32
    x = tone(0.5, SAMPLE_RATE)
    assert resample(x, SAMPLE_RATE, SAMPLE_RATE) is x
    with pytest.raises(ValueError, match="mono"):
        resample(tone(0.5, 24_414, channels=2), 24_414, SAMPLE_RATE)
    with pytest.raises(ValueError, match="> 0"):
        resample(x, 0, SAMPLE_RATE)


def test_skip_counter_lists_every_skipped_clip_in_a_csv(tmp_path):
    import csv

    skipped = SkipCounter()
    for i in range(5):  # more than the examples kept for the message
        skipped.add(f"clip{i}.wav", "silent", f"RMS 1e-0{i + 5}")
    other = SkipCounter()
    other.add("gone.wav", "missing", "no such file")
    skipped.update(other)
    path = skipped.write_csv(tmp_path / "sub" / "m.skipped.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["reason"]) for r in rows] == [(f"clip{i}.wav", "silent") for i in range(5)] + [
        ("gone.wav", "missing")]
    assert rows[0]["detail"] == "RMS 1e-05" and rows[-1]["detail"] == "no such file"
    assert skipped.summary() == "5 silent, 1 missing"
    assert skipped.message("clips", of=9, listed_in=path).endswith(f"; all listed in {path}")


def test_clip_error_keeps_its_detail(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, tone(0.1, 16_000), 16_000)
    with pytest.raises(ClipError) as info:
        load_audio(path)
    assert info.value.reason == "too-short" and info.value.detail.startswith("0.100 s")
