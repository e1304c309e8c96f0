"""Cooperative learning: schedules, pseudo-label selection and re-check, the raters' stopping
rule, transfer learning, and a 3-device federation in cooperative mode."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.cooperative import (
    CoopState,
    CoopTracker,
    Oracle,
    ask_raters,
    av_to_label_scale,
    clip_vectors,
    knn_labels,
    faireg_of,
    freeze_frontend,
    label_split,
    least_certain,
    recheck_av_pseudo_labels,
    recheck_pseudo_labels,
    required_agreement,
    round_settings,
    select_av_pseudo_labels,
    select_pseudo_labels,
    threshold_schedule,
)
from client.device_store import DeviceStore
from client.transfer import load_initial
from fedaffect.cli import app as cli
from server.simulation import simulate
from server.store import RunStore
from shared_models.config import MODES, RunConfig
from shared_models.models import build_model
from shared_models.training import LocalData, train_local


# -- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("r,expected", [(0, 0.5), (2, 0.9 - 0.2 * (1 + math.cos(math.pi * 0.2))), (5, 0.7),
                                        (10, 0.9), (12, 0.9)])
def test_cosine_schedule_is_fedstar(r, expected):
    assert threshold_schedule(r, 10) == pytest.approx(expected)
    assert threshold_schedule(r, 10, "cosine", 0.5, 0.9) == pytest.approx(0.9 - 0.2 * (1 + math.cos(math.pi * min(r, 10) / 10)))


@pytest.mark.parametrize("r,expected", [(0, 0.5), (3, 0.62), (10, 0.9)])
def test_linear_schedule(r, expected):
    assert threshold_schedule(r, 10, "linear") == pytest.approx(expected)


def test_round_settings_carry_the_schedule_and_budgets():
    cfg = RunConfig(num_server_rounds=4, mode="cooperative", pseudo_schedule="linear", pseudo_start=0.5,
                    pseudo_end=0.9, freeze_rounds=1, query_per_round=3, rater_reliability="0.9,0.7")
    r1, r2 = round_settings(cfg, 1), round_settings(cfg, 2)
    assert r1["pseudo-threshold"] == pytest.approx(0.6) and r2["pseudo-threshold"] == pytest.approx(0.7)
    assert (r1["freeze"], r2["freeze"]) == (1, 0)
    assert r1["query-per-round"] == 3 and r1["rater-reliability"] == "0.9,0.7" and r1["coop-mode"] == "cooperative"
    with pytest.raises(ValueError):
        threshold_schedule(1, 10, "exponential")
    assert MODES == ("supervised", "self-labelling", "active", "cooperative")


def test_bad_cooperative_config_is_named():
    from shared_models.config import ConfigError

    for key, value in (("mode", "lazy"), ("rater-reliability", "0.9,1.5"), ("pseudo-start", 1.2),
                       ("upsample", 2), ("agreement-min", 5)):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            RunConfig.from_mapping({key: value})


# -- labelled and unlabelled clips -----------------------------------------------------------
def test_label_split_is_stratified_seeded_and_pure():
    strata = ["a"] * 10 + ["b"] * 6 + ["c"] * 4 + [""] * 3
    keep = label_split(strata, 0.25, (0, 1))
    assert keep.sum() == 5 and not keep[-3:].any()  # round(0.25 * 20); unlabelled clips never kept
    assert {s for s, k in zip(strata, keep) if k} == {"a", "b", "c"}  # every class kept at least once
    assert (label_split(strata, 0.25, (0, 1)) == keep).all()  # pure: same inputs, same split
    assert any((label_split(strata, 0.25, (s, 1)) != keep).any() for s in range(1, 6))
    assert label_split(strata, 1.0, 0).sum() == 20
    assert label_split(strata, 0.01, 0).sum() == 1  # at least one label
    half = label_split(strata, 0.5, 3)
    assert [sum(k for s, k in zip(strata, half) if s == c) for c in "abc"] == [5, 3, 2]


# -- pseudo-label selection --------------------------------------------------------------------
def _views(*clips):
    """(V, N, 2) probabilities from per-clip lists of P(class 0) per view."""
    p0 = np.array(clips, dtype=float).T  # (V, N)
    return np.stack([p0, 1 - p0], axis=-1)


def test_pseudo_labels_need_the_threshold_and_view_agreement():
    probs = _views(
        [0.95, 0.96, 0.95],  # 0: confident and agreeing -> class 0
        [0.85, 0.86, 0.84],  # 1: agreeing but below the threshold
        [0.99, 0.99, 0.45],  # 2: mean 0.81 < 0.9 and one view disagrees
        [0.99, 0.99, 0.90],  # 3: mean 0.96 but the views vary (std 0.042 > 0.02)
        [0.02, 0.03, 0.02],  # 4: confident class 1
    )
    idx, labels, conf = select_pseudo_labels(probs, threshold=0.9, max_std=0.02, per_class=0)
    assert idx.tolist() == [0, 4] and labels.tolist() == [0, 1]
    assert conf == pytest.approx([0.9533, 0.9767], abs=1e-3)
    idx, _, _ = select_pseudo_labels(probs, 0.9, 0.05, 0)  # looser agreement admits clip 3
    assert idx.tolist() == [0, 3, 4]
    idx, _, _ = select_pseudo_labels(probs, 0.9, 0.02, 0, candidates=[True, True, True, True, False])
    assert idx.tolist() == [0]
    disagree = _views([0.95, 0.95, 0.95, 0.4])  # 4 views, the last one says class 1
    assert select_pseudo_labels(disagree, 0.5, 1.0, 0)[0].size == 0


def test_per_class_cap_keeps_the_most_confident():
    probs = _views(*[[p] * 3 for p in (0.91, 0.97, 0.93, 0.99, 0.95, 0.92, 0.05, 0.02)])
    idx, labels, _ = select_pseudo_labels(probs, 0.9, 0.01, per_class=2)
    assert idx.tolist() == [1, 3, 6, 7] and labels.tolist() == [0, 0, 1, 1]
    assert select_pseudo_labels(probs, 0.9, 0.01, per_class=0)[0].size == 8


def test_recheck_drops_labels_the_model_no_longer_supports():
    probs = np.array([
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.45, 0.3, 0.25]],
        [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.45, 0.3, 0.25]],
    ])  # (V=2, K=3, C=3)
    keep = recheck_pseudo_labels(probs, np.array([0, 1, 0]), keep=0.5)
    assert keep.tolist() == [True, False, False]  # clip 1 now class 0; clip 2 only 0.45
    av = np.array([[[0.6, -0.5], [0.1, 0.4]], [[0.62, -0.5], [0.3, 0.4]]])  # (V=2, K=2, 2)
    assert recheck_av_pseudo_labels(av, np.array([[0.5, -0.4], [-0.6, 0.4]]), max_std=0.05).tolist() == [True, False]
    idx, values = select_av_pseudo_labels(av, max_std=0.05)
    assert idx.tolist() == [0] and values[0] == pytest.approx([0.61, -0.5])


def test_least_certain_and_required_agreement():
    u = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert least_certain(u, 2).tolist() == [1, 3]
    assert least_certain(u, 2, candidates=[True, False, True, True, True]).tolist() == [3, 2]
    assert least_certain(u, 0).size == 0
    assert [required_agreement(x, 2, 4) for x in (0.0, 0.2, 0.3, 0.5, 1.0, 7.0)] == [2, 2, 3, 3, 4, 4]


def test_views_mc_dropout_and_upsampling():
    from client.cooperative import upsample, view_predictions

    torch.manual_seed(0)
    model = build_model("egemaps-mlp", 3).train()
    xs = [np.random.default_rng(i).standard_normal(88).astype(np.float32) for i in range(5)]
    probs, av = view_predictions(model, xs, views=4, noise=0.0)
    assert probs.shape == (4, 5, 3) and av.shape == (4, 5, 2) and np.allclose(probs, probs[0])
    assert model.training  # the model's mode is restored
    mc, mc_av = view_predictions(model, xs, views=4, noise=0.0, mc_dropout=True, seed=1)
    assert not np.allclose(mc, mc[0]) and not np.allclose(mc_av, mc_av[0])  # dropout samples differ
    assert np.allclose(view_predictions(model, xs, views=4, noise=0.0, mc_dropout=True, seed=1)[0], mc)  # seeded
    state = torch.get_rng_state()
    noisy, _ = view_predictions(model, xs, views=3, noise=0.5, max_numbers=88 * 3 * 2)  # 2 clips per pass
    view_predictions(model, xs, views=2, noise=0.0, mc_dropout=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is left as it was
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()  # a part the caller holds in eval mode stays so; the rest returns to training
    view_predictions(model, xs, views=2, noise=0.1)
    assert not frozen.training and model.training
    assert view_predictions(model, [], views=2, noise=0.1)[0].shape == (2, 0, 3) and model.training
    frozen.train()
    assert np.allclose(noisy[0], probs[0], atol=1e-6) and not np.allclose(noisy[1], noisy[0])
    only_noisy, _ = view_predictions(model, xs, views=1, noise=0.5, include_clean=False)
    assert not np.allclose(only_noisy[0], probs[0], atol=1e-3)
    data = LocalData(xs, np.array([0, 0, 0, 1, -1]), np.full((5, 2), np.nan))
    even = upsample(data)
    assert np.bincount(even.emotion[even.emotion >= 0]).tolist() == [3, 3] and (even.emotion == -1).sum() == 1


# -- the raters' stopping rule, worked by hand -----------------------------------------------
@pytest.mark.parametrize("answers,required,cap,label,effort,agreed", [
    ([1, 1, 0, 0], 2, 5, 1, 2, True),          # the first two agree: stop after 2
    ([0, 1, 0], 2, 5, 0, 3, True),             # 0, 1, 0: two zeros after 3 answers
    ([0, 1, 2, 1], 2, 5, 1, 4, True),
    ([2, 2, 1, 2], 3, 5, 2, 4, True),          # three must agree
    ([1, 1, 0], 4, 3, 1, 3, False),            # 4 needed but only 3 raters: majority
    ([0, 1, 2, 3, 4, 0], 2, 5, 0, 5, False),   # no agreement in 5: tie -> most reliable rater's label
    ([3, 1, 1, 3], 3, 4, 3, 4, False),         # 2-2 tie: raters of 3 (0.9 + 0.6) beat those of 1 (0.8 + 0.7)
])
def test_rater_stopping_rule(answers, required, cap, label, effort, agreed):
    asked = []

    def raters():
        for a in answers:
            asked.append(a)
            yield a

    result = ask_raters(raters(), required, cap, reliabilities=[0.9, 0.8, 0.7, 0.6, 0.5])
    assert (result.label, result.effort, result.agreed) == (label, effort, agreed)
    assert len(asked) <= effort + 1 and result.answers == answers[:effort]  # nobody asked after the stop


def test_oracle_asks_the_most_reliable_first_and_raises_agreement_with_uncertainty():
    rng = np.random.default_rng(0)
    perfect = Oracle([1.0, 1.0, 1.0, 1.0], a_min=2, a_max=4, max_raters=4, n_classes=3)
    assert perfect.answer(2, None, 0.0, rng)[2].effort == 2
    assert perfect.answer(2, None, 1.0, rng)[2].effort == 4
    liar = Oracle([0.0, 0.0, 0.0], a_min=2, a_max=2, max_raters=3, n_classes=2)
    label, _, result = liar.answer(1, None, 0.0, rng)
    assert label == 0 and result.effort == 2  # always the other class (two classes)
    mixed = Oracle([0.0, 1.0, 1.0], a_min=2, a_max=2, max_raters=3, n_classes=4)
    assert mixed.reliabilities == [1.0, 1.0, 0.0]
    label, av, result = mixed.answer(3, np.array([0.5, -0.5], np.float32), 0.0, rng)
    assert (label, result.answers) == (3, [3, 3]) and av == pytest.approx([0.5, -0.5])
    capped = Oracle([1.0, 1.0], a_min=3, a_max=3, max_raters=5, n_classes=3)
    assert capped.answer(0, None, 0.0, rng)[2].effort == 2  # cap = number of raters: majority


# -- the device's step with a model whose mind we change -------------------------------------
def _coop_state(tmp_path, mode="self-labelling", n=6, align=0):
    # no distribution alignment unless asked: these models call the whole pool one class
    # no cap on the pseudo-labelled share of the pool either, unless a test sets one
    cfg = RunConfig(mode=mode, task="emotion", pseudo_per_class=0, query_per_round=2, query_total=3, pseudo_align=align,
                    pseudo_max_share=1.0)
    rng = np.random.default_rng(0)
    data = LocalData([rng.standard_normal(88).astype(np.float32) for _ in range(n)],
                     np.array([0, 1] + [-1] * (n - 2)), np.full((n, 2), np.nan))
    truth = np.array([0, 1] + [0] * (n - 2))
    state = CoopState(cfg, tmp_path / "dev", [f"/clips/{i}.wav" for i in range(n)], np.full(n, 1.0),
                      ["anger", "sadness"], data.emotion >= 0, truth, np.full((n, 2), np.nan))
    return cfg, data, state


def _biased(cls):
    torch.manual_seed(0)
    model = build_model("egemaps-mlp", 2)
    with torch.no_grad():
        model.emotion.weight.zero_()
        model.emotion.bias.copy_(torch.tensor([8.0, -8.0]) if cls == 0 else torch.tensor([-8.0, 8.0]))
    return model


def test_distribution_alignment_by_hand():
    from client.cooperative import align_distribution

    probs = np.array([[[0.6, 0.4], [0.8, 0.2]]])  # pool mean (0.7, 0.3); the labels say 50/50
    aligned = align_distribution(probs, np.array([1.0, 1.0]))
    # (0.6 / 0.7, 0.4 / 0.3) = (0.857, 1.333) -> (0.391, 0.609); (0.8 / 0.7, 0.2 / 0.3) -> (0.632, 0.368)
    assert np.allclose(aligned[0], [[0.3913, 0.6087], [0.6316, 0.3684]], atol=1e-4)
    assert np.allclose(align_distribution(probs, np.array([7.0, 3.0])), probs)  # already matches the prior
    assert align_distribution(np.zeros((2, 0, 3)), np.ones(3)).shape == (2, 0, 3)


@pytest.mark.parametrize("align, added", [(0, 4), (1, 0)])
def test_a_model_that_calls_the_whole_pool_one_class_is_not_believed_with_alignment(tmp_path, align, added):
    cfg, data, state = _coop_state(tmp_path, align=align)  # the person labelled one clip of each class
    report = state.after_training(_biased(0), data, {**round_settings(cfg, 1), "pseudo-threshold": 0.9}, 1)
    assert report["added"] == added


def test_device_step_adds_then_drops_when_the_model_changes_its_mind(tmp_path):
    cfg, data, state = _coop_state(tmp_path)
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": 0.9}
    report = state.after_training(_biased(0), data, round_cfg, 1)
    assert (report["added"], report["dropped"], report["pseudo_total"]) == (4, 0, 4)
    assert report["pseudo_correct"] == 4 and report["queries"] == 0  # truth of the pool is class 0
    train = state.training_data(data)
    assert (train.emotion == np.array([0, 1, 0, 0, 0, 0])).all()  # pseudo-labels join the training set
    report = state.after_training(_biased(1), data, {**round_cfg, "pseudo-threshold": 1.1}, 2)
    assert (report["dropped"], report["added"], report["pseudo_total"]) == (4, 0, 0)
    history = DeviceStore(tmp_path / "dev").pseudo_history("/clips/2.wav")
    assert history[0]["round_dropped"] == 2 and history[0]["reason"] == "model changed its mind"


@pytest.mark.parametrize("global_view, global_cls, added", [(1, 1, 0), (1, 0, 4), (0, 1, 4)])
def test_the_received_global_model_must_agree_with_a_pseudo_label(tmp_path, global_view, global_cls, added):
    cfg, data, state = _coop_state(tmp_path)
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": 0.9, "pseudo-global-view": global_view}
    state.before_training(_biased(global_cls), data, round_cfg, 1)  # the model as received
    report = state.after_training(_biased(0), data, round_cfg, 1)  # the model after local training
    assert report["added"] == added


@pytest.mark.parametrize("knn, model_cls, added", [(1, 0, 4), (1, 1, 0), (0, 1, 4)])
def test_a_pseudo_label_needs_the_nearest_human_labels_with_pseudo_knn(tmp_path, knn, model_cls, added):
    # The pool clips lie next to the person's "anger" clip: with pseudo-knn a model that
    # calls them "sadness" gets no pseudo-label; without it, it does.
    cfg, data, state = _coop_state(tmp_path)
    sign = np.array([1.0, -1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    data.x = [5 * s + 0.1 * x for s, x in zip(sign, data.x)]
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": 0.9, "pseudo-knn": knn}
    for r in (1, 2):  # the second round reuses the device's clip vectors
        report = state.after_training(_biased(model_cls), data, {**round_cfg, "server-round": r}, r)
        assert report["added"] == (added if r == 1 else 0)


@pytest.mark.parametrize("share, added", [(1.0, 8), (0.5, 4), (0.0, 0)])
def test_pseudo_max_share_keeps_only_the_most_confident_part_of_the_pool(tmp_path, share, added):
    # 8 pool clips the model is sure of, some surer than others: a share of the pool caps the
    # pseudo-labels held at once, the most confident first, and a full cap adds none later
    cfg, data, state = _coop_state(tmp_path / f"s{share}", n=10)
    model = _biased(0)
    with torch.no_grad():
        model.emotion.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": 0.9, "pseudo-max-share": share}
    assert state.after_training(model, data, round_cfg, 1)["added"] == added
    held = DeviceStore(tmp_path / f"s{share}" / "dev").active_pseudo()
    everything = _coop_state(tmp_path / "all", n=10)[2]
    everything.after_training(model, data, {**round_cfg, "pseudo-max-share": 1.0}, 1)
    conf = {c: p["confidence"] for c, p in DeviceStore(tmp_path / "all" / "dev").active_pseudo().items()}
    assert len(set(conf.values())) == 8  # distinct confidences: the order is not a tie-break
    assert set(held) == set(sorted(conf, key=conf.get, reverse=True)[:added])
    assert state.after_training(model, data, {**round_cfg, "server-round": 2}, 2)["added"] == 0


def test_could_pass_by_hand():
    from client.cooperative import could_pass

    # 6 views, threshold 0.9: a known view needs >= 6 * 0.9 - 5 = 0.4 for the class all predict
    trained = np.array([[0.5, 0.5 - 1e-9, 0.0], [0.39, 0.3, 0.31], [0.8, 0.1, 0.1], [0.1, 0.9, 0.0]])
    received = np.array([[0.45, 0.3, 0.25], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.0, 0.41, 0.59]])
    assert could_pass([trained], 0.9, 6).tolist() == [True, False, True, True]
    assert could_pass([trained, received], 0.9, 6).tolist() == [True, False, False, False]
    assert could_pass([trained], 0.5, 2).tolist() == [True, True, True, True]  # bound 0: anything


def _logmel_pool(seed: int):
    """24 log-Mel-sized clips (4 labelled, one per class; 20 in the pool) and a logmel-crnn
    sure of some of them (max. probability up to .97) and not of others (.33)."""
    rng = np.random.default_rng(seed)
    n = 24
    xs = [rng.standard_normal((80, 64)).astype(np.float32) * (0.1 + 0.6 * (i % 6)) + i % 3 for i in range(n)]
    data = LocalData(xs, np.array([0, 1, 2, 3] + [-1] * (n - 4)), np.full((n, 2), np.nan))
    torch.manual_seed(0)
    model = build_model("logmel-crnn", 4)
    with torch.no_grad():
        model.emotion.weight.mul_(10.0)
    return n, data, model


@pytest.mark.parametrize("align, threshold", [(0, 0.9), (1, 0.8)])  # aligned: the pool's max. .32-.82
def test_large_inputs_get_the_same_pseudo_labels_from_fewer_forward_passes(tmp_path, monkeypatch, align, threshold):
    import client.cooperative as coop

    n, data, model = _logmel_pool(0)
    rows = []
    model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    cfg = RunConfig(mode="self-labelling", task="emotion", pseudo_per_class=0, model="logmel-crnn", pseudo_align=align)
    # 5 views, threshold 0.9: a clip whose clean view is under 5 * 0.9 - 4 = 0.5 cannot pass
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": threshold, "view-noise": 0.0, "pseudo-global-view": 0}

    def step(folder):
        state = CoopState(cfg, tmp_path / folder, [f"/clips/{i}.wav" for i in range(n)], np.full(n, 1.0),
                          ["anger", "sadness", "fear", "happiness"], data.emotion >= 0, None, None)
        rows.clear()
        report = state.after_training(model, data, round_cfg, 1)
        return report["added"], sorted(DeviceStore(tmp_path / folder).active_pseudo()), sum(rows)

    added, chosen, two_stage_rows = step("two-stage")
    monkeypatch.setattr(coop, "TWO_STAGE_MIN_NUMBERS", 10**9)  # every clip under every view
    assert step("one-stage")[:2] == (added, chosen) and 0 < added < n - 4
    assert step("again")[2] == 5 * (n - 4)  # 5 views of the 20 pool clips
    if not align:
        assert two_stage_rows == (n - 4) + 4 * (n - 4 - 3)  # the clean view of all, 4 noisy of the 17 above 0.5


@pytest.mark.parametrize("mode", ["active", "cooperative"])
def test_queries_are_ranked_on_the_clean_view_and_large_inputs_still_score_in_two_stages(tmp_path, mode):
    """A categorical query is the clip least certain under the trained model's clean view:
    mode active scores the pool once, mode cooperative keeps the two stages in a round
    that queues (before, a queueing round scored every clip under every view)."""
    from client.cooperative import emotion_uncertainty, view_predictions

    n, data, model = _logmel_pool(1)
    clean = view_predictions(model, data.x[4:], views=1, noise=0.0)[0]
    rows = []
    model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    cfg = RunConfig(mode=mode, task="emotion", model="logmel-crnn", pseudo_align=0, query_per_round=3,
                    query_total=3)
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": 0.9, "pseudo-global-view": 0}
    state = CoopState(cfg, tmp_path, [f"/clips/{i}.wav" for i in range(n)], np.full(n, 1.0),
                      ["anger", "sadness", "fear", "happiness"], data.emotion >= 0, None, None)
    report = state.after_training(model, data, round_cfg, 1)
    expected = 4 + np.argsort(-emotion_uncertainty(clean), kind="stable")[:3]
    assert report["queries"] == 3
    assert [q["clip"] for q in DeviceStore(tmp_path).queue()] == [f"/clips/{i}.wav" for i in expected]
    if mode == "active":
        assert sum(rows) == n - 4  # the clean view of the 20 pool clips, nothing else
    else:
        assert n - 4 <= sum(rows) < 5 * (n - 4)  # the clean view of all, noisy views of a few


def test_device_step_queries_the_least_certain_and_the_oracle_answers(tmp_path):
    cfg, data, state = _coop_state(tmp_path, mode="active")
    model = _biased(0)
    with torch.no_grad():
        model.emotion.bias.zero_()  # 50/50: every pool clip is uncertain
    report = state.after_training(model, data, round_settings(cfg, 1), 1)
    assert report["queries"] == 2 and report["answered"] == 2 and report["rater_answers"] >= 4
    assert report["labelled"] == 4 and report["human_labels"] == 2 + report["rater_answers"]
    report = state.after_training(model, data, round_settings(cfg, 2), 2)
    assert report["queries"] == 1 and report["queries_total"] == 3  # total budget 3
    assert (state.training_data(data).emotion >= 0).sum() == 5


def test_empty_pool_skips_the_step_and_says_so(tmp_path, caplog):
    cfg, data, state = _coop_state(tmp_path, mode="cooperative", n=2)
    with caplog.at_level(logging.INFO, logger="fedaffect"):
        report = state.after_training(_biased(0), data, round_settings(cfg, 1), 1)
    assert report["skipped"] == 1 and report["added"] == 0 and report["queries"] == 0
    assert "pool is empty" in caplog.text


def test_tracker_aggregates_and_remembers_devices_not_sampled():
    tracker = CoopTracker([{"name": "a", "n-clips": 10, "n-labelled": 2}, {"name": "b", "n-clips": 10, "n-labelled": 3}])
    m0 = tracker.update([])
    assert (m0["coop_human_labels"], m0["coop_labelled_fraction"]) == (5, 0.25) and math.isnan(m0["coop_pseudo_precision"])
    a = {"n_clips": 10, "labelled": 4, "human_labels": 7, "pseudo_total": 3, "pseudo_correct": 2, "pseudo_checked": 3,
         "added": 3, "dropped": 0, "queries": 2, "rater_answers": 5, "skipped": 0, "seconds": 0.1}
    m1 = tracker.update([{"name": "a", "coop": json.dumps(a)}, {"name": "b"}])
    assert (m1["coop_human_labels"], m1["coop_labelled"], m1["coop_rater_answers"]) == (10, 7, 5)
    assert m1["coop_pseudo_precision"] == pytest.approx(2 / 3)
    m2 = tracker.update([])  # nobody sampled: totals stay, per-round counts are 0
    assert (m2["coop_human_labels"], m2["coop_rater_answers"]) == (10, 0)

    # a resumed run (server/app.py) restores the counts from the checkpoint
    restored = CoopTracker([{"name": "a", "n-clips": 10, "n-labelled": 2}, {"name": "b", "n-clips": 10, "n-labelled": 3}])
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.update([]) == tracker.update([])


# -- transfer learning ---------------------------------------------------------------------------
def test_freeze_trains_only_the_heads():
    torch.manual_seed(0)
    model = build_model("egemaps-mlp", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    data = LocalData([rng.standard_normal(88).astype(np.float32) for _ in range(16)], np.arange(16) % 2,
                     np.full((16, 2), np.nan))
    assert freeze_frontend(model) == 4
    train_local(model, data, task="emotion", epochs=2, lr=1e-2, batch_size=8, seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("body."))
    assert not torch.equal(before["emotion.weight"], after["emotion.weight"])
    freeze_frontend(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_pretrain_then_init_a_federation(tone_manifest, tmp_path):
    ckpt = tmp_path / "pre.pt"
    cache = str(tmp_path / "cache")
    res = CliRunner().invoke(cli, ["pretrain", "--manifest", str(tone_manifest), "--model", "egemaps-mlp",
                                   "--out", str(ckpt), "--epochs", "15", "--cache-dir", cache])
    assert res.exit_code == 0, res.output
    payload = torch.load(ckpt, weights_only=False)
    assert payload["model"] == "egemaps-mlp" and payload["emotions"] == ["anger", "sadness"]

    # Same classes: every layer; other classes: all but the emotion head, shared rows copied.
    model = build_model("egemaps-mlp", 2)
    assert "every layer loaded" in load_initial(model, ckpt, "egemaps-mlp", ["anger", "sadness"])
    assert torch.equal(model.emotion.weight, payload["state_dict"]["emotion.weight"])
    model = build_model("egemaps-mlp", 3)
    message = load_initial(model, ckpt, "egemaps-mlp", ["fear", "sadness", "anger"], warn=False)
    assert "differ" in message and "2 shared classes" in message
    assert torch.equal(model.body[0].weight, payload["state_dict"]["body.0.weight"])
    assert torch.equal(model.emotion.weight[2], payload["state_dict"]["emotion.weight"][0])
    with pytest.raises(ValueError, match="holds model 'egemaps-mlp'.*'logmel-crnn'"):
        load_initial(build_model("logmel-crnn", 2), ckpt, "logmel-crnn", ["anger", "sadness"])
    with pytest.raises(FileNotFoundError):
        load_initial(model, tmp_path / "none.pt", "egemaps-mlp", ["anger"])
    res = CliRunner().invoke(cli, ["pretrain", "--manifest", str(tone_manifest), "--out", str(tmp_path / "typo.pt"),
                                   "--emotions", "anger,sad", "--cache-dir", cache])
    assert res.exit_code != 0 and "sad have no clip" in res.output and not (tmp_path / "typo.pt").exists()
    torch.save({**payload, "extra": _Pickled()}, tmp_path / "code.pt")  # unpickling it would run code
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_initial(build_model("egemaps-mlp", 2), tmp_path / "code.pt", "egemaps-mlp", ["anger", "sadness"])
    if not torch.cuda.is_available():  # a GPU asked for where there is none: refused by name, nothing written
        res = CliRunner().invoke(cli, ["pretrain", "--manifest", str(tone_manifest), "--out", str(tmp_path / "gpu.pt"),
                                       "--compute-device", "cuda", "--cache-dir", cache])
        assert res.exit_code != 0 and "no CUDA device" in res.output and not (tmp_path / "gpu.pt").exists()
    assert "FaiReg" not in load_initial(build_model("egemaps-mlp", 2), ckpt, "egemaps-mlp", ["anger", "sadness"])
    torch.save({**payload, "faireg": '{"groups": {}}'}, tmp_path / "faireg.pt")  # a FaiReg run's checkpoint
    assert "normalised targets" in load_initial(build_model("egemaps-mlp", 2), tmp_path / "faireg.pt", "egemaps-mlp",
                                                ["anger", "sadness"], warn=False)

    # The federation starts from the checkpoint: round 0 is already good; the front-end is frozen.
    cfg = RunConfig(manifest=str(tone_manifest), folds=4, num_server_rounds=1, init=str(ckpt), freeze_rounds=1,
                    run_dir=str(tmp_path / "runs"), cache_dir=cache, run_name="transfer")
    rounds = simulate(cfg, all_folds=False, progress=False)["folds"][0]["rounds"]
    assert rounds[0]["uar"] >= 0.9
    store = RunStore(f"sqlite:///{tmp_path / 'runs' / 'fedaffect.db'}")
    r0, r1 = (torch.load(tmp_path / "runs" / "transfer" / "checkpoints" / f"round-000{i}.pt", weights_only=False)
              for i in (0, 1))
    # frozen in round 1 (up to FedAvg's floating-point averaging of identical tensors)
    assert torch.allclose(r0["state_dict"]["body.0.weight"], r1["state_dict"]["body.0.weight"], atol=1e-6)
    assert not torch.equal(r0["state_dict"]["emotion.weight"], r1["state_dict"]["emotion.weight"])
    assert store.get_run("transfer").status == "completed"

    res = CliRunner().invoke(cli, ["simulate", "--manifest", str(tone_manifest), "--folds", "4", "--fold", "0",
                                   "--rounds", "1", "--model", "logmel-crnn", "--init", str(ckpt),
                                   "--run-dir", str(tmp_path / "runs")])
    assert res.exit_code != 0 and "logmel-crnn" in res.output and "pretrain" in res.output


# -- a federation ------------------------------------------------------------------------------
def test_three_device_cooperative_federation_gains_labels_and_counts_effort(tone_manifest, tmp_path):
    # 4 speakers, 4 folds: 3 training devices of 6 clips, each keeping 2 labels (one per class).
    cfg = RunConfig(manifest=str(tone_manifest), folds=4, fold=0, num_server_rounds=3, local_epochs=3,
                    mode="cooperative", label_fraction=0.34, pseudo_per_class=1, query_per_round=1,
                    run_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), run_name="coop")
    summary = simulate(cfg, all_folds=False, progress=False)
    rounds = summary["folds"][0]["rounds"]
    first, last = rounds[0], rounds[-1]
    assert first["coop_labelled"] == 6 and first["coop_human_labels"] == 6 and first["coop_pool"] == 12
    assert last["coop_labelled"] > first["coop_labelled"]  # answered queries joined the labelled set
    assert last["coop_labelled"] + last["coop_pseudo_total"] > 6 + 3  # and machine labels too
    assert last["coop_rater_answers_total"] > 0  # human effort, counted in rater answers
    assert last["coop_human_labels"] == 6 + last["coop_rater_answers_total"]
    assert sum(r.get("coop_queries", 0) for r in rounds) == last["coop_queries_total"] >= 3
    assert 0 <= last["coop_pseudo_precision"] <= 1
    assert last["coop_skipped"] == 0 and last["coop_seconds"] > 0
    devices = sorted(p.name for p in (tmp_path / "runs" / "coop" / "devices").iterdir())
    assert devices == ["dev-00-s1", "dev-01-s3", "dev-02-s4"]
    from server.report import write_report

    page = write_report(RunStore(summary["config"]["store-url"]), "coop", tmp_path / "report")
    assert (tmp_path / "report" / "labels.png").read_bytes()[:4] == b"\x89PNG" and "labels.png" in page.read_text()


# -- FaiReg: arousal/valence pseudo-labels are stored on the label scale (issue 3) ------------
def _av_model(arousal, valence):
    """A model whose arousal/valence output is (arousal, valence) for every clip (normalised scale)."""
    torch.manual_seed(0)
    model = build_model("egemaps-mlp", 2)
    with torch.no_grad():
        model.av.weight.zero_()
        model.av.bias.copy_(torch.atanh(torch.tensor([arousal, valence])))
    return model


def test_av_to_label_scale_inverts_the_group_normalisation():
    from shared_models.fairness import FaiRegParams

    params = FaiRegParams(("gender",), {"female": np.array([[0.5, 0.1], [0.2, 0.05]])},
                          np.array([[0.0, 0.4], [0.0, 0.2]]))
    av = np.array([[[0.3, -0.2], [0.3, -0.2]], [[0.1, 0.0], [0.9, 0.9]]])  # (V=2, N=2, 2)
    keys = ["female", "other"]  # an unknown group: the pooled statistics
    out = av_to_label_scale(av, params, keys)
    assert out.shape == (2, 2, 2) and out.dtype == np.float32
    assert out[0, 0] == pytest.approx([0.5 + 0.3 * 0.3, 0.2 - 0.15 * 0.2])
    assert out[1, 1] == pytest.approx([1.0, 0.54])  # clipped to the label range [-1, 1]
    assert params.normalise(out[0], keys) == pytest.approx(av[0], abs=1e-6)  # round trip
    assert av_to_label_scale(av[0], params, keys) == pytest.approx(out[0])  # (N, 2) works too
    assert av_to_label_scale(av, None) is av  # FaiReg off: unchanged
    with pytest.raises(ValueError, match="1 FaiReg group keys for 2 clips"):
        av_to_label_scale(av, params, ["female"])
    assert faireg_of({"faireg": params.to_json()}).groups["female"] == pytest.approx(params.groups["female"])
    assert faireg_of({}) is None and faireg_of(None) is None


def test_faireg_av_pseudo_labels_are_stored_on_the_label_scale_and_normalised_once(tmp_path):
    from shared_models.fairness import FaiRegParams, faireg_group_keys, normalise_data

    cfg = RunConfig(mode="self-labelling", task="av", pseudo_per_class=0, pseudo_max_share=1.0, faireg="on",
                    protected="gender")
    n = 6
    rng = np.random.default_rng(0)
    gender = np.array(["female", "male"] * (n // 2))
    av = np.full((n, 2), np.nan, np.float32)
    av[:2] = [[0.6, 0.3], [-0.5, 0.1]]
    data = LocalData([rng.standard_normal(88).astype(np.float32) for _ in range(n)], np.full(n, -1), av,
                     {"gender": gender})
    # Group means/stds far from 0/1: a normalised prediction is nothing like a label.
    params = FaiRegParams(("gender",), {"female": np.array([[0.5, 0.1], [0.2, 0.05]]),
                                        "male": np.array([[-0.4, 0.2], [-0.1, 0.1]])},
                          np.array([[0.05, 0.4], [0.05, 0.2]]))
    state = CoopState(cfg, tmp_path / "dev", [f"/clips/{i}.wav" for i in range(n)], np.full(n, 1.0),
                      ["anger", "sadness"], np.isfinite(av).all(axis=1))
    round_cfg = {**round_settings(cfg, 1), "faireg": params.to_json()}
    model = _av_model(0.3, -0.2)  # normalised prediction, the same for every clip
    report = state.after_training(model, data, round_cfg, 1)
    assert report["added"] == 4
    stored = state.store.active_pseudo()
    keys = faireg_group_keys(data.groups, params.attributes, n)
    z = np.array([0.3, -0.2])
    for i in range(2, n):
        p = stored[f"/clips/{i}.wav"]
        expected = params.denormalise_group(z[None], [keys[i]])[0]  # the group's own label scale
        assert (p["arousal"], p["valence"]) == pytest.approx(tuple(expected), abs=1e-5)
    assert stored["/clips/2.wav"]["arousal"] == pytest.approx(0.5 + 3 * 0.1 * 0.3, abs=1e-5)
    # Normalised once (client/app.py train): the training target is the model's own prediction.
    targets = normalise_data(state.training_data(data), params).av
    assert targets[2:] == pytest.approx(np.tile(z, (n - 2, 1)), abs=1e-5)
    assert targets[:2] == pytest.approx(params.normalise(av[:2], keys[:2]))
    # The re-check compares like with like: the same model supports its pseudo-labels.
    report = state.after_training(model, data, {**round_cfg, "pseudo-recheck": 1}, 2)
    assert report["dropped"] == 0 and report["pseudo_total"] == 4


# -- freezing the front-end freezes its batch-norm statistics too (issue 3) -------------------
def test_frozen_frontend_keeps_its_batch_norm_statistics(tmp_path):
    from torch.nn.modules.batchnorm import _BatchNorm

    torch.manual_seed(0)
    model = build_model("logmel-crnn", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    n = 12
    data = LocalData([(2 + 3 * rng.standard_normal((40, 64))).astype(np.float32) for _ in range(n)],
                     np.arange(n) % 2, np.full((n, 2), np.nan))
    cfg = RunConfig(model="logmel-crnn", freeze_rounds=1)
    state = CoopState(cfg, tmp_path / "dev", [f"/clips/{i}.wav" for i in range(n)], np.full(n, 1.0),
                      ["anger", "sadness"], data.emotion >= 0)
    train = state.before_training(model, data, round_settings(cfg, 1), 1)  # round 1 <= freeze-rounds
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(norms) == 2 and not any(m.training for m in norms)
    assert freeze_frontend(model) == freeze_frontend(model)  # freezing twice: still one hook per layer
    assert all(len(m._forward_pre_hooks) == 1 for m in norms)
    result = train_local(model, train, task="emotion", epochs=2, lr=1e-2, batch_size=4, seed=0)  # calls model.train()
    assert result["steps"] > 0 and model.training
    after = {k: v.clone() for k, v in model.state_dict().items()}
    frontend = [k for k in before if not k.startswith(("emotion.", "av."))]
    assert {"convs.0.2.running_mean", "convs.0.2.running_var", "convs.0.2.num_batches_tracked"} <= set(frontend)
    changed = [k for k in frontend if not torch.equal(before[k], after[k])]
    assert changed == []  # weights, running_mean/var and num_batches_tracked
    assert not torch.equal(before["emotion.weight"], after["emotion.weight"])
    import copy

    twin = copy.deepcopy(model)  # a copy of a frozen model unfreezes too
    freeze_frontend(twin, False)
    assert not any(m._forward_pre_hooks for m in twin.modules()) and twin.convs[0][2].training
    # Unfrozen (after the round's step): batch norm follows the model's mode again.
    state.after_training(model, data, round_settings(cfg, 1), 1)
    model.train()
    assert all(m.training for m in norms) and all(p.requires_grad for p in model.parameters())
    train_local(model, data, task="emotion", epochs=1, lr=1e-2, batch_size=4, seed=0)
    assert not torch.equal(after["convs.0.2.running_mean"], model.state_dict()["convs.0.2.running_mean"])


def test_nearest_neighbour_votes_and_clip_vectors():
    ref = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [5.0, 6.0], [6.0, 5.0]])
    labels = np.array([0, 0, 1, 1, 2])
    queries = np.array([[0.1, 0.2], [5.1, 5.1], [5.9, 5.0]])
    np.testing.assert_array_equal(knn_labels(ref, labels, queries, 1), [0, 1, 2])
    # k = 3: near (5, 5) the votes are 1, 1, 2 -> 1; near (5.9, 5) they are 2, 1, 1 -> 1
    np.testing.assert_array_equal(knn_labels(ref, labels, queries, 3), [0, 1, 1])
    # a tie (k = 2 at (5.9, 5): one 2 and one 1) goes to the nearer neighbour's class
    np.testing.assert_array_equal(knn_labels(ref, labels, queries[2:], 2), [2])
    np.testing.assert_array_equal(knn_labels(ref[:0], labels[:0], queries, 3), [-1, -1, -1])
    # functionals stay, frame sequences are averaged over time, raw waveforms have no vector
    np.testing.assert_array_equal(clip_vectors([np.array([1.0, 2.0])]), [[1.0, 2.0]])
    np.testing.assert_array_equal(clip_vectors([np.array([[1.0, 2.0], [3.0, 4.0]])]), [[2.0, 3.0]])
    assert clip_vectors([np.zeros(16000)]) is None and clip_vectors([]) is None


def test_a_large_pool_is_scored_by_a_new_sample_each_round_plus_every_pseudo_label(tmp_path, monkeypatch):
    import client.cooperative as coop

    cfg, data, state = _coop_state(tmp_path, n=42)  # 2 labelled clips, a pool of 40
    cfg = cfg.replace(pool_sample=5)
    state.cfg = cfg
    scored = []  # the clips of every view_predictions call: (round, clip rows)
    real = coop.view_predictions

    def spy(model, xs, **kw):
        scored.append({next(i for i, x in enumerate(data.x) if x is c) for c in xs})
        return real(model, xs, **kw)

    monkeypatch.setattr(coop, "view_predictions", spy)
    round_cfg = {**round_settings(cfg, 1), "pseudo-threshold": 0.9, "pseudo-per-class": 3}
    state.before_training(_biased(0), data, round_cfg, 1)
    report = state.after_training(_biased(0), data, round_cfg, 1)
    assert scored[0] == scored[1] and len(scored[0]) == 5 and not scored[0] & {0, 1}  # the received model's view too
    assert report["added"] == 3
    pseudo = {int(c.split("/")[-1][:-4]) for c in DeviceStore(tmp_path / "dev").active_pseudo()}
    assert pseudo <= scored[0]
    state.before_training(_biased(0), data, {**round_cfg, "pseudo-per-class": 0}, 2)
    report = state.after_training(_biased(0), data, {**round_settings(cfg, 2), "pseudo-threshold": 0.9,
                                                      "pseudo-per-class": 0}, 2)
    assert scored[2] == scored[3] and pseudo < scored[2] and len(scored[2]) == 5 + 3  # re-checked + 5 new
    assert scored[2] - pseudo != scored[0] - pseudo  # a new sample
    assert report["dropped"] == 0 and report["pseudo_total"] == 3 + (len(scored[2]) - 3)
    whole = RunConfig(mode="self-labelling", task="emotion", pool_sample=0)
    assert round_settings(whole, 1)["pool-sample"] == 0


def test_counts_stay_json_when_a_pseudo_labelled_clip_has_no_hidden_emotion(tmp_path):
    """A pool clip whose emotion is outside the run's classes (truth -1) may get a
    pseudo-label; the device's reply (JSON) must still carry the counts."""
    cfg, data, state = _coop_state(tmp_path)
    state.truth_emotion = np.array([0, 1, -1, 0, 0, 0])
    state.store.add_pseudo(1, [{"clip": "/clips/2.wav", "emotion": "anger"},
                               {"clip": "/clips/3.wav", "emotion": "anger"}])
    counts = json.loads(json.dumps(state._counts()))
    assert counts["pseudo_total"] == 2 and counts["pseudo_correct"] == 1


