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
