"""Shared fixtures: small real corpora written to disk once per test session."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def write_tone_corpus(root, speakers=(("s1", "male"), ("s2", "female"), ("s3", "male"), ("s4", "female")),
                      emotions=("anger", "sadness"), clips=3, seconds=1.0, seed=0):
    """Write a tiny corpus of harmonic tones: pitch and loudness depend on the emotion.

    Returns the manifest as a DataFrame (paths absolute). Real wav files, 16 kHz.
    """
    rng = np.random.default_rng(seed)
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for s_i, (speaker, gender) in enumerate(speakers):
        base = 120.0 if gender == "male" else 210.0
        for e_i, emotion in enumerate(emotions):
            for c in range(clips):
                t = np.arange(int(16000 * seconds)) / 16000
                f0 = base * (1.0 + 0.5 * e_i) * (1 + 0.03 * rng.standard_normal())
                wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
                wave = (0.1 + 0.3 * e_i) * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(t.size)
                path = root / f"{speaker}_{emotion}_{c}.wav"
                sf.write(path, wave.astype(np.float32), 16000)
                arousal = 0.8 if emotion == "anger" else -0.6
                rows.append(dict(path=str(path), speaker=speaker, gender=gender, emotion=emotion,
                                 arousal=arousal, valence=-0.6, duration=seconds))
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tone_manifest(tmp_path_factory):
    """Path of a 24-clip tone corpus manifest (4 speakers, 2 genders, 2 emotions)."""
    root = tmp_path_factory.mktemp("tones")
    df = write_tone_corpus(root / "audio")
    path = root / "tones.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory):
    """Path of a small espeak-ng synth corpus manifest (4 speakers, 6 emotions)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make setup installs it as root)")
    from client.corpora import synth_prepare

    root = tmp_path_factory.mktemp("synth")
    result = synth_prepare(root / "audio", root / "synth.csv", n_speakers=4, clips_per_emotion=6, seed=0)
    return result.manifest


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a real PostgreSQL database (tests/pg.py): $FEDAFFECT_TEST_POSTGRES_URL,
    or a private throwaway cluster started for the session (PostgreSQL installed with apt as root
    when missing). Skips when PostgreSQL can be neither found nor installed."""
    from tests.pg import PostgresUnavailable
    from tests.pg import postgres_url as _postgres_url

    database = _postgres_url()
    try:
        url = next(database)
    except PostgresUnavailable as err:
        pytest.skip(str(err))
    yield url
    database.close()  # stops the private cluster and removes its folder
