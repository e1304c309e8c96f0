"""The device's cooperative-learning store: queue, answers and pseudo-labels survive a restart."""

import pytest

from client.device_store import DeviceStore


def test_label_queue_and_answers_survive_a_restart(tmp_path):
    store = DeviceStore(tmp_path / "dev")
    assert store.enqueue(1, [{"clip": f"/d/c{i}.wav", "duration": 1.5, "guesses": [["anger", 0.4]],
                              "uncertainty": 0.9 - i / 10} for i in range(3)]) == 3
    store.answer("/d/c0.wav", "anger", source="person")
    store.close()

    again = DeviceStore(tmp_path / "dev")  # a new store object on the same folder: the device restarted
    assert [q["clip"] for q in again.pending()] == ["/d/c1.wav", "/d/c2.wav"]
    assert again.pending()[0]["guesses"] == [["anger", 0.4]] and again.pending()[0]["duration"] == 1.5
    assert again.answers()["/d/c0.wav"]["emotion"] == "anger"
    assert again.queued_clips() == {"/d/c0.wav", "/d/c1.wav", "/d/c2.wav"}
    assert again.enqueue(2, [{"clip": "/d/c0.wav"}, {"clip": "/d/c3.wav"}]) == 1  # each clip is asked once
    again.drop_queued("/d/c1.wav", "file not found")
    statuses = {q["clip"]: (q["status"], q["note"]) for q in again.queue()}
    assert statuses["/d/c0.wav"] == ("answered", "")
    assert statuses["/d/c1.wav"] == ("dropped", "file not found")
    again.close()


def test_pseudo_label_history_and_effort(tmp_path):
    with DeviceStore(tmp_path) as store:
        assert store.add_pseudo(1, [{"clip": "a", "emotion": "anger", "confidence": 0.95},
                                    {"clip": "b", "arousal": 0.5, "valence": -0.2, "confidence": 0.8}]) == 2
        assert store.add_pseudo(2, [{"clip": "a", "emotion": "sadness"}]) == 0  # already labelled
        assert store.drop_pseudo(3, ["a"], "model changed its mind") == 1
        assert store.add_pseudo(4, [{"clip": "a", "emotion": "sadness", "confidence": 0.9}]) == 1
        assert set(store.active_pseudo()) == {"a", "b"} and store.active_pseudo()["a"]["emotion"] == "sadness"
        history = store.pseudo_history("a")
        assert [(h["emotion"], h["round_added"], h["round_dropped"]) for h in history] == [
            ("anger", 1, 3), ("sadness", 4, None)]
        assert history[0]["reason"] == "model changed its mind"
        store.answer("x", "fear", source="oracle", n_raters=3, rater_labels=["fear", "anger", "fear"])
        store.answer("y", "anger", source="oracle", n_raters=2)
        assert store.effort() == 5
        store.set_meta("emotions", ["anger", "fear"])
    with DeviceStore(tmp_path) as store:
        assert store.get_meta("emotions") == ["anger", "fear"] and store.get_meta("missing", 7) == 7
        assert store.pseudo_history()[1]["arousal"] == 0.5


def test_opening_without_create_needs_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no label queue"):
        DeviceStore(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()
