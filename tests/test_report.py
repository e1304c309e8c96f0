"""The run report's confusion matrix (server/report.py)."""

import warnings

import numpy as np
import pytest

from server import report
from server.report import CONFUSION_KEY, confusion_rates, final_confusion, write_report
from server.store import RunStore

#: Final-round pooled counts of a 4-class run: "fear" (row 2) had no clip evaluated.
COUNTS = [[3, 1, 0, 0],
          [0, 5, 0, 5],
          [0, 0, 0, 0],
          [2, 2, 0, 4]]
EMOTIONS = "anger,happiness,fear,neutral"


def test_confusion_rates_normalise_each_true_class_and_leave_a_class_without_clips_at_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn (RuntimeWarning: invalid value)
        rates = confusion_rates(COUNTS)
    # worked by hand: each row divided by its total (4, 10, 0, 8); the empty row stays 0
    assert rates == pytest.approx(np.array([[0.75, 0.25, 0.0, 0.0],
                                            [0.0, 0.5, 0.0, 0.5],
                                            [0.0, 0.0, 0.0, 0.0],
                                            [0.25, 0.25, 0.0, 0.5]]))
    assert np.isfinite(rates).all()
    assert confusion_rates([[0, 0], [0, 0]]) == pytest.approx(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="square"):
        confusion_rates([[1, 2, 3], [4, 5, 6]])


def test_final_confusion_reads_the_last_rounds_counts_only():
    rounds = [{"round": 0, CONFUSION_KEY: [[9, 0], [0, 9]]}, {"round": 1, CONFUSION_KEY: [[1, 2], [3, 4]]}]
    last, counts = final_confusion(rounds)
    assert last == 1 and counts.tolist() == [[1, 2], [3, 4]] and counts.dtype == np.int64
    assert final_confusion([]) is None
    assert final_confusion([{"round": 0, "uar": 0.5}]) is None  # nothing stored
    assert final_confusion([{"round": 0, CONFUSION_KEY: None}]) is None  # blanked (task av)
    assert final_confusion([{"round": 0, CONFUSION_KEY: [[0, 0], [0, 0]]}]) is None  # nothing evaluated
    assert final_confusion(rounds[:1] + [{"round": 1, "uar": 0.5}]) is None  # not an older round's


def _store_run(tmp_path, name, task, final_counts):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run(name, {"model": "egemaps-mlp", "task": task, "emotions": EMOTIONS}, engine="inprocess")
    held_out = [{"device": "dev-09", "role": "heldout", "phase": "evaluate", "metrics": {"num-examples": 22}}]
    store.add_round(run.id, 0, {"uar": 0.25, "eval_loss": 1.4, CONFUSION_KEY: [[1] * 4] * 4}, held_out)
    final = {"uar": 0.4375, "eval_loss": 1.1}
    if final_counts is not None:
        final[CONFUSION_KEY] = final_counts
    store.add_round(run.id, 1, final, held_out)
    return store


def test_report_draws_the_final_rounds_confusion_matrix(tmp_path, monkeypatch):
    store = _store_run(tmp_path, "emo", "emotion", COUNTS)
    drawn = []
    close = report.plt.close
    monkeypatch.setattr(report.plt, "close", lambda fig=None: (drawn.append(fig), close(fig)))
    page = write_report(store, "emo", tmp_path / "report")
    png = tmp_path / "report" / "confusion.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert 'src="confusion.png"' in page.read_text()
    fig = next(f for f in drawn if f is not None and "confusion" in f.axes[0].get_title())
    ax = fig.axes[0]
    assert "round 1" in ax.get_title() and "held-out" in ax.get_title()
    # colour: the row-normalised matrix; text: the counts, row by row
    assert np.asarray(ax.images[0].get_array()) == pytest.approx(confusion_rates(COUNTS))
    assert [int(t.get_text()) for t in ax.texts] == [c for row in COUNTS for c in row]
    assert [t.get_text() for t in ax.get_xticklabels()] == EMOTIONS.split(",")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["anger (4)", "happiness (10)", "fear (0)", "neutral (8)"]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel().startswith("true")


