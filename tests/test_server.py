"""Coordinator pieces: pooled metrics from sufficient statistics, the run store, checkpoints."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from server.app import pooled_metrics
from server.store import RunStore
from shared_models.metrics import ccc, ccc_sums, confusion


def device_stats(y, p, a_true, a_pred, gender):
    stats = {"cm": confusion(y, p, 3), "sums_arousal": ccc_sums(a_pred, a_true),
             "sums_valence": ccc_sums(a_pred, a_true), "groups": {"gender": {}}}
    for g in np.unique(gender):
        m = gender == g
        stats["groups"]["gender"][g] = {"cm": confusion(y[m], p[m], 3), "sums_arousal": ccc_sums(a_pred[m], a_true[m]),
                                        "sums_valence": ccc_sums(a_pred[m], a_true[m])}
    return stats


def test_pooled_metrics_equal_metrics_of_pooled_predictions():
    rng = np.random.default_rng(0)
    parts, ys, ps, at, ap, gs = [], [], [], [], [], []
    for n, gender in ((30, "female"), (50, "male"), (20, "female")):
        y = rng.integers(0, 3, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, 3, n))
        a_true = rng.uniform(-1, 1, n)
        a_pred = 0.5 * a_true + 0.3 * rng.standard_normal(n)
        g = np.array([gender] * n)
        parts.append(device_stats(y, p, a_true, a_pred, g))
        ys.append(y), ps.append(p), at.append(a_true), ap.append(a_pred), gs.append(g)
    y, p, a_true, a_pred, g = map(np.concatenate, (ys, ps, at, ap, gs))
    metrics, groups = pooled_metrics(parts)
    assert metrics["uar"] == pytest.approx(balanced_accuracy_score(y, p))
    assert metrics["wa"] == pytest.approx(accuracy_score(y, p))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert metrics["ccc_arousal"] == pytest.approx(ccc(a_pred, a_true))
    per = {(a, grp, m): v for a, grp, m, v in groups}
    for grp in ("female", "male"):
        m = g == grp
        assert per[("gender", grp, "uar")] == pytest.approx(balanced_accuracy_score(y[m], p[m]))
        assert per[("gender", grp, "ccc_arousal")] == pytest.approx(ccc(a_pred[m], a_true[m]))
    uars = [per[("gender", grp, "uar")] for grp in ("female", "male")]
    assert metrics["gap_uar/gender"] == pytest.approx(max(uars) - min(uars))
    assert metrics["worst_uar/gender"] == pytest.approx(min(uars))


def test_pooled_metrics_without_categorical_labels_are_nan_not_an_error():
    stats = {"cm": np.zeros((3, 3), int), "sums_arousal": ccc_sums(np.r_[0.1, 0.5, 0.9], np.r_[0.0, 0.5, 1.0]),
             "sums_valence": np.zeros(6), "groups": {}}
    metrics, _ = pooled_metrics([stats])
    assert np.isnan(metrics["uar"]) and np.isnan(metrics["ccc_valence"])
    assert metrics["ccc_arousal"] > 0.9


def test_a_device_without_labels_does_not_make_the_round_loss_nan():
    from server.app import _pool_evaluation

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 10)
    labelled = device_stats(y, y, rng.uniform(-1, 1, 10), rng.uniform(-1, 1, 10), np.array(["f"] * 10))
    empty = {"cm": np.zeros((3, 3), int), "sums_arousal": np.zeros(6), "sums_valence": np.zeros(6), "groups": {}}
    parts = [(labelled, {"eval_loss": 0.5, "num-examples": 10}, {"device": "a"}),
             (empty, {"eval_loss": float("nan"), "num-examples": 0}, {"device": "b"})]
    metrics, devices, _ = _pool_evaluation(parts, 3)
    assert metrics["eval_loss"] == 0.5 and metrics["uar"] == 1.0
    assert metrics["eval_failures"] == 1 and len(devices) == 2


def test_store_round_trip_and_duplicate_run(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run("r1", {"model": "egemaps-mlp"}, engine="inprocess")
    store.add_round(run.id, 0, {"uar": 0.2}, [{"device": "dev-00", "role": "train", "phase": "evaluate",
                                               "metrics": {"num-examples": 4}}], [("gender", "male", "uar", 0.25)])
    store.add_round(run.id, 1, {"uar": 0.4})
    store.finish_run(run.id, "completed", {"final": {"uar": 0.4}})
    again = RunStore(store.url)  # a new connection sees everything
    assert [r["uar"] for r in again.rounds(run.id)] == [0.2, 0.4]
    assert again.device_metrics(run.id)[0]["num-examples"] == 4
    assert again.group_metrics(run.id)[0]["value"] == 0.25
    assert again.get_run("r1").status == "completed"
    with pytest.raises(ValueError, match="exists"):
        again.create_run("r1", {})
    with pytest.raises(KeyError):
        again.get_run("nope")


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run("r", {})
    for r in range(4):
        store.save_checkpoint(run.id, r, {"round": r}, tmp_path / "ckpt", keep=3)
    assert not (tmp_path / "ckpt" / "round-0000.pt").exists()  # only the newest 3 kept
    assert store.latest_checkpoint(run.id)[0] == 3
    (tmp_path / "ckpt" / "round-0003.pt").write_bytes(b"garbage")
    rnd, payload = store.latest_checkpoint(run.id)
    assert rnd == 2 and payload["round"] == 2


def test_a_resumed_run_keeps_as_many_checkpoints_and_is_not_wiped_for_unreadable_ones(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run("r", {})
    folder = tmp_path / "ckpt"
    for r in range(6):
        store.add_round(run.id, r, {"uar": r / 10})
        store.save_checkpoint(run.id, r, {"round": r}, folder, keep=3)
    (folder / "round-0005.pt").write_bytes(b"torn write")
    _, (last, _) = store.reopen_run("r", {})
    assert last == 4 and [r["round"] for r in store.rounds(run.id)] == [0, 1, 2, 3, 4]
    for r in (5, 6, 7):  # the resumed run stores round 5 again, then goes on
        store.save_checkpoint(run.id, r, {"round": r}, folder, keep=3)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["round-0005.pt", "round-0006.pt", "round-0007.pt"]
    assert store.latest_checkpoint(run.id)[0] == 7
    for p in folder.glob("*.pt"):
        p.rename(tmp_path / p.name)  # the run's folder moved: no checkpoint can be read
    with pytest.raises(RuntimeError, match="none of its 3 checkpoints"):
        store.reopen_run("r", {})
    assert [r["round"] for r in store.rounds(run.id)] == [0, 1, 2, 3, 4]  # nothing thrown away


def test_metrics_of_an_untrained_head_are_blanked():
    from server.app import task_metrics

    metrics = {"uar": 0.5, "ccc_arousal": 0.3, "gap_uar/gender": 0.1, "gap_sp/gender": 0.05,
               "worst_ccc_valence/gender": 0.1, "eval_loss": 1.0}
    rows = [("gender", "f", "uar", 0.5), ("gender", "f", "ccc_arousal", 0.3), ("gender", "f", "n", 3.0)]
    emo, emo_rows = task_metrics(metrics, rows, "emotion")
    assert np.isnan(emo["ccc_arousal"]) and np.isnan(emo["worst_ccc_valence/gender"])
    assert emo["uar"] == 0.5 and emo["gap_sp/gender"] == 0.05 and emo["eval_loss"] == 1.0
    assert [r[2] for r in emo_rows] == ["uar", "n"]
    av, av_rows = task_metrics(metrics, rows, "av")
    assert np.isnan(av["uar"]) and np.isnan(av["gap_uar/gender"]) and av["ccc_arousal"] == 0.3
    assert [r[2] for r in av_rows] == ["ccc_arousal", "n"]
    both, both_rows = task_metrics(metrics, rows, "both")
    assert both == metrics and both_rows == rows


def test_a_device_with_only_arousal_valence_labels_counts_as_labelled_for_an_av_run():
    """The coordinator trains on devices whose ``n-labelled`` > 0: for task av, clips with
    arousal/valence but no emotion are labels (a dimension-only corpus trained nowhere before)."""
    from client.app import Device
    from shared_models.training import LocalData

    data = LocalData([np.zeros(88, np.float32)] * 3, np.array([-1, -1, 0]),
                     np.array([[0.1, 0.2], [0.3, np.nan], [np.nan, np.nan]]))
    counts = {task: Device("d", "train", 0, data, ["anger"], 0, task=task).info()["n-labelled"]
              for task in ("emotion", "av", "both")}
    assert counts == {"emotion": 1, "av": 2, "both": 3}


@pytest.mark.parametrize("url", ["notaurl", "bogus://x"])
def test_a_mistyped_store_url_is_a_clear_error(url):
    with pytest.raises(ConnectionError, match="not a database URL"):
        RunStore(url)


def test_a_re_enrolled_name_keeps_its_revoked_enrolment_and_a_revoked_key_needs_force(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.enrol_device("phone-07", 123, "ecdsa-sha2-nistp384 KEY1", "SHA256:one", {"gender": "female"})
    store.revoke_device("phone-07")
    for name in ("phone-07", "phone-09"):  # a revoked key may have leaked: refused under any name
        with pytest.raises(ValueError, match=r"\(SHA256:one\) was revoked on .*Z \(device 'phone-07'\).*--force"):
            store.check_enrolable(name, "ecdsa-sha2-nistp384 KEY1")
        with pytest.raises(ValueError, match="--force"):
            store.enrol_device(name, 124, "ecdsa-sha2-nistp384 KEY1", "SHA256:one")
    store.enrol_device("phone-07", 124, "ecdsa-sha2-nistp384 KEY2", "SHA256:two")  # a new key
    (current,) = store.enrolled_devices()
    assert (current.name, current.node_id, current.revoked_at) == ("phone-07", "124", None)
    old, new = RunStore(store.url).enrolled_devices(include_superseded=True)  # kept, in a new connection too
    assert new.id == current.id and old.superseded and not new.superseded
    assert (old.device_name, old.node_id, old.fingerprint, old.groups) == ("phone-07", "123", "SHA256:one",
                                                                           {"gender": "female"})
    assert old.revoked_at is not None
    with pytest.raises(ValueError, match="SHA256:one"):  # still known as revoked once its name moved on
        store.check_enrolable("phone-10", "ecdsa-sha2-nistp384 KEY1")
    store.revoke_device("phone-07")
    store.enrol_device("phone-07", 125, "ecdsa-sha2-nistp384 KEY1", "SHA256:one", force=True)  # the operator is sure
    assert [(d.device_name, d.node_id, d.revoked_at is None) for d in store.enrolled_devices(include_superseded=True)] \
        == [("phone-07", "123", False), ("phone-07", "124", False), ("phone-07", "125", True)]
    assert [(d.name, d.node_id) for d in store.enrolled_devices(include_revoked=False)] == [("phone-07", "125")]
    with pytest.raises(KeyError):  # only the current enrolment can be revoked
        store.revoke_device("phone-07~1")


def test_registry_and_flower_times_become_one_utc_format():
    import datetime as dt

    from server.store import utc_iso

    utc = dt.timezone.utc
    assert utc_iso(dt.datetime(2026, 11, 23, 7, 4, 19, 403687, tzinfo=utc)) == "2026-11-23T07:04:19Z"
    assert utc_iso(dt.datetime(2026, 11, 23, 7, 4, 19)) == "2026-11-23T07:04:19Z"  # SQLite: no zone, written UTC
    assert utc_iso(dt.datetime(2026, 11, 23, 8, 4, 19, tzinfo=dt.timezone(dt.timedelta(hours=1)))) == \
        "2026-11-23T07:04:19Z"
    assert utc_iso("2026-11-23 07:04:19Z") == "2026-11-23T07:04:19Z"  # Flower's
    assert utc_iso(None) == utc_iso("") == "" and utc_iso("N/A") == "N/A"


def test_a_dropped_device_does_not_count_as_proof_that_the_config_runs():
    """Only a device that trained shows the run's config can run; a round where one device
    dropped out and the others failed must leave the first-exchange fail-fast armed."""
    from types import SimpleNamespace

    from flwr.common.constant import ErrorCode

    from server.app import FailureWatch

    def reply(code=None):
        error = None if code is None else SimpleNamespace(code=code, reason="RuntimeError: no such device: cuda")
        return SimpleNamespace(has_error=lambda: error is not None, error=error)

    watch = FailureWatch("train")
    watch.check([reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)] * 2 + [reply(ErrorCode.NODE_UNAVAILABLE)], 3, 1)
    with pytest.raises(RuntimeError, match="no such device: cuda"):
        watch.check([reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)] * 3, 3, 2)
    trained = FailureWatch("train")  # once a device trained, a failing round is not the config's fault
    trained.check([reply(), reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)], 2, 1)
    trained.check([reply(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)] * 2, 2, 2)
