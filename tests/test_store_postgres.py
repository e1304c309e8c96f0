"""The run store on a real PostgreSQL (the ``postgres_url`` fixture: tests/pg.py).

Run names carry a random prefix, so the tests also pass on a shared database given with
FEDAFFECT_TEST_POSTGRES_URL that holds runs of earlier sessions.
"""

from __future__ import annotations

import datetime as dt
import math
import socket
import uuid

import pytest
import torch
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from server.store import RunStore


@pytest.fixture
def prefix():
    return f"pg-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(postgres_url):
    s = RunStore(postgres_url)
    yield s
    s.engine.dispose()


def _plain(url: str) -> str:
    """The same URL as ``postgresql://`` (no driver named)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_a_plain_postgresql_url_uses_psycopg_on_a_real_server(postgres_url):
    store = RunStore(_plain(postgres_url))
    assert store.engine.url.drivername == "postgresql+psycopg"
    with store.engine.connect() as conn:
        assert conn.execute(text("select version()")).scalar().startswith("PostgreSQL")
        tables = set(conn.execute(text("select tablename from pg_tables where schemaname = current_schema()")).scalars())
    assert {"runs", "rounds", "device_metrics", "group_metrics", "checkpoints"} <= tables
    store.engine.dispose()


def test_runs_rounds_devices_and_groups_round_trip_and_persist(postgres_url, store, prefix):
    config = {"model": "egemaps-mlp", "lr": 0.003, "folds": 5, "store-url": None, "tags": ["a", "b"],
              "nested": {"x": 1.5}}
    first = store.create_run(f"{prefix}-fold0", config, engine="inprocess")
    second = store.create_run(f"{prefix}-fold1", {"model": "logmel-crnn"})
    assert first.id != second.id and first.status == "running" and first.engine == "inprocess"

    # round 0: what server/app.py stores: NaN metrics as null (its _json_safe), NaN groups dropped
    store.add_round(first.id, 0, {"uar": 0.25, "ccc_arousal": None, "eval_loss": 1.38, "train_devices": 0},
                    [{"device": "dev-0", "role": "child", "phase": "evaluate",
                      "metrics": {"num-examples": 6, "uar": 0.5, "ccc_valence": None}}],
                    [("gender", "female", "uar", 0.5), ("gender", "male", "uar", 0.0)])
    # round 1: train rows go in as the devices sent them; a NaN there is stored as null too
    store.add_round(
        first.id, 1,
        {"uar": 0.75, "ccc_arousal": None, "train_loss": 0.61, "wall_s": 1.25, "gap_uar/gender": 0.125},
        [{"device": "dev-0", "role": "child", "phase": "train", "metrics": {"num-examples": 12, "train_loss": 0.5}},
         {"device": "dev-1", "role": "adult", "phase": "train",
          "metrics": {"num-examples": 0, "train_loss": float("nan"), "worst": float("inf")}},
         {"device": "dev-0", "role": "child", "phase": "evaluate", "metrics": {"num-examples": 6, "uar": 0.75}}],
        [("gender", "female", "uar", 0.8125), ("gender", "male", "uar", 0.6875), ("weight", "dev-0", "weight", 0.4)],
    )

    again = RunStore(postgres_url)  # a new store object on the same database: e.g. the CLI after the run
    try:
        assert again.rounds(first.id) == [
            {"round": 0, "uar": 0.25, "ccc_arousal": None, "eval_loss": 1.38, "train_devices": 0},
            {"round": 1, "uar": 0.75, "ccc_arousal": None, "train_loss": 0.61, "wall_s": 1.25, "gap_uar/gender": 0.125},
        ]
        assert again.device_metrics(first.id) == [
            {"round": 0, "device": "dev-0", "role": "child", "phase": "evaluate", "num-examples": 6, "uar": 0.5,
             "ccc_valence": None},
            {"round": 1, "device": "dev-0", "role": "child", "phase": "train", "num-examples": 12, "train_loss": 0.5},
            {"round": 1, "device": "dev-1", "role": "adult", "phase": "train", "num-examples": 0,
             "train_loss": None, "worst": None},
            {"round": 1, "device": "dev-0", "role": "child", "phase": "evaluate", "num-examples": 6, "uar": 0.75},
        ]
        assert again.group_metrics(first.id) == [
            {"round": 0, "attribute": "gender", "group": "female", "metric": "uar", "value": 0.5},
            {"round": 0, "attribute": "gender", "group": "male", "metric": "uar", "value": 0.0},
            {"round": 1, "attribute": "gender", "group": "female", "metric": "uar", "value": 0.8125},
            {"round": 1, "attribute": "gender", "group": "male", "metric": "uar", "value": 0.6875},
            {"round": 1, "attribute": "weight", "group": "dev-0", "metric": "weight", "value": 0.4},
        ]
        assert again.rounds(second.id) == [] and again.device_metrics(second.id) == []

        mine = [r for r in again.list_runs() if r.name.startswith(prefix)]
        assert [(r.id, r.name) for r in mine] == [(first.id, f"{prefix}-fold0"), (second.id, f"{prefix}-fold1")]
        by_name, by_id, by_id_text = again.get_run(f"{prefix}-fold0"), again.get_run(first.id), again.get_run(str(first.id))
        assert by_name.id == by_id.id == by_id_text.id == first.id
        assert by_name.config == config and by_name.status == "running" and by_name.finished_at is None
    finally:
        again.engine.dispose()

    summary = {"run": f"{prefix}-fold0", "final": {"uar": 0.75, "ccc_arousal": None}, "per_group": {}}
    store.finish_run(first.id, "completed", summary)
    store.finish_run(second.id, "failed", error="Traceback ...\nRuntimeError: device lost")

    third = RunStore(postgres_url)
    try:
        done, failed = third.get_run(first.id), third.get_run(f"{prefix}-fold1")
        assert done.status == "completed" and done.summary == summary and done.error == ""
        assert failed.status == "failed" and failed.error.endswith("device lost") and failed.summary == {}
        assert done.finished_at.tzinfo is not None and done.created_at <= done.finished_at
        assert abs(done.finished_at - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    finally:
        third.engine.dispose()


def test_a_duplicate_run_name_or_round_is_refused(store, prefix):
    run = store.create_run(f"{prefix}-dup", {"lr": 0.1})
    with pytest.raises(ValueError, match="exists already") as err:
        store.create_run(f"{prefix}-dup", {"lr": 0.2})
    password = make_url(store.url).password
    if password:
        assert password not in str(err.value)
    assert store.get_run(f"{prefix}-dup").config == {"lr": 0.1}  # the first run is untouched

    store.add_round(run.id, 0, {"uar": 0.1})
    with pytest.raises(IntegrityError):  # one row per (run, round); nothing of the failed round is kept
        store.add_round(run.id, 0, {"uar": 0.9}, [{"device": "d", "role": "r", "phase": "train", "metrics": {}}])
    assert store.rounds(run.id) == [{"round": 0, "uar": 0.1}] and store.device_metrics(run.id) == []
    store.add_round(run.id, 1, {"uar": 0.2})  # the store still works after the refused round
    assert [r["round"] for r in store.rounds(run.id)] == [0, 1]


def test_unknown_runs_are_key_errors(store, prefix):
    with pytest.raises(KeyError):
        store.get_run(f"{prefix}-missing")
    with pytest.raises(KeyError):
        store.get_run("99999999999")  # past PostgreSQL's 32-bit ids: still "no such run", not a database error
    with pytest.raises(KeyError):
        store.get_run(2_000_000_000)


def test_checkpoints_keep_the_newest_and_skip_a_corrupt_one(postgres_url, store, prefix, tmp_path):
    run = store.create_run(f"{prefix}-ckpt", {})
    other = store.create_run(f"{prefix}-other", {})
    folder = tmp_path / "ckpt"
    paths = [store.save_checkpoint(run.id, r, {"round": r, "state_dict": {"w": torch.full((3,), float(r))}},
                                   folder, keep=3) for r in range(1, 5)]
    assert not paths[0].exists() and all(p.exists() for p in paths[1:])  # round 1 dropped: keep 3
    assert store.latest_checkpoint(other.id) is None

    again = RunStore(postgres_url)
    try:
        r, payload = again.latest_checkpoint(run.id)
        assert r == 4 and payload["round"] == 4 and torch.equal(payload["state_dict"]["w"], torch.full((3,), 4.0))

        data = bytearray(paths[-1].read_bytes())  # the newest file is damaged (e.g. a crash while copying)
        data[len(data) // 2] ^= 0xFF
        paths[-1].write_bytes(bytes(data))
        r, payload = again.latest_checkpoint(run.id)
        assert r == 3 and torch.equal(payload["state_dict"]["w"], torch.full((3,), 3.0))

        paths[-2].unlink()  # and the one before is gone
        assert again.latest_checkpoint(run.id)[0] == 2
        paths[-3].write_bytes(b"")
        assert again.latest_checkpoint(run.id) is None
    finally:
        again.engine.dispose()


def test_an_unreachable_database_is_a_clear_error_without_the_password(postgres_url):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError) as err:  # fails fast: the store sets connect_timeout
        RunStore(f"postgresql://someone:s3cret-pw@127.0.0.1:{port}/runs")
    message = str(err.value)
    assert "s3cret-pw" not in message and "someone:***@127.0.0.1" in message and str(port) in message

    missing_db = make_url(postgres_url).set(database=f"no_such_db_{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConnectionError, match="does not exist") as err:
        RunStore(missing_db.render_as_string(hide_password=False))
    if missing_db.password:
        assert missing_db.password not in str(err.value)


def test_non_finite_json_is_stored_as_null_on_every_backend(tmp_path, postgres_url):
    """The same rows read back the same from SQLite and PostgreSQL."""
    rows = []
    for url in (f"sqlite:///{tmp_path / 'runs.db'}", postgres_url):
        s = RunStore(url)
        run = s.create_run(f"nan-{uuid.uuid4().hex[:10]}", {"alpha": float("nan"), "grid": [1.0, float("-inf")]})
        s.add_round(run.id, 0, {"uar": float("nan"), "ok": 1.0})
        rows.append((s.get_run(run.id).config, s.rounds(run.id)))
        s.engine.dispose()
    assert rows[0] == rows[1] == ({"alpha": None, "grid": [1.0, None]}, [{"round": 0, "uar": None, "ok": 1.0}])
    assert not any(isinstance(v, float) and math.isnan(v) for v in rows[1][1][0].values())