def test_a_pseudo_label_fills_only_the_kind_of_label_a_clip_lacks(tmp_path):
    """An av run's pool clip may carry a human emotion without arousal/valence: its
    arousal/valence pseudo-label is trained on, the human emotion kept."""
    cfg = RunConfig(mode="self-labelling", task="av")
    n = 3
    data = LocalData([np.zeros(88, np.float32)] * n, np.array([0, 1, -1]),
                     np.array([[0.5, 0.5], [np.nan, np.nan], [np.nan, np.nan]]))
    state = CoopState(cfg, tmp_path, [f"/clips/{i}.wav" for i in range(n)], np.full(n, 1.0),
                      ["anger", "sadness"], data.labelled("av"), None, None)
    state.store.add_pseudo(1, [{"clip": "/clips/1.wav", "emotion": "anger", "arousal": -0.2, "valence": 0.1},
                               {"clip": "/clips/2.wav", "emotion": "anger", "arousal": 0.3, "valence": 0.4}])
    train = state.training_data(data)
    assert train.emotion.tolist() == [0, 1, 0]  # clip 1's human emotion wins
    np.testing.assert_allclose(train.av, [[0.5, 0.5], [-0.2, 0.1], [0.3, 0.4]])


def test_a_person_s_answers_train_in_every_mode_and_pseudo_labels_only_where_the_mode_makes_them(
        tone_manifest, tmp_path, monkeypatch):
    """Bug: a deployed device with 12 labelled clips and 3 answered queries trained on 12 clips
    in supervised runs (the default of ``fedaffect train``) and on 15 in cooperative ones.
    Answers are human labels (every mode); pseudo-labels machine labels (self-labelling modes)."""
    import pandas as pd
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import app as client_app

    for name, value in (("_run_id", 11), ("_node_id", 0), ("_task_id", 1)):  # messages need a run id
        monkeypatch.setattr(TaskIdentity, name, value)
    rows = pd.read_csv(tone_manifest)
    rows.loc[rows.index % 2 == 1, ["emotion", "arousal", "valence"]] = None  # 12 labelled, 12 in the pool
    data_dir = tmp_path / "phone"
    data_dir.mkdir()
    rows.to_csv(data_dir / "manifest.csv", index=False)
    pool = rows.loc[rows.index % 2 == 1, "path"].tolist()
    with DeviceStore(data_dir) as store:  # left by an earlier cooperative run and `fedaffect device label`
        for clip in pool[:3]:
            store.answer(clip, "anger")
        store.add_pseudo(1, [{"clip": pool[3], "emotion": "sadness"}])

    def described(mode):  # what the coordinator learns before choosing its training devices
        cfg = RunConfig(mode=mode, emotions="anger,sadness", cache_dir=str(tmp_path / "cache"))
        msg = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1,
                      message_type=f"{MessageType.QUERY}.device_info")
        context = Context(run_id=11, node_id=1, node_config={"data-dir": str(data_dir)}, state=RecordDict(),
                          run_config=cfg.to_mapping())
        return dict(client_app(msg, context).content["device"])

    # a device's answered clips count as its labels for the coordinator too, in every mode
    # (one whose only labels are answers is still a training device of a supervised run)
    assert described("supervised")["n-answered"] == 3 and described("cooperative")["n-answered"] == 3

    def trained_on(mode):
        cfg = RunConfig(mode=mode, emotions="anger,sadness", cache_dir=str(tmp_path / "cache"), local_epochs=1)
        msg = Message(RecordDict({"arrays": ArrayRecord(build_model(cfg.model, 2).state_dict()),
                                  "config": ConfigRecord({**round_settings(cfg, 2), "server-round": 2})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
        context = Context(run_id=11, node_id=1, node_config={"data-dir": str(data_dir)}, state=RecordDict(),
                          run_config=cfg.to_mapping())
        reply = client_app(msg, context)
        assert not reply.has_error(), reply.error
        return int(reply.content["metrics"]["num-examples"]), json.loads(reply.content["device"]["coop"])

    n, counts = trained_on("supervised")
    assert n == 12 + 3  # was 12: the person's answers were ignored
    assert (counts["labelled"], counts["answered"], counts["pseudo_total"]) == (15, 3, 0)
    assert trained_on("active")[0] == 12 + 3  # no pseudo-label of an earlier run either
    assert trained_on("cooperative")[0] == 12 + 3 + 1  # before its own step adds any


def test_a_supervised_simulation_opens_no_store(tmp_path):
    """In simulation nobody answers a supervised run: its training set is the kept labels,
    and no store file is made for it (as before)."""
    from client.device_store import STORE_FILE

    cfg, data, state = _coop_state(tmp_path, mode="supervised")
    assert state.training_data(data) is data and state._counts()["labelled"] == 2
    state.after_training(_biased(0), data, round_settings(cfg, 1), 1)
    assert not (tmp_path / "dev" / STORE_FILE).exists()


class _Pickled:
    """An arbitrary object: a checkpoint holding one is refused (weights-only loading)."""


def test_pretrain_can_score_the_model_on_speakers_it_never_heard(tone_manifest, tmp_path):
    from client.transfer import pretrain

    res = pretrain(tone_manifest, "egemaps-mlp", tmp_path / "pre.pt", task="both", epochs=10,
                   validation_speakers=1, cache_dir=tmp_path / "cache")
    assert len(res["validation_speakers"]) == 1 and res["speakers"] == 3
    assert res["clips"] == 18  # 4 speakers x 6 clips, one speaker kept out
    assert 0 <= res["val_uar"] <= 1 and np.isfinite(res["val_ccc_arousal"])
    with pytest.raises(ValueError, match=r"validation_speakers must be in \[0, 3\]"):
        pretrain(tone_manifest, "egemaps-mlp", tmp_path / "x.pt", validation_speakers=4, cache_dir=tmp_path / "cache")


def test_an_emotion_checkpoint_into_an_av_run_is_warned_about(tone_manifest, tmp_path, caplog):
    import logging

    from client.transfer import pretrain

    ckpt = tmp_path / "emo.pt"
    pretrain(tone_manifest, "egemaps-mlp", ckpt, task="emotion", epochs=1, cache_dir=tmp_path / "cache")
    emotions = ["anger", "sadness"]
    for task in ("av", "both"):
        note = load_initial(build_model("egemaps-mlp", 2), ckpt, "egemaps-mlp", emotions, task=task, warn=False)
        assert f"arousal/valence head starts untrained (this run's task is '{task}')" in note
    assert "untrained" not in load_initial(build_model("egemaps-mlp", 2), ckpt, "egemaps-mlp", emotions,
                                           task="emotion", warn=False)
    # The coordinator warns when it loads the checkpoint: the same ServerApp code runs in deployment.
    cfg = RunConfig(manifest=str(tone_manifest), task="av", init=str(ckpt), folds=2, num_server_rounds=1,
                    run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), run_name="warned")
    with caplog.at_level(logging.WARNING):
        simulate(cfg, all_folds=False, progress=False)
    assert "arousal/valence head starts untrained" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        simulate(cfg.replace(task="emotion", run_name="quiet"), all_folds=False, progress=False)
    assert "starts untrained" not in caplog.text
