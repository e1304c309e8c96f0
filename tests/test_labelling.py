"""`fedaffect device label`: answers, invalid answers, quitting half-way, vanished clips."""

import io

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from client.device_store import DeviceStore
from client.labelling import find_player, label_session, parse_label
from fedaffect.cli import app as cli

LABELS = ["anger", "happiness", "sadness"]


@pytest.fixture()
def queued(tmp_path):
    """A device folder whose queue holds three real clips."""
    data_dir = tmp_path / "device"
    clips = []
    for i in range(3):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, (0.1 * np.sin(np.arange(8000) / 10)).astype(np.float32), 16000)
        clips.append(str(path))
    with DeviceStore(data_dir) as store:
        store.set_meta("emotions", LABELS)
        store.enqueue(1, [{"clip": c, "guesses": [["anger", 0.41], ["sadness", 0.35]], "uncertainty": 0.9}
                          for c in clips])
    return data_dir, clips


def test_answers_and_an_invalid_answer_through_the_prompt(queued):
    data_dir, clips = queued
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(data_dir), "--no-play"],
                             input="anger\nxyz\n3\nhap\n")
    assert res.exit_code == 0, res.output
    assert "[1/3]" in res.output and clips[0] in res.output and "0.5 s" in res.output
    assert "anger 41%" in res.output  # the model's guesses
    assert "not a label: 'xyz'" in res.output  # refused and asked again
    with DeviceStore(data_dir) as store:
        answers = store.answers()
        assert {c: a["emotion"] for c, a in answers.items()} == {
            clips[0]: "anger", clips[1]: "sadness", clips[2]: "happiness"}
        assert all(a["source"] == "person" and a["n_raters"] == 1 for a in answers.values())
        assert store.pending() == []
    assert "answered 3" in res.output


def test_quitting_half_way_loses_no_answer(queued):
    data_dir, clips = queued
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(data_dir), "--no-play"], input="2\nq\n")
    assert res.exit_code == 0, res.output
    with DeviceStore(data_dir) as store:  # what was answered is on disk
        assert {c: a["emotion"] for c, a in store.answers().items()} == {clips[0]: "happiness"}
        assert [q["clip"] for q in store.pending()] == clips[1:]
    # End of input (an interrupted session) is a quit too; the next session starts where it stopped.
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(data_dir), "--no-play"], input="s\nanger\n")
    assert res.exit_code == 0, res.output
    assert f"[1/2] {clips[1]}" in res.output
    with DeviceStore(data_dir) as store:
        assert set(store.answers()) == {clips[0], clips[2]}
        assert [q["clip"] for q in store.pending()] == [clips[1]]  # skipped: still queued


def test_a_vanished_clip_is_dropped_with_a_warning(queued):
    data_dir, clips = queued
    import os

    os.remove(clips[1])
    out = io.StringIO()
    counts = label_session(data_dir, stdin=io.StringIO("1\n1\n"), stdout=out, play=False)
    assert counts == {"answered": 2, "dropped": 1, "skipped": 0, "left": 0, "quit": 0}
    assert f"warning: {clips[1]} has gone" in out.getvalue()
    with DeviceStore(data_dir) as store:
        status = {q["clip"]: (q["status"], q["note"]) for q in store.queue()}
        assert status[clips[1]] == ("dropped", "file not found")


def test_play_uses_the_player(queued):
    data_dir, clips = queued
    calls = []
    label_session(data_dir, stdin=io.StringIO("p\n?\nsad\nq\n"), stdout=io.StringIO(), player=["myplayer", "-q"],
                  run=lambda cmd, **kw: calls.append(cmd))
    assert calls == [["myplayer", "-q", clips[0]]]
    out = io.StringIO()
    label_session(data_dir, stdin=io.StringIO("p\nq\n"), stdout=out, play=False)
    assert "no audio player" in out.getvalue()


def test_parse_label_and_player_lookup():
    assert parse_label("Anger", LABELS) == "anger"
    assert parse_label("2", LABELS) == "happiness"
    assert parse_label("sa", LABELS) == "sadness"
    assert parse_label("4", LABELS) is None and parse_label("0", LABELS) is None
    assert parse_label("", LABELS) is None and parse_label("fear", LABELS) is None
    assert parse_label("a", ["anger", "anxiety"]) is None  # ambiguous prefix
    assert find_player(lambda name: "/usr/bin/paplay" if name == "paplay" else None) == ["/usr/bin/paplay"]
    assert find_player(lambda name: None) is None


def test_no_queue_and_missing_folder(tmp_path):
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(tmp_path)])
    assert res.exit_code == 0 and "No label queue" in res.output
    assert not (tmp_path / "cooperative.db").exists()
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(tmp_path / "gone")])
    assert res.exit_code != 0 and "not found" in res.output


def test_deployed_device_queues_and_the_answers_join_its_training_set(tone_manifest, tmp_path):
    """Deployment: unlabelled manifest rows are the pool; the person's answers train at the next round."""
    import pandas as pd

    from client.app import load_device
    from client.cooperative import round_settings
    from shared_models.config import RunConfig
    from shared_models.models import build_model

    rows = pd.read_csv(tone_manifest)
    rows = rows[rows["speaker"] == "s1"].reset_index(drop=True)
    rows.loc[2:, ["emotion", "arousal", "valence"]] = None  # 2 labelled clips, 4 in the pool
    data_dir = tmp_path / "phone"
    data_dir.mkdir()
    rows.to_csv(data_dir / "manifest.csv", index=False)
    cfg = RunConfig(mode="active", emotions="anger,sadness", query_per_round=2, cache_dir=str(tmp_path / "c"))
    device = load_device(cfg.to_mapping(), {"data-dir": str(data_dir)})
    assert device.info()["n-pool"] == 4 and device.info()["n-labelled"] == 2
    report = device.coop.after_training(build_model(cfg.model, 2), device.data, round_settings(cfg, 1), 1)
    assert report["queries"] == 2 and report["pending"] == 2 and report["rater_answers"] == 0  # no oracle here
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(data_dir), "--no-play"], input="1\n2\n")
    assert res.exit_code == 0, res.output
    train = device.coop.training_data(device.data)
    assert (train.emotion >= 0).sum() == 4 and (device.data.emotion >= 0).sum() == 2
    report = device.coop.after_training(build_model(cfg.model, 2), device.data, round_settings(cfg, 2), 2)
    assert (report["labelled"], report["answered"], report["human_labels"], report["pool"]) == (4, 2, 4, 2)
