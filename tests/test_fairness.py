"""Fairness: per-group measures from sufficient statistics, FaiReg, the fair strategy."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from typer.testing import CliRunner

from fedaffect.cli import app as cli
from server.app import pooled_metrics
from server.simulation import prepare_run, simulate
from server.store import RunStore
from shared_models.config import RunConfig
from shared_models.fairness import (
    FaiRegParams,
    faireg_group_keys,
    faireg_params,
    fairness_summary,
    label_stats,
    normalise_data,
    pool_label_stats,
    spread,
)
from shared_models.metrics import ccc, ccc_sums, confusion
from shared_models.models import build_model
from shared_models.training import LocalData, evaluate_local, train_local
from strategies import build_strategy
from strategies.fair import group_balanced, FairAvg, fair_weights
from tests.conftest import write_tone_corpus

# --------------------------------------------------------------------------- measures


def _stats(y, p, a_true, a_pred, groups: dict):
    def one(m):
        return {"cm": confusion(y[m], p[m], 3), "sums_arousal": ccc_sums(a_pred[m], a_true[m]),
                "sums_valence": ccc_sums(a_pred[m], a_true[m]), "n": int(m.sum())}
    every = np.ones(len(y), bool)
    out = {k: v for k, v in one(every).items() if k != "n"}
    out["groups"] = {attr: {g: one(vals == g) for g in np.unique(vals)} for attr, vals in groups.items()}
    return out


def _random_federation(seed=0):
    """Devices with a 'gender' (incl. 'unknown') and an 'age' attribute; group 'female' is worse."""
    rng = np.random.default_rng(seed)
    parts, pooled = [], {k: [] for k in ("y", "p", "at", "ap", "gender", "age")}
    for n, gender in ((30, "female"), (50, "male"), (20, "female"), (10, "unknown")):
        y = rng.integers(0, 3, n)
        hit = 0.4 if gender == "female" else 0.8
        p = np.where(rng.random(n) < hit, y, rng.integers(0, 3, n))
        at = rng.uniform(-1, 1, n)
        ap = (0.3 if gender == "female" else 0.8) * at + 0.2 * rng.standard_normal(n) + (0.2 if gender == "male" else 0)
        g = np.array([gender] * n)
        age = np.where(rng.random(n) < 0.5, "young", "old")
        parts.append(_stats(y, p, at, ap, {"gender": g, "age": age}))
        for k, v in zip(pooled, (y, p, at, ap, g, age)):
            pooled[k].append(v)
    return parts, {k: np.concatenate(v) for k, v in pooled.items()}


def test_fairness_measures_from_sufficient_statistics_equal_pooled_predictions():
    parts, d = _random_federation()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero anywhere
        metrics, rows = pooled_metrics(parts)
    per = {(a, g, m): v for a, g, m, v in rows}
    for attr in ("gender", "age"):
        groups = sorted(set(d[attr]))
        acc, uar, rates, mse, pmean, cccs = {}, {}, [], {}, {}, {}
        for g in groups:
            m = d[attr] == g
            acc[g] = accuracy_score(d["y"][m], d["p"][m])
            uar[g] = balanced_accuracy_score(d["y"][m], d["p"][m])
            rates.append(np.bincount(d["p"][m], minlength=3) / m.sum())
            mse[g] = np.mean((d["ap"][m] - d["at"][m]) ** 2)
            pmean[g] = d["ap"][m].mean()
            cccs[g] = ccc(d["ap"][m], d["at"][m])
            assert per[(attr, g, "mse_arousal")] == pytest.approx(mse[g])
            assert per[(attr, g, "bias_arousal")] == pytest.approx(np.mean(d["ap"][m] - d["at"][m]))
            assert per[(attr, g, "pred_mean_arousal")] == pytest.approx(pmean[g])
        # "unknown" (clips without a value) has its rows but is no group to compare
        known = [i for i, g in enumerate(groups) if g != "unknown"]
        assert len(known) < len(groups) or attr == "age"
        acc, uar, mse, pmean, cccs = ({g: v for g, v in m.items() if g != "unknown"}
                                      for m in (acc, uar, mse, pmean, cccs))
        rates = np.array(rates)[known]
        assert metrics[f"gap_uar/{attr}"] == pytest.approx(max(uar.values()) - min(uar.values()))
        assert metrics[f"gap_ea/{attr}"] == pytest.approx(max(acc.values()) - min(acc.values()))
        assert metrics[f"gap_sp/{attr}"] == pytest.approx((rates.max(0) - rates.min(0)).max())
        assert metrics[f"gap_ea_arousal/{attr}"] == pytest.approx(max(mse.values()) - min(mse.values()))
        assert metrics[f"worst_mse_arousal/{attr}"] == pytest.approx(max(mse.values()))
        assert metrics[f"gap_sp_arousal/{attr}"] == pytest.approx(max(pmean.values()) - min(pmean.values()))
        assert metrics[f"worst_ccc_arousal/{attr}"] == pytest.approx(min(cccs.values()))
        assert metrics[f"gap_ccc_arousal/{attr}"] == pytest.approx(max(cccs.values()) - min(cccs.values()))
    assert {g for a, g, _ in per if a == "gender"} == {"female", "male", "unknown"}
    assert metrics["worst_uar/gender"] == pytest.approx(per[("gender", "female", "uar")])


def test_a_group_without_data_is_skipped_never_divided_by_zero():
    empty = {"cm": np.zeros((3, 3), int), "sums_arousal": np.zeros(6), "sums_valence": np.zeros(6), "n": 0}
    full = {"cm": np.array([[3, 1, 0], [0, 2, 0], [1, 0, 2]]), "sums_arousal": ccc_sums([0.1, 0.5, 0.9], [0, 0.4, 1]),
            "sums_valence": np.zeros(6), "n": 9}
    stats = [{"cm": full["cm"], "sums_arousal": full["sums_arousal"], "sums_valence": np.zeros(6),
              "groups": {"gender": {"female": full, "male": empty}}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics, rows = pooled_metrics(stats)
    assert metrics["worst_uar/gender"] == pytest.approx(np.mean([3 / 4, 1, 2 / 3]))
    for key in ("gap_uar", "gap_ea", "gap_sp", "gap_ccc_arousal", "gap_ea_arousal"):
        assert np.isnan(metrics[f"{key}/gender"]), key  # one group with data: no gap
    assert "gap_ccc_valence/gender" not in metrics  # nobody has valence labels
    assert spread([np.nan, 0.5, 0.7]) == pytest.approx((0.5, 0.2))
    assert spread({"a": 0.2, "b": 0.5}, higher_is_better=False) == pytest.approx((0.5, 0.3))
    assert all(np.isnan(v) for v in spread([]))
    assert fairness_summary({}) == {}


def test_unknown_protected_attribute_is_refused_with_the_known_columns(tone_manifest, tmp_path):
    cfg = RunConfig(manifest=str(tone_manifest), protected="gender,age", folds=1, run_dir=str(tmp_path),
                    cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"\['age'\].*columns: \[.*'gender'"):
        prepare_run(cfg, extract=False)
    with pytest.raises(ValueError, match="fair-attribute 'speaker' is not a protected attribute"):
        prepare_run(cfg.replace(protected="gender", strategy="fair", fair_attribute="speaker"), extract=False)
    with pytest.raises(ValueError, match="fair-attribute"):
        build_strategy(cfg.replace(protected="gender", strategy="fair", fair_attribute="age"), 3)
    with pytest.raises(ValueError, match="faireg"):
        prepare_run(cfg.replace(protected="gender", faireg="on", task="emotion"), extract=False)


def test_missing_attribute_values_count_in_an_unknown_group(tone_manifest, tmp_path, caplog):
    from client.app import load_device

    df = pd.read_csv(tone_manifest)
    df.loc[df["speaker"] == "s2", "gender"] = ""
    path = tmp_path / "m.csv"
    df.to_csv(path, index=False)
    cfg = RunConfig(manifest=str(path), folds=1, run_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING", logger="fedaffect"):
        cfg, n = prepare_run(cfg, progress=False)
    assert "6 of 24 clips have no 'gender'" in caplog.text
    groups = set()
    for i in range(n):
        groups |= set(load_device(cfg.to_mapping(), {"partition-id": i}).data.groups["gender"])
    assert groups == {"female", "male", "unknown"}


# --------------------------------------------------------------------------- fair weights


def test_fair_weights_against_hand_worked_numbers():
    n = [10, 30, 60, 0]
    groups = ["f", "m", "m", "f"]
    metric = {"f": 0.5, "m": 0.8}
    # FedAvg: n_k / n; the device without data gets 0.
    np.testing.assert_array_equal(fair_weights(n, groups, metric, 0.7, 0.0), [0.1, 0.3, 0.6, 0.0])
    # D = F - F_g = [0.2, -0.1, -0.1] over the devices with data, mean 0:
    # w = [0.1 + 0.2, 0.3 - 0.1, 0.6 - 0.1, 0] = [0.3, 0.2, 0.5, 0].
    np.testing.assert_allclose(fair_weights(n, groups, metric, 0.7, 1.0), [0.3, 0.2, 0.5, 0.0])
    # beta = 5: [0.1 + 1.0, 0.3 - 0.5 -> 0 (clipped), 0.6 - 0.5, 0] = [1.1, 0, 0.1] / 1.2.
    np.testing.assert_allclose(fair_weights(n, groups, metric, 0.7, 5.0), [1.1 / 1.2, 0.0, 0.1 / 1.2, 0.0])
    # A device holding two groups: D = 0.5 * 0.2 + 0.5 * (-0.1) = 0.05; mean D = (0.2 + 0.05) / 2.
    w = fair_weights([50, 50], ["f", {"f": 0.5, "m": 0.5}], metric, 0.7, 1.0)
    np.testing.assert_allclose(w, [0.5 + 0.075, 0.5 - 0.075])
    # A group without data and an undefined global metric change nothing.
    np.testing.assert_allclose(fair_weights([1, 3], ["f", "x"], {"f": np.nan}, 0.7, 2.0), [0.25, 0.75])
    np.testing.assert_allclose(fair_weights([1, 3], ["f", "m"], metric, np.nan, 2.0), [0.25, 0.75])
    # Nobody has data: all zero, no division by zero.
    np.testing.assert_array_equal(fair_weights([0, 0], ["f", "m"], metric, 0.7, 1.0), [0.0, 0.0])
    with pytest.raises(ValueError):
        fair_weights([1, -1], ["f", "m"], metric, 0.7, 1.0)
    with pytest.raises(ValueError):
        fair_weights([1, 1], ["f"], metric, 0.7, 1.0)


def test_group_balance_against_hand_worked_numbers():
    n = [10, 30, 60, 0]
    groups = ["f", "m", "m", "f"]
    metric = {"f": 0.5, "m": 0.8}
    # FedAvg's group totals: f 0.1, m 0.9. balance 0: both 0.5, devices keep their share within
    # their group: f [0.5], m [0.5 * 1/3, 0.5 * 2/3].
    np.testing.assert_allclose(fair_weights(n, groups, metric, 0.7, 0.0, balance=0.0), [0.5, 0.5 / 3, 1 / 3, 0.0])
    # balance 0.5: totals proportional to sqrt(0.1) and sqrt(0.9), i.e. 1 : 3 -> f 0.25, m 0.75.
    np.testing.assert_allclose(fair_weights(n, groups, metric, 0.7, 0.0, balance=0.5), [0.25, 0.25, 0.5, 0.0])
    # balance 1 is FedAvg; the fairness step then starts from the balanced weights:
    # [0.25, 0.25, 0.5] + 1 * ([0.2, -0.1, -0.1] - mean 0) = [0.45, 0.15, 0.4].
    np.testing.assert_array_equal(fair_weights(n, groups, metric, 0.7, 0.0, balance=1.0), [0.1, 0.3, 0.6, 0.0])
    np.testing.assert_allclose(fair_weights(n, groups, metric, 0.7, 1.0, balance=0.5), [0.45, 0.15, 0.4, 0.0])
    # a device holding both groups counts for each by its share; devices without a group form their own
    np.testing.assert_allclose(group_balanced(np.array([0.2, 0.8]), ["f", {"f": 0.5, "m": 0.5}], 0.0),
                               np.array([0.2 / 0.6 ** 1, 0.8 * (0.5 / 0.6 + 0.5 / 0.4)]) /
                               (0.2 / 0.6 + 0.8 * (0.5 / 0.6 + 0.5 / 0.4)))
    np.testing.assert_allclose(group_balanced(np.array([0.5, 0.5]), ["f", {}], 0.0), [0.5, 0.5])
    with pytest.raises(ValueError, match="balance"):
        fair_weights(n, groups, metric, 0.7, 1.0, balance=1.5)


@pytest.fixture
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 0, 1


def _reply(arrays: dict, n: int, gender: str, uar_hit: float, node: int):
    """A train reply: weights, num-examples, and pre-training statistics of one group."""
    cm = np.array([[round(10 * uar_hit), 10 - round(10 * uar_hit)], [10 - round(10 * uar_hit), round(10 * uar_hit)]])
    g = {"cm": cm.tolist(), "sums_arousal": [0] * 6, "sums_valence": [0] * 6, "n": n}
    pre = {"cm": cm.tolist(), "sums_arousal": [0] * 6, "sums_valence": [0] * 6, "num_examples": n,
           "groups": {"gender": {gender: g}}}
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
        "device": ConfigRecord({"name": f"dev-{node}", "pre-stats": json.dumps(pre),
                                "groups": json.dumps({"gender": [gender]})}),
    })
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def _replies(rng):
    specs = [(40, "male", 0.9), (35, "male", 0.8), (25, "female", 0.4), (0, "female", 0.5)]
    return [_reply({"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4)}, n, g, h, i + 1)
            for i, (n, g, h) in enumerate(specs)]


def test_beta_zero_is_exactly_fedavg_and_beta_moves_weight_to_the_group_behind(task_identity):
    replies = _replies(np.random.default_rng(0))
    fed, _ = FedAvg().aggregate_train(1, replies)
    fair0 = FairAvg(beta=0.0)
    arr0, metrics0 = fair0.aggregate_train(1, replies)
    for key in fed:
        np.testing.assert_array_equal(arr0[key].numpy(), fed[key].numpy())
    assert fair0.last_group_weights == pytest.approx(fair0.last_count_weights)
    assert fair0.last_count_weights == pytest.approx({"male": 0.75, "female": 0.25})

    fair = FairAvg(beta=1.0)
    arrays, metrics = fair.aggregate_train(1, replies)
    # Pooled pre-stats: UAR male = (0.9*20 + 0.8*20)/40 = 0.85, female = (0.4*20 + 0.5*20)/40 = 0.45,
    # global = (0.9 + 0.8 + 0.4 + 0.5) * 20 / 80 = 0.65. D over devices with data = [-0.2, -0.2, 0.2].
    h = fair.history[-1]
    assert h["global_metric"] == pytest.approx(0.65)
    assert h["group_metric"] == pytest.approx({"female": 0.45, "male": 0.85})
    # mean D = -0.2 / 3, so w = n_k / n + (D_k + 0.2 / 3); they still sum to 1, nothing clipped.
    expected = [0.4 - 0.2 + 0.2 / 3, 0.35 - 0.2 + 0.2 / 3, 0.25 + 0.2 + 0.2 / 3, 0.0]
    np.testing.assert_allclose(h["weights"], expected)
    assert fair.last_group_weights["female"] > fair.last_count_weights["female"] + 0.2
    want = sum(w * r.content["arrays"]["w"].numpy() for w, r in zip(h["weights"], replies))
    np.testing.assert_allclose(arrays["w"].numpy(), want, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(metrics0["train_loss"])


def test_devices_of_the_unknown_group_get_no_fairness_step(task_identity):
    """Clips without a value are no group: a device of them that trails the global model is
    not pulled up like a female device that trails it (the coordinator's gaps ignore it too)."""
    rng = np.random.default_rng(2)
    specs = [(40, "male", 0.9), (25, "female", 0.4), (25, "unknown", 0.2)]
    replies = [_reply({"w": rng.standard_normal((3, 4)).astype(np.float32)}, n, g, h, i + 1)
               for i, (n, g, h) in enumerate(specs)]
    fair = FairAvg(beta=1.0)
    fair.aggregate_train(1, replies)
    h = fair.history[-1]
    assert set(h["group_metric"]) == {"female", "male"}
    # global UAR .5: gaps male -.4, female +.1, unknown 0 (not its own -.3 behind); mean -.1
    np.testing.assert_allclose(h["weights"], [40 / 90 - 0.3, 25 / 90 + 0.2, 25 / 90 + 0.1])


def test_fair_strategy_tolerates_dropped_devices_and_missing_pre_stats(task_identity):
    replies = _replies(np.random.default_rng(1))
    replies[0].content["device"].pop("pre-stats")  # an old device: its group comes from "groups"
    strategy = FairAvg(beta=1.0)
    arrays, _ = strategy.aggregate_train(2, replies[:1] + replies[2:])  # device 2 dropped out
    assert arrays is not None and set(strategy.last_group_weights) == {"male", "female"}
    assert sum(strategy.last_group_weights.values()) == pytest.approx(1.0)
    assert strategy.history[-1]["weights"][-1] == 0.0  # no examples, no weight
    assert strategy.aggregate_train(3, []) == (None, None) and strategy.last_group_weights == {}


# --------------------------------------------------------------------------- FaiReg


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_fair_validation_clips_give_the_pre_stats_and_are_not_trained_on(tone_manifest, tmp_path, task_identity,
                                                                          fraction):
    from flwr.app import Context

    from client.app import app as client_app
    from client.app import load_device

    cfg, n = prepare_run(RunConfig(manifest=str(tone_manifest), folds=1, strategy="fair", fair_validation=fraction,
                                   run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")), progress=False)
    node = {"partition-id": 0, "num-partitions": n}
    device = load_device(cfg.to_mapping(), node)
    labelled = int((device.data.emotion >= 0).sum())
    model = build_model(cfg.model, len(device.emotions))
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord({"server-round": 1, "pre-stats": True})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_mapping())
    reply = client_app(msg, context)
    assert not reply.has_error()
    pre = json.loads(reply.content["device"]["pre-stats"])["num_examples"]
    trained = int(reply.content["metrics"]["num-examples"])
    if fraction == 0:
        assert pre == trained == labelled  # FairFed's local metric: the clips it trains on
    else:
        assert pre == round(fraction * labelled) and trained == labelled - pre  # disjoint, every clip used once


def test_faireg_statistics_pool_exactly_and_invert():
    rng = np.random.default_rng(0)
    av = rng.uniform(-0.9, 0.9, (200, 2))
    av[rng.random(200) < 0.1, 1] = np.nan  # some valence labels unknown
    gender = np.where(rng.random(200) < 0.4, "female", "male")
    age = np.where(rng.random(200) < 0.5, "young", "old")
    keys = faireg_group_keys({"gender": gender, "age": age}, ["gender", "age"], 200)
    assert set(keys) == {"female|young", "female|old", "male|young", "male|old"}
    direct = label_stats(av, keys)
    pooled = pool_label_stats([label_stats(av[s], keys[s]) for s in (slice(0, 70), slice(70, 130), slice(130, 200))])
    for g in direct:
        for dim in ("arousal", "valence"):
            np.testing.assert_allclose(pooled[g][dim], direct[g][dim])
    params = faireg_params(pooled, ["gender", "age"])
    for g in direct:
        m = keys == g
        for d in range(2):
            y = av[m, d][np.isfinite(av[m, d])]
            np.testing.assert_allclose(params.groups[g][d], [y.mean(), y.std()], atol=1e-12)
    np.testing.assert_allclose(params.pooled[0], [av[:, 0].mean(), av[:, 0].std()])
    params = FaiRegParams.from_json(params.to_json())
    z = params.normalise(av, keys)
    assert np.isnan(z).sum() == np.isnan(av).sum() and np.nanmax(np.abs(z)) <= 1
    back = params.denormalise_group(z, keys)
    ok = np.isfinite(av)
    np.testing.assert_allclose(back[ok], av[ok], atol=1e-6)
    # A group too small for its own statistics uses the pooled ones.
    small = faireg_params({"a": {"arousal": [1, 0.5, 0.25], "valence": [0, 0, 0]},
                           "b": {"arousal": [3, 0.0, 2.0], "valence": [0, 0, 0]}}, ["gender"])
    np.testing.assert_allclose(small.groups["a"], small.pooled)
    assert small.pooled[1, 1] == 1.0  # no valence at all: centring only, no division by zero


def _biased_arousal(seed: int):
    """True labels ``y`` (2000, 2), alternating genders, and labels whose women's arousal was
    rated compressed and higher (``0.5 y + 0.4``); returns y, gender, biased, female mask, keys."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(-0.8, 0.8, (2000, 2))
    gender = np.where(np.arange(2000) % 2 == 0, "female", "male")
    biased = y.copy()
    f = gender == "female"
    biased[f, 0] = 0.5 * y[f, 0] + 0.4
    return y, gender, biased, f, faireg_group_keys({"gender": gender}, ["gender"], 2000)


def test_faireg_removes_an_injected_per_group_affine_label_bias():
    y, gender, biased, f, keys = _biased_arousal(1)
    params = faireg_params(label_stats(biased, keys), ["gender"])
    restored = params.denormalise(params.normalise(biased, keys))

    def offset_gap(values):  # difference of the per-group linear maps truth -> values, at y = 0.5
        fits = {g: np.polyfit(y[gender == g, 0], values[gender == g, 0], 1) for g in ("female", "male")}
        return abs(np.polyval(fits["female"], 0.5) - np.polyval(fits["male"], 0.5)), fits

    before, _ = offset_gap(biased)
    after, fits = offset_gap(restored)
    assert before > 0.1 and after < 0.2 * before  # at least 80 % of the bias removed
    np.testing.assert_allclose(fits["female"], fits["male"], atol=0.05)


def test_faireg_reference_group_keeps_the_bias_off_the_label_scale():
    y, gender, biased, f, keys = _biased_arousal(2)
    stats = label_stats(biased, keys)
    pooled = faireg_params(stats, ["gender"])
    reference = faireg_params(stats, ["gender"], reference="male")
    # Mapped back with the pooled statistics, every clip carries part of the women's bias; with
    # the statistics of the group labelled without bias, the truth comes back for both groups.
    # (up to the sampling difference between the two groups' true label distributions).
    restored = reference.denormalise(reference.normalise(biased, keys))
    np.testing.assert_allclose(restored, y, atol=0.05)
    assert abs((restored - y)[f, 0].mean()) < 0.05 * (biased - y)[f, 0].mean()  # >= 95 % of the shift gone
    shift = pooled.denormalise(pooled.normalise(biased, keys))[:, 0] - y[:, 0]
    assert shift.mean() > 0.1
    with pytest.raises(ValueError, match="known: female, male"):
        faireg_params(stats, ["gender"], reference="unknown")


def test_faireg_training_removes_label_bias_from_predictions():
    """A model that can tell the groups apart learns a labelling bias; FaiReg unlearns it."""
    rng = np.random.default_rng(0)
    n = 200
    y = rng.uniform(-0.8, 0.8, n)
    female = np.arange(n) % 2 == 0
    x = rng.standard_normal((n, 88)).astype(np.float32)
    x[:, :4] += 2 * y[:, None]
    x[:, 4:8] += np.where(female, 2.0, -2.0)[:, None]  # the group is audible
    gender = np.where(female, "female", "male")
    clean = np.stack([y, np.full(n, np.nan)], 1).astype(np.float32)
    biased = clean.copy()
    biased[female, 0] = 0.5 * y[female] + 0.4
    emotion = np.full(n, -1)

    def group_bias(data_train, av_map=None):
        torch.manual_seed(0)
        model = build_model("egemaps-mlp", 2)
        train_local(model, data_train, task="av", epochs=15, lr=3e-3, batch_size=50, seed=0)
        test = LocalData(list(x), emotion, clean, {"gender": gender})
        res = evaluate_local(model, test, task="av", n_classes=2, av_map=av_map)
        g = res["groups"]["gender"]
        bias = {k: (v["sums_arousal"][1] - v["sums_arousal"][2]) / v["sums_arousal"][0] for k, v in g.items()}
        return bias["female"] - bias["male"]

    clean_gap = group_bias(LocalData(list(x), emotion, clean, {"gender": gender}))
    biased_data = LocalData(list(x), emotion, biased, {"gender": gender})
    biased_gap = group_bias(biased_data)
    keys = faireg_group_keys(biased_data.groups, ["gender"], n)
    params = faireg_params(label_stats(biased, keys), ["gender"])
    faireg_gap = group_bias(normalise_data(biased_data, params), params.denormalise)
    assert abs(biased_gap - clean_gap) > 0.1
    assert abs(faireg_gap - clean_gap) < 0.2 * abs(biased_gap - clean_gap)


# --------------------------------------------------------------------------- federations


@pytest.fixture(scope="module")
def minority_manifest(tmp_path_factory):
    """4 male speakers and 1 female one whose voice carries the emotions the other way round
    (her anger is low and soft): a model fit to the majority fails her."""
    root = tmp_path_factory.mktemp("minority")
    males = (("m1", "male"), ("m2", "male"), ("m3", "male"), ("m4", "male"))
    df = pd.concat([write_tone_corpus(root / "audio", speakers=males, clips=4, seed=3),
                    write_tone_corpus(root / "audio", speakers=(("f1", "female"),), emotions=("sadness", "anger"),
                                      clips=4, seed=4)], ignore_index=True)
    path = root / "minority.csv"
    df.to_csv(path, index=False)
    return path


def _weights(summary, metric):
    store = RunStore(summary["config"]["store-url"])
    run = store.get_run(summary["runs"][0])
    rows = [r for r in store.group_metrics(run.id) if r["metric"] == metric and r["group"] == "female"]
    return np.array([r["value"] for r in sorted(rows, key=lambda r: r["round"])])


def test_two_group_federation_gives_the_group_behind_more_weight_than_fedavg(minority_manifest, tmp_path):
    base = RunConfig(manifest=str(minority_manifest), folds=1, num_server_rounds=3, local_epochs=1, task="emotion",
                     strategy="fair", run_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    fair = simulate(base.replace(fair_beta=2.0, run_name="fair"), all_folds=False, progress=False)
    fedavg = simulate(base.replace(fair_beta=0.0, fair_balance=1.0, run_name="fedavg"), all_folds=False,
                      progress=False)
    w_fair, w_fedavg = _weights(fair, "agg_weight"), _weights(fedavg, "agg_weight")
    np.testing.assert_allclose(_weights(fedavg, "count_weight"), w_fedavg)  # beta 0, balance 1 = FedAvg's weights
    np.testing.assert_allclose(w_fedavg, 0.2)  # 1 of 5 equally sized devices
    assert w_fair.mean() > w_fedavg.mean() + 0.05, (w_fair, w_fedavg)
    final = fair["final"]
    assert "gap_uar/gender" in final and "gap_ea/gender" in final and "gap_sp/gender" in final
    assert set(fair["per_group"]["gender"]["female"]) >= {"uar", "agg_weight", "count_weight"}


def test_cli_fair_strategy_with_faireg_writes_gap_and_weight_figures(tone_manifest, tmp_path):
    out = tmp_path / "summary.json"
    res = CliRunner().invoke(cli, [
        "simulate", "--manifest", str(tone_manifest), "--folds", "2", "--fold", "0", "--rounds", "2",
        "--task", "both", "--strategy", "fair", "--set", "fair-beta=2", "--set", "faireg=on",
        "--run-dir", str(tmp_path / "runs"), "--summary-json", str(out), "--set", f"cache-dir='{tmp_path / 'c'}'",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert summary["config"]["fair-beta"] == 2.0 and summary["config"]["faireg"] == "on"
    rounds = summary["folds"][0]["rounds"]
    assert np.isfinite(rounds[-1]["ccc_arousal"]) and np.isfinite(rounds[-1]["uar"])
    report = tmp_path / "runs" / summary["runs"][-1] / "report"
    for png in ("gap.png", "weights.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "weights.png" in (report / "index.html").read_text()


def test_qfedavg_runs_end_to_end(tone_manifest, tmp_path):
    cfg = RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=2, local_epochs=1, task="both",
                    strategy="qfedavg", run_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    summary = simulate(cfg, all_folds=False, progress=False)
    last = summary["folds"][0]["rounds"][-1]
    assert last["train_devices"] == 4 and np.isfinite(last["uar"]) and np.isfinite(last["train_loss"])


def test_a_device_with_nothing_labelled_leaves_qfedavg_and_the_round_loss_finite(tone_manifest, tmp_path):
    """A self-labelling device whose clips are all unlabelled trains on nothing in its first
    rounds (num-examples 0, NaN loss): q-FFL weighs updates by the loss, so that reply used to
    turn the global model into NaN, and FedAvg's round loss became NaN."""
    df = pd.read_csv(tone_manifest)
    df.loc[df["speaker"] == "s1", ["emotion", "arousal", "valence"]] = np.nan
    manifest = tmp_path / "s1-unlabelled.csv"
    df.to_csv(manifest, index=False)
    for strategy in ("qfedavg", "fedavg"):
        cfg = RunConfig(manifest=str(manifest), folds=1, num_server_rounds=2, local_epochs=1, task="emotion",
                        strategy=strategy, mode="self-labelling", run_dir=str(tmp_path / strategy),
                        cache_dir=str(tmp_path / "cache"))
        summary = simulate(cfg, all_folds=False, progress=False)
        rounds = summary["folds"][0]["rounds"]
        assert rounds[1]["train_devices"] == 4  # s1 answered, with nothing to train on
        assert all(np.isfinite(r["train_loss"]) for r in rounds[1:]), (strategy, rounds)
        assert np.isfinite(rounds[-1]["uar"]) and np.isfinite(rounds[-1]["eval_loss"]), (strategy, rounds)
