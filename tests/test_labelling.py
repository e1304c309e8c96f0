"""`fedaffect device label`: answers, invalid answers, quitting half-way, vanished clips."""

import io

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from client.device_store import DeviceStore
from client.labelling import AnswerError, find_player, label_session, parse_answer, parse_label
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


def test_the_models_guesses_can_be_hidden(queued):
    """Unprompted labelling: shown guesses anchor a person's answers towards the model's."""
    data_dir, clips = queued
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(data_dir), "--no-play", "--no-guesses"],
                             input="anger\nq\n")
    assert res.exit_code == 0, res.output
    assert clips[0] in res.output and "the model's guess" not in res.output and "41%" not in res.output
    with DeviceStore(data_dir) as store:
        assert {c: a["emotion"] for c, a in store.answers().items()} == {clips[0]: "anger"}


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
    assert counts == {"answered": 2, "dropped": 1, "unreachable": 0, "skipped": 0, "left": 0, "quit": 0}
    assert f"warning: {clips[1]} has gone" in out.getvalue()
    with DeviceStore(data_dir) as store:
        status = {q["clip"]: (q["status"], q["note"]) for q in store.queue()}
        assert status[clips[1]] == ("dropped", "file not found")


def test_an_unmounted_drive_keeps_the_queue(tmp_path):
    """Clips that all vanish at once, or whose folder has gone, are a drive that is not
    mounted: the queue must survive it, not be emptied."""
    data_dir = tmp_path / "device"
    drive = tmp_path / "usb"
    clips = [str(drive / "day1" / f"clip{i}.wav") for i in range(2)] + [str(drive / "day2" / "clip2.wav")]
    with DeviceStore(data_dir) as store:
        store.set_meta("emotions", LABELS)
        store.enqueue(1, [{"clip": c, "guesses": [], "uncertainty": 0.9} for c in clips])
    out = io.StringIO()  # no file there at all
    counts = label_session(data_dir, stdin=io.StringIO(""), stdout=out, play=False)
    assert counts["dropped"] == 0 and counts["unreachable"] == 3 and counts["left"] == 3
    assert "is the drive or folder holding the recordings mounted?" in out.getvalue()
    # One folder back: its clips are labelled, the other folder's clip is kept, not dropped.
    (drive / "day1").mkdir(parents=True)
    for clip in clips[:2]:
        sf.write(clip, (0.1 * np.sin(np.arange(8000) / 10)).astype(np.float32), 16000)
    counts = label_session(data_dir, stdin=io.StringIO("1\n2\n"), stdout=io.StringIO(), play=False)
    assert counts["answered"] == 2 and counts["dropped"] == 0 and counts["unreachable"] == 1
    with DeviceStore(data_dir) as store:
        assert [q["clip"] for q in store.pending()] == [clips[2]]
    # A folder deleted on purpose: --drop-missing clears what would otherwise stay forever.
    res = CliRunner().invoke(cli, ["device", "label", "--data-dir", str(data_dir), "--no-play", "--drop-missing"],
                             input="")
    assert res.exit_code == 0 and "dropped 1" in res.output, res.output
    with DeviceStore(data_dir) as store:
        assert store.pending() == []


def test_recordings_deleted_from_a_folder_that_is_still_there_are_dropped(queued):
    """All queued files gone but their folder holds other files: deleted, not unmounted."""
    import os

    data_dir, clips = queued
    for clip in clips:
        os.remove(clip)
    (data_dir.parent / "another-recording.wav").write_bytes(b"")  # the folder is mounted
    counts = label_session(data_dir, stdin=io.StringIO(""), stdout=io.StringIO(), play=False)
    assert counts["dropped"] == 3 and counts["unreachable"] == 0 and counts["left"] == 0


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
    assert parse_label("²", LABELS) is None  # a digit to str.isdigit, not a number: no crash
    installed = {"aplay": "/usr/bin/aplay", "paplay": "/usr/bin/paplay"}.get
    assert find_player(installed, clip="a.wav")[0] == "/usr/bin/aplay"
    assert find_player(installed, clip="a.flac") == ["/usr/bin/paplay"]  # aplay would play FLAC as noise


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


