"""Flower's Simulation Engine (Ray) through a private SuperLink: server.ray_engine.

The two end-to-end runs are marked ``slow`` (about 45 s each on 2 cores, most of it Ray's
start-up): a successful run, and a run whose devices cannot load their data, which must be
reported as failed although ``flwr run`` exits 0.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from server.ray_engine import GPU_PER_DEVICE, REPO_ROOT, absolute_paths, federation_config, run_ray
from server.superlink import descendants as _children, stage_app as _stage_app
from server.simulation import prepare_run, simulate
from server.store import RunStore
from shared_models.config import RunConfig


def write_tones(root: Path, seed: int = 0) -> Path:
    """24 one-second 16 kHz clips: 4 speakers (2 male, 2 female) x 2 emotions x 3 clips.

    Harmonic tones whose pitch and loudness depend on the emotion, plus noise.
    Returns the manifest path.
    """
    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True)
    t = np.arange(16000) / 16000
    rows = []
    for speaker, gender in (("m1", "male"), ("f1", "female"), ("m2", "male"), ("f2", "female")):
        base = 110.0 if gender == "male" else 200.0
        for e_i, emotion in enumerate(("anger", "sadness")):
            for clip in range(3):
                f0 = base * (1.6 if emotion == "anger" else 0.9) * (1 + 0.03 * rng.standard_normal())
                wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
                wave = (0.5 - 0.35 * e_i) * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(t.size)
                path = audio / f"{speaker}_{emotion}_{clip}.wav"
                sf.write(path, wave.astype(np.float32), 16000)
                rows.append(dict(path=str(path), speaker=speaker, gender=gender, emotion=emotion,
                                 arousal=0.7 if emotion == "anger" else -0.5, valence=-0.5, duration=1.0))
    manifest = root / "tones.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """(manifest, feature cache folder) shared by this module's runs."""
    root = tmp_path_factory.mktemp("ray-tones")
    return write_tones(root), root / "cache"


def flower_processes() -> list[str]:
    """Command lines of this process's descendants that belong to Flower or Ray."""
    found = []
    for pid in _children(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(k in cmd for k in ("flower-", "flwr", "ray")):
            found.append(cmd)
    return found


def test_staged_app_is_small_and_has_no_federations(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    before = (REPO_ROOT / "pyproject.toml").read_bytes()
    app = _stage_app(tmp_path / "fedaffect")
    config = tomllib.loads((app / "pyproject.toml").read_text())
    assert "federations" not in config["tool"]["flwr"]
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                            "clientapp": "client.app:app"}
    fab = build_fab_from_disk(app)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server/app.py", "client/app.py", "strategies/__init__.py", "shared_models/config.py"} <= set(names)
    assert not any(n.startswith((".venv", "data/", "runs/", ".cache", "tests/")) for n in names)
    assert len(fab) < 2_000_000
    assert (REPO_ROOT / "pyproject.toml").read_bytes() == before


def test_absolute_paths(tmp_path):
    cfg = absolute_paths(RunConfig(manifest="m.csv", run_dir="runs", cache_dir="c", store_url="sqlite:///s/x.db"),
                         base=tmp_path)
    assert cfg.manifest == str(tmp_path / "m.csv") and cfg.cache_dir == str(tmp_path / "c")
    assert cfg.run_dir == str(tmp_path / "runs")
    assert cfg.store_url == f"sqlite:///{tmp_path / 's' / 'x.db'}"
    assert absolute_paths(cfg).store_url == cfg.store_url  # absolute stays as it is
    assert absolute_paths(RunConfig(run_dir="r"), base=tmp_path).store_url.endswith(str(tmp_path / "r" / "fedaffect.db"))
    with pytest.raises(ValueError, match="memory"):
        absolute_paths(RunConfig(store_url="sqlite:///:memory:"))


def test_devices_ask_ray_for_a_gpu_share_only_when_the_run_computes_on_cuda():
    # Ray empties CUDA_VISIBLE_DEVICES for actors that ask for no GPU: torch would see none.
    assert federation_config(5, "cpu", cuda_available=True).endswith("client-resources-num-gpus=0.0")
    assert federation_config(5, "auto", cuda_available=False).endswith("client-resources-num-gpus=0.0")
    for device in ("cuda", "auto"):
        config = federation_config(5, device, cuda_available=True)
        assert config == f"num-supernodes=5 client-resources-num-cpus=1 client-resources-num-gpus={GPU_PER_DEVICE}"


@pytest.mark.slow
def test_ray_simulation_completes_and_is_stored(tones, tmp_path):
    manifest, cache = tones
    cfg = RunConfig(manifest=str(manifest), model="egemaps-mlp", task="both", folds=2, num_server_rounds=2,
                    local_epochs=2, run_name="ray-smoke", run_dir=str(tmp_path / "runs"), cache_dir=str(cache))
    seen = []
    summary = simulate(cfg, engine="ray", all_folds=False, progress=False,
                       on_round=lambda f, r, m: seen.append((f, r, m["uar"])))

    store = RunStore(summary["config"]["store-url"])
    run = store.get_run("ray-smoke")
    # the progress hook hears of every stored round, though the ServerApp is another process
    assert seen == [(0, r["round"], r["uar"]) for r in summary["folds"][0]["rounds"]]
    assert run.status == "completed" and run.engine == "flower"
    assert [r["round"] for r in store.rounds(run.id)] == [0, 1, 2]
    fold = summary["folds"][0]
    assert [r["round"] for r in fold["rounds"]] == [0, 1, 2]
    assert fold["rounds"][-1]["train_devices"] == 2  # 4 speakers, 2 folds: 2 train, 2 held out
    assert math.isfinite(fold["final"]["uar"]) and math.isfinite(summary["final"]["uar"]["mean"])
    assert (tmp_path / "runs" / "ray-smoke" / "flower-ray.log").stat().st_size > 0
    assert flower_processes() == []  # SuperLink, SuperExec, flwr-simulation and Ray are gone


@pytest.mark.slow
def test_failed_run_is_detected_although_flwr_exits_0(tones, tmp_path):
    manifest, cache = tones
    doomed = tmp_path / "doomed.csv"
    shutil.copy(manifest, doomed)
    cfg, n = prepare_run(RunConfig(manifest=str(doomed), folds=2, num_server_rounds=1, run_name="ray-doomed",
                                   run_dir=str(tmp_path / "runs"), cache_dir=str(cache)), progress=False)
    doomed.unlink()  # devices cannot load their clips any more

    with pytest.raises(RuntimeError, match="failed") as err:
        run_ray(cfg, n, timeout_s=300)
    assert "last" in str(err.value) and "log lines" in str(err.value)
    assert RunStore(cfg.store_url).get_run("ray-doomed").status == "failed"
    assert flower_processes() == []
