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
        store.update_meta({"task": "av", "emotions": ["fear"]})
    with DeviceStore(tmp_path) as store:
        assert store.get_meta("emotions") == ["fear"] and store.get_meta("missing", 7) == 7
        assert store.get_meta("task") == "av"
        assert store.pseudo_history()[1]["arousal"] == 0.5


def test_opening_without_create_needs_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no label queue"):
        DeviceStore(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


# The label queue as the first version of the store wrote it (no arousal/valence guess).
OLD_LABEL_QUEUE = """CREATE TABLE label_queue (
    id INTEGER NOT NULL, clip TEXT NOT NULL, duration FLOAT, guesses JSON NOT NULL,
    uncertainty FLOAT NOT NULL, round_queued INTEGER NOT NULL, status VARCHAR(20) NOT NULL,
    note TEXT NOT NULL, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    PRIMARY KEY (id), UNIQUE (clip))"""


def test_an_old_store_still_opens_and_gains_the_new_columns(tmp_path):
    import sqlite3

    from client.device_store import _add_missing_columns

    (tmp_path / "dev").mkdir()
    with sqlite3.connect(tmp_path / "dev" / "cooperative.db") as db:
        db.execute(OLD_LABEL_QUEUE)
        db.execute("INSERT INTO label_queue (clip, guesses, uncertainty, round_queued, status, note, created_at, "
                   "updated_at) VALUES ('/d/old.wav', '[[\"anger\", 0.5]]', 0.7, 1, 'pending', '', "
                   "'2024-01-01 00:00:00', '2024-01-01 00:00:00')")
    with DeviceStore(tmp_path / "dev", create=False) as store:
        assert store.pending() == [{"clip": "/d/old.wav", "duration": None, "guesses": [["anger", 0.5]],
                                    "av_guess": None, "uncertainty": 0.7, "round_queued": 1, "status": "pending",
                                    "note": ""}]
        assert store.enqueue(2, [{"clip": "/d/new.wav", "av_guess": [0.25, -0.5]}]) == 1
        store.answer("/d/old.wav", "anger")
        assert _add_missing_columns(store.engine) == []  # nothing left to add
    with DeviceStore(tmp_path / "dev") as store:  # and it opens again
        assert [q["av_guess"] for q in store.queue()] == [None, [0.25, -0.5]]
        assert store.answers()["/d/old.wav"]["emotion"] == "anger"


def test_answers_keep_arousal_and_valence_on_the_label_scale(tmp_path):
    with DeviceStore(tmp_path) as store:
        store.enqueue(1, [{"clip": "a"}, {"clip": "b"}])
        store.answer("a", "", arousal=0.6, valence=-0.2)  # arousal/valence only
        store.answer("b", "happiness", arousal=-1.0, valence=1.0)
        with pytest.raises(ValueError, match="arousal and valence go together"):
            store.answer("c", "", arousal=0.6)
        with pytest.raises(ValueError, match=r"valence must be a number in \[-1, 1\], got 1.5"):
            store.answer("c", "", arousal=0.6, valence=1.5)
        with pytest.raises(ValueError, match="arousal must be"):
            store.answer("c", "", arousal=float("nan"), valence=0.0)
        answers = store.answers()
        assert set(answers) == {"a", "b"} and store.pending() == []
        assert (answers["a"]["emotion"], answers["a"]["arousal"], answers["a"]["valence"]) == ("", 0.6, -0.2)
        assert (answers["b"]["emotion"], answers["b"]["arousal"]) == ("happiness", -1.0)


def test_reads_see_every_commit_at_once_and_are_private_copies(tmp_path):
    store = DeviceStore(tmp_path)
    other = DeviceStore(tmp_path)  # another process's view of the same file (a labelling session)
    assert store.answers() == {} and store.active_pseudo() == {} and store.queued_clips() == set()
    other.answer("z", "fear")  # another connection's commit: seen by the next read
    assert set(store.answers()) == {"z"}
    store.add_pseudo(1, [{"clip": "a", "emotion": "anger"}])
    assert set(store.active_pseudo()) == {"a"} and set(other.active_pseudo()) == {"a"}
    other.enqueue(1, [{"clip": "q"}])
    assert store.enqueue(2, [{"clip": "q"}, {"clip": "r"}]) == 1  # a write sees the other's commit too
    assert [p["clip"] for p in store.pending()] == ["q", "r"] and other.queued_clips() == {"q", "r"}
    store.answer("q", "sadness")  # changes the answers and the queue
    assert set(store.answers()) == {"z", "q"} and [p["clip"] for p in other.pending()] == ["r"]
    got = store.active_pseudo()
    got["a"]["emotion"] = "changed by the caller"
    got.pop("a")
    queue = store.queue()
    queue[0]["guesses"].append(["x", 1.0])
    assert store.active_pseudo()["a"]["emotion"] == "anger" and store.queue()[0]["guesses"] == []
    store.close()
    other.close()
    with DeviceStore(tmp_path) as again:  # everything was committed
        assert set(again.answers()) == {"z", "q"} and set(again.active_pseudo()) == {"a"}
        assert [q["status"] for q in again.queue()] == ["answered", "pending"]
        again.enqueue(3, [{"clip": "g", "guesses": [["fear", 0.6]]}])
        again.pending()[-1]["guesses"][0][1] = 0.0  # a list inside a list is the caller's own too
        assert again.pending()[-1]["guesses"] == [["fear", 0.6]]


def test_a_failed_write_changes_neither_the_file_nor_the_reads(tmp_path):
    with DeviceStore(tmp_path) as store:
        store.add_pseudo(1, [{"clip": "a", "emotion": "anger"}])
        with pytest.raises(Exception):
            store.add_pseudo(2, [{"clip": "b", "emotion": "fear"}, {"clip": "c", "emotion": object()}])
        assert set(store.active_pseudo()) == {"a"}
    with DeviceStore(tmp_path) as store:
        assert set(store.active_pseudo()) == {"a"}


def test_answers_given_together_are_stored_together_or_not_at_all(tmp_path):
    with DeviceStore(tmp_path) as store:
        store.enqueue(1, [{"clip": "a"}, {"clip": "b"}])
        with pytest.raises(ValueError, match="valence must be"):
            store.answer_many([{"clip": "a", "emotion": "fear"}, {"clip": "b", "arousal": 0.1, "valence": 2.0}])
        assert store.answers() == {} and len(store.pending()) == 2
        assert store.answer_many([{"clip": "a", "emotion": "fear", "n_raters": 3, "source": "oracle"},
                                  {"clip": "b", "arousal": 0.1, "valence": -0.2}]) == 2
        assert store.pending() == [] and store.effort() == 4
        assert store.answers()["b"]["arousal"] == 0.1 and store.answers()["a"]["source"] == "oracle"


def test_a_new_store_has_the_schema_create_all_makes(tmp_path):
    import sqlite3

    from sqlalchemy import create_engine

    from client.device_store import STORE_FILE, _Base

    DeviceStore(tmp_path / "new").close()  # a new file: the precompiled script
    engine = create_engine(f"sqlite:///{tmp_path / 'ref.db'}")
    _Base.metadata.create_all(engine)
    engine.dispose()

    def schema(path):
        with sqlite3.connect(path) as conn:
            return sorted((t, n, " ".join(sql.replace("IF NOT EXISTS ", "").split()))
                          for t, n, sql in conn.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL"))

    assert schema(tmp_path / "new" / STORE_FILE) == schema(tmp_path / "ref.db")
    assert len(schema(tmp_path / "ref.db")) >= 6  # four tables and their indexes


def test_unchecked_reads_wait_for_the_block_but_writes_never_miss_a_commit(tmp_path):
    store, other = DeviceStore(tmp_path), DeviceStore(tmp_path)
    with store.unchecked_reads():
        assert store.answers() == {}
        other.enqueue(1, [{"clip": "q"}])
        other.answer("q", "fear")
        assert store.answers() == {}  # another connection's commit: not yet seen
        assert store.enqueue(2, [{"clip": "q"}, {"clip": "r"}]) == 1  # a write checks: q is known
        assert set(store.answers()) == {"q"}  # and the mirror it reloaded is current
    other.answer("r", "anger")
    assert set(store.answers()) == {"q", "r"}  # after the block every read checks again
    store.close()
    other.close()


def _open_files_under(folder) -> int:
    import os

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:
            pass
    return n


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_many_stores_keep_few_files_open_and_lose_nothing(tmp_path, monkeypatch):
    """A simulation holds one store per device: only MAX_OPEN_STORES keep their connection
    (3 descriptors each), so hundreds of devices stay under a 1024-descriptor limit; a store
    that let its connection go still sees another connection's commit when it comes back."""
    import client.device_store as device_store

    monkeypatch.setattr(device_store, "MAX_OPEN_STORES", 2)
    stores = [DeviceStore(tmp_path / str(i)) for i in range(5)]
    for i, s in enumerate(stores):
        s.add_pseudo(1, [{"clip": f"c{i}", "emotion": "anger"}])
    assert _open_files_under(tmp_path) <= 2 * 3
    labeller = DeviceStore(tmp_path / "0")  # a labelling session on device 0, whose store was released
    labeller.answer("q", "fear")
    labeller.close()
    assert set(stores[0].answers()) == {"q"} and set(stores[0].active_pseudo()) == {"c0"}
    assert [set(s.active_pseudo()) for s in stores] == [{f"c{i}"} for i in range(5)]
    assert _open_files_under(tmp_path) <= 2 * 3
    for s in stores:
        s.close()
    assert _open_files_under(tmp_path) == 0