# -- arousal/valence answers (issue 3) -------------------------------------------------------
@pytest.mark.parametrize("text,task,expected", [
    ("happy", "emotion", ("happiness", None, None)),
    ("Angry", "both", ("anger", None, None)),
    ("a=0.6 v=0.2", "av", ("", 0.6, 0.2)),
    ("happy a=0.6 v=0.2", "both", ("happiness", 0.6, 0.2)),
    ("v=-1 a=1 2", "both", ("happiness", 1.0, -1.0)),  # any order, a number names a label
    ("arousal = .5, valence: -0.25", "av", ("", 0.5, -0.25)),
    ("sad a=0 v=0", "av", ("sadness", 0.0, 0.0)),  # an added label is kept
])
def test_parse_answer_reads_labels_and_arousal_valence(text, task, expected):
    answer = parse_answer(text, LABELS, task)
    assert (answer.emotion, answer.arousal, answer.valence) == expected


@pytest.mark.parametrize("text,task,message", [
    ("a=1.5 v=0", "both", r"arousal 1.5 is outside \[-1, 1\]"),
    ("a=0.2 v=-3", "av", r"valence -3 is outside \[-1, 1\]"),
    ("a=0,5 v=0", "av", r"arousal '0,5' is not a number; write decimals with a point \(0.5\)"),
    ("a=nan v=0", "av", r"arousal nan is outside"),
    ("a= v=0", "av", "arousal needs a number"),
    ("a=0.5", "both", "valence is missing: give arousal and valence together"),
    ("a=0.5 a=0.1 v=0", "av", "arousal given twice"),
    ("x=0.5", "av", "only a= \\(arousal\\) and v= \\(valence\\) take a value"),
    ("happy sad", "both", "one label per clip, got 'happy', 'sad'; give arousal and valence as a=0.6 v=-0.2"),
    ("a 0.5 v 0.2", "av", "one label per clip"),
    ("xyz a=0.1 v=0.1", "both", "not a label: 'xyz'"),
    ("a=0.6 v=0.2", "emotion", "this run learns emotion categories only"),
    ("happy", "av", "this run learns arousal and valence: give both"),
    ("", "both", "give a label, or arousal and valence"),
    ("", "emotion", "not a label: ''"),
])
def test_parse_answer_names_what_is_wrong(text, task, message):
    with pytest.raises(AnswerError, match=message):
        parse_answer(text, LABELS, task)


def test_the_session_takes_arousal_valence_and_asks_again_on_a_bad_one(queued):
    data_dir, clips = queued
    with DeviceStore(data_dir) as store:
        store.set_meta("task", "both")
    extra = str(data_dir.parent / "clip3.wav")
    sf.write(extra, np.zeros(800, np.float32), 16000)
    with DeviceStore(data_dir) as store:  # a queued clip with the model's arousal/valence guess
        store.enqueue(2, [{"clip": extra, "av_guess": [0.31, -0.13]}])
    out = io.StringIO()
    counts = label_session(data_dir, stdin=io.StringIO("happy a=0.6 v=0.2\na=1.5 v=0\na=0.5\na=0.5 v=-0.5\nsad\nq\n"),
                           stdout=out, play=False)
    text = out.getvalue()
    assert "arousal and valence: numbers in [-1, 1]" in text and "label and/or arousal, valence (" in text
    assert "arousal 1.5 is outside [-1, 1]" in text and "valence is missing" in text  # refused, asked again
    assert "saved: happiness, arousal +0.60, valence +0.20" in text
    assert "the model's guess: arousal +0.31, valence -0.13" in text  # the fourth (queued) clip
    assert counts["answered"] == 3 and counts["quit"] == 1 and counts["left"] == 1
    with DeviceStore(data_dir) as store:
        answers = store.answers()
    assert [(answers[c]["emotion"], answers[c]["arousal"], answers[c]["valence"]) for c in clips] == [
        ("happiness", 0.6, 0.2), ("", 0.5, -0.5), ("sadness", None, None)]