def test_report_of_an_av_run_has_no_confusion_matrix(tmp_path):
    store = _store_run(tmp_path, "dims", "av", COUNTS)
    page = write_report(store, "dims", tmp_path / "report")
    assert not (tmp_path / "report" / "confusion.png").exists()
    assert "confusion" not in page.read_text().split("<h2>Configuration")[0]
    assert (tmp_path / "report" / "loss.png").exists()  # the rest of the report is drawn


def test_report_of_a_run_without_stored_counts_says_so(tmp_path):
    store = _store_run(tmp_path, "old", "emotion", None)  # the final round stored no counts
    page = write_report(store, "old", tmp_path / "report").read_text()
    assert not (tmp_path / "report" / "confusion.png").exists()
    assert "confusion.png" not in page and "No confusion matrix" in page


def test_a_simulated_run_stores_its_pooled_confusion_counts_and_the_report_draws_them(tone_manifest, tmp_path):
    from server.simulation import simulate
    from shared_models.config import RunConfig

    cfg = RunConfig(manifest=str(tone_manifest), folds=2, fold=0, num_server_rounds=1, local_epochs=1,
                    run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    summary = simulate(cfg, all_folds=False, progress=False)
    store = RunStore(summary["config"]["store-url"])
    run = store.get_run(summary["runs"][0])
    rounds = store.rounds(run.id)
    held_out = [d for d in store.device_metrics(run.id) if d["phase"] == "evaluate" and d["round"] == 1]
    counts = np.asarray(rounds[-1][CONFUSION_KEY])
    assert counts.shape == (2, 2) and counts.sum() == sum(d["num-examples"] for d in held_out) > 0
    assert np.trace(counts) / counts.sum() == pytest.approx(rounds[-1]["wa"])  # WA = accuracy of these counts
    page = write_report(store, run.name, tmp_path / "report")
    assert 'src="confusion.png"' in page.read_text()


def test_report_figures_name_metrics_and_gaps_readably_and_count_pseudo_labels_from_zero(tmp_path, monkeypatch):
    """Legends and axes said ``gap_sp/gender``, ``ccc_arousal`` and ``held-out CCC_AROUSAL``; the
    pseudo-label axis of labels.png ran below 0 (no pseudo-labels yet) and was drawn in mode
    ``active``, which never pseudo-labels."""
    from server.report import metric_label

    assert metric_label("gap_sp/gender") == "Statistical Parity gap, gender"
    assert metric_label("gap_ea_arousal/age_group") == "Equal Accuracy gap (arousal), age_group"
    assert metric_label("ccc_arousal") == "CCC arousal" and metric_label("n") == "n"
    drawn = []
    close = report.plt.close
    monkeypatch.setattr(report.plt, "close", lambda fig=None: (drawn.append(fig), close(fig)))
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    held_out = [{"device": "dev-09", "role": "heldout", "phase": "evaluate", "metrics": {"num-examples": 22}}]
    for mode, task in (("active", "av"), ("cooperative", "emotion")):
        run = store.create_run(mode, {"model": "egemaps-mlp", "task": task, "mode": mode, "label-fraction": 0.1,
                                      "emotions": EMOTIONS}, engine="inprocess")
        for r in range(3):
            store.add_round(run.id, r, {"uar": 0.3, "ccc_arousal": 0.1 * r, "coop_human_labels": 10.0 + r,
                                        "coop_pseudo_total": 0.0, "gap_sp/gender": 0.1, "gap_uar/gender": 0.2},
                            held_out)
        drawn.clear()
        write_report(store, mode, tmp_path / mode)
        (labels,) = [f for f in drawn if f is not None and "learning curve" in f.axes[0].get_title()]
        (gaps,) = [f for f in drawn if f is not None and "group gaps" in f.axes[0].get_title()]
        legend = [t.get_text() for t in gaps.axes[0].get_legend().get_texts()]
        assert "Statistical Parity gap, gender" in legend and not any("gap_" in t for t in legend)
        if mode == "active":
            assert len(labels.axes) == 1 and labels.axes[0].get_ylabel() == "CCC arousal"
        else:
            assert labels.axes[0].get_ylabel() == "UAR" and labels.axes[1].get_ylim()[0] == 0