def test_an_emotion_run_refuses_arousal_valence_and_an_av_run_needs_it(queued):
    data_dir, clips = queued
    out = io.StringIO()  # no task in the store (an older device): labels only, as before
    label_session(data_dir, stdin=io.StringIO("a=0.1 v=0.1\nanger\nq\n"), stdout=out, play=False)
    assert "this run learns emotion categories only" in out.getvalue()
    assert "arousal and valence: numbers" not in out.getvalue()
    with DeviceStore(data_dir) as store:
        store.set_meta("task", "av")
    out = io.StringIO()
    label_session(data_dir, stdin=io.StringIO("anger\na=-0.3 v=0.9\nq\n"), stdout=out, play=False)
    assert "this run learns arousal and valence: give both" in out.getvalue()
    assert "the model's guesses" not in out.getvalue()  # an av run's emotion head means nothing
    with DeviceStore(data_dir) as store:
        answers = store.answers()
    assert (answers[clips[0]]["emotion"], answers[clips[0]]["arousal"]) == ("anger", None)
    assert (answers[clips[1]]["emotion"], answers[clips[1]]["arousal"], answers[clips[1]]["valence"]) == ("", -0.3, 0.9)


def test_arousal_valence_answers_join_the_training_set_at_the_next_round(tmp_path):
    """A device of task ``both`` queues clips with its arousal/valence guess; the person's
    answers (label, arousal/valence, or both) fill the training set, normalised once under FaiReg."""
    import torch

    from client.cooperative import CoopState, round_settings
    from shared_models.config import RunConfig
    from shared_models.fairness import FaiRegParams, normalise_data
    from shared_models.models import build_model
    from shared_models.training import LocalData

    n = 5
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"c{i}.wav"))
        sf.write(paths[-1], np.zeros(1600, np.float32), 16000)
    rng = np.random.default_rng(0)
    emotion = np.array([0, 1, -1, -1, -1])
    av = np.full((n, 2), np.nan, np.float32)
    av[:2] = [[0.5, -0.5], [-0.5, 0.5]]
    data = LocalData([rng.standard_normal(88).astype(np.float32) for _ in range(n)], emotion, av,
                     {"gender": np.array(["female"] * n)})
    cfg = RunConfig(mode="active", task="both", query_per_round=3, query_total=3)
    state = CoopState(cfg, tmp_path / "dev", paths, np.full(n, 0.1), LABELS[:2], emotion >= 0)
    torch.manual_seed(0)
    report = state.after_training(build_model("egemaps-mlp", 2), data, round_settings(cfg, 1), 1)
    assert report["queries"] == 3 and report["pending"] == 3
    assert all(q["av_guess"] is not None and q["guesses"] for q in state.store.pending())
    out = io.StringIO()
    answers = io.StringIO("happy a=0.6 v=0.2\na=-0.4 v=0.3\nanger\n")  # both; arousal/valence; a label
    label_session(tmp_path / "dev", stdin=answers, stdout=out, play=False)
    first, second, third = (paths.index(q["clip"]) for q in state.store.queue())  # in the order asked
    train = state.training_data(data)
    assert (train.emotion[first], *train.av[first]) == pytest.approx((1, 0.6, 0.2))  # label and arousal/valence
    assert (train.emotion[second], *train.av[second]) == pytest.approx((-1, -0.4, 0.3))  # arousal/valence only
    assert train.emotion[third] == 0 and np.isnan(train.av[third]).all()  # a label only
    assert (data.emotion == emotion).all() and np.isnan(data.av[2:]).all()  # the device's own data untouched
    # FaiReg (client/app.py train): the answer is normalised once, with its group's statistics.
    params = FaiRegParams(("gender",), {"female": np.array([[0.2, 0.2], [0.1, 0.2]])},
                          np.array([[0.0, 0.5], [0.0, 0.5]]))
    assert normalise_data(train, params).av[first] == pytest.approx([(0.6 - 0.2) / 0.6, (0.2 - 0.1) / 0.6])
    report = state.after_training(build_model("egemaps-mlp", 2), data, round_settings(cfg, 2), 2)
    assert (report["answered"], report["labelled"], report["pool"]) == (3, 5, 0)
