"""Differential privacy: the accountant's numbers, Flower's clipping wrappers in fedaffect's
round loop (server- and client-side), equal weights, and epsilon recorded per round."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from shared_models.config import ConfigError, RunConfig
from strategies import build_strategy
from strategies.dp import (
    DP_WEIGHT_KEY,
    ClientSideFixedClipping,
    ServerSideFixedClipping,
    num_sampled_devices,
    privacy_spent,
)

# ----------------------------------------------------------------------------- accountant


def test_abadi_et_al_setting_is_at_most_the_moments_accountant_bound():
    # Abadi et al. (CCS 2016), q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5: the moments
    # accountant gives (1.26, 1e-5). The RDP accountant (finer orders, tighter RDP -> (eps, delta)
    # conversion) is never looser; dp-accounting 0.6 gives 1.0355.
    eps = privacy_spent(4.0, 0.01, 10_000, 1e-5)
    assert eps <= 1.26
    assert eps == pytest.approx(1.0355, abs=0.02)


def test_gaussian_calibrated_to_one_one_in_a_million():
    # dp-accounting's own test: noise multiplier 4.530877117 on one unsampled Gaussian release
    # is exactly (1, 1e-6)-DP.
    assert privacy_spent(4.530877117, 1.0, 1, 1e-6) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("rounds", [1, 10, 100])
def test_full_participation_is_below_the_classic_rdp_bound(rounds):
    # q = 1: T Gaussian releases have RDP T * alpha / (2 z^2); the classic conversion
    # eps <= T/(2 z^2) + sqrt(2 T log(1/delta)) / z is an upper bound (Mironov 2017, Prop. 3).
    z, delta = 1.0, 1e-5
    classic = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
    eps = privacy_spent(z, 1.0, rounds, delta)
    assert 0.8 * classic < eps <= classic


def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise():
    by_rounds = [privacy_spent(1.0, 0.2, t, 1e-5) for t in (1, 5, 20, 50)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [privacy_spent(z, 0.2, 20, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    by_rate = [privacy_spent(1.0, q, 20, 1e-5) for q in (0.05, 0.2, 0.5, 1.0)]
    assert by_rate == sorted(by_rate)
    assert privacy_spent(1.0, 0.2, 20, 1e-3) < privacy_spent(1.0, 0.2, 20, 1e-7)


def test_no_noise_is_infinite_epsilon_and_no_round_is_zero():
    assert privacy_spent(0.0, 0.5, 10, 1e-5) == math.inf
    assert privacy_spent(1.0, 0.5, 0, 1e-5) == 0.0
    for args in [(-1.0, 0.5, 1, 1e-5), (1.0, 0.0, 1, 1e-5), (1.0, 1.5, 1, 1e-5), (1.0, 0.5, -1, 1e-5),
                 (1.0, 0.5, 1, 0.0), (1.0, 0.5, 1, 1.0)]:
        with pytest.raises(ValueError):
            privacy_spent(*args)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [("dp", "local"), ("dp", "on"), ("dp-clipping-norm", 0.0),
                                       ("dp-clipping-norm", -1.0), ("dp-noise-multiplier", -0.5),
                                       ("dp-delta", 0.0), ("dp-delta", 1.0), ("dp-delta", "small")])
def test_bad_dp_value_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize("strategy", ["qfedavg", "fair"])
def test_dp_is_refused_with_a_strategy_that_is_not_a_mean_of_updates(strategy):
    with pytest.raises(ConfigError, match="'dp'.*fedavg or fedprox"):
        RunConfig(dp="server", strategy=strategy)


def test_build_strategy_wraps_only_when_dp_is_on():
    from flwr.serverapp.strategy import FedAvg, FedProx

    assert type(build_strategy(RunConfig(), 4)) is FedAvg
    s = build_strategy(RunConfig(dp="server", dp_clipping_norm=0.5, dp_noise_multiplier=2.0), 4)
    assert isinstance(s, ServerSideFixedClipping) and isinstance(s.strategy, FedAvg)
    assert (s.clipping_norm, s.noise_multiplier, s.num_sampled_clients, s.sampling_rate) == (0.5, 2.0, 4, 1.0)
    assert s.strategy.weighted_by_key == DP_WEIGHT_KEY
    c = build_strategy(RunConfig(dp="client", strategy="fedprox", fraction_train=0.5, dp_delta=1e-6), 10)
    assert isinstance(c, ClientSideFixedClipping) and isinstance(c.strategy, FedProx)
    assert (c.num_sampled_clients, c.sampling_rate, c.delta) == (5, 0.5, 1e-6)
    assert c.epsilon(3) == privacy_spent(1.0, 0.5, 3, 1e-6)


def test_num_sampled_devices_matches_fedavg_sampling():
    assert num_sampled_devices(RunConfig(fraction_train=0.3), 10) == 3
    assert num_sampled_devices(RunConfig(fraction_train=0.1, min_train_devices=2), 10) == 2
    assert num_sampled_devices(RunConfig(fraction_train=0.1), 3) == 1
    assert num_sampled_devices(RunConfig(min_train_devices=9), 4) == 4


# ----------------------------------------------------------------------------- wrappers on fake replies


@pytest.fixture
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 13, 0, 1


def _arrays(w, b, count=0):
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)), "b": Array(np.asarray(b, dtype=np.float32)),
                        "bn.num_batches_tracked": Array(np.asarray(count, dtype=np.int64))})


def _reply(arrays: ArrayRecord, n: int, node: int) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


class _Grid:
    """Just enough of a Grid for FedAvg.configure_train."""

    def get_node_ids(self):
        return [1, 2]


def test_server_side_wrapper_clips_weighs_equally_and_keeps_counters(task_identity):
    C = 0.1
    strategy = build_strategy(RunConfig(dp="server", dp_clipping_norm=C, dp_noise_multiplier=0.0), 2)
    glob = _arrays(np.zeros((2, 2)), np.zeros(2), count=5)
    list(strategy.configure_train(1, glob, ConfigRecord({}), _Grid()))
    # Two devices, far apart, with very different example counts and trained counters.
    up1 = _arrays(np.full((2, 2), 3.0), np.zeros(2), count=45)  # update norm 6
    up2 = _arrays(np.zeros((2, 2)), np.array([0.0, -4.0]), count=9)  # update norm 4
    arrays, metrics = strategy.aggregate_train(1, [_reply(up1, 1000, 1), _reply(up2, 1, 2)])
    # Each update is scaled to norm C, then the two are averaged with equal weights.
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 0.5 * C / 2), rtol=1e-5)
    np.testing.assert_allclose(arrays["b"].numpy(), [0.0, -0.5 * C], rtol=1e-5)
    assert int(arrays["bn.num_batches_tracked"].numpy()) == 5
    assert metrics["train_loss"] == pytest.approx(1.0)


def test_a_device_that_did_not_move_still_counts(task_identity):
    # A zero update (nothing to learn from, or a saturated model) made Flower's flat clipping
    # divide by zero and the round fail (CI, session 2). It is kept: it pulls the mean towards
    # no change, as it should, and the other update is clipped as usual.
    C = 0.1
    strategy = build_strategy(RunConfig(dp="server", dp_clipping_norm=C, dp_noise_multiplier=0.0), 2)
    glob = _arrays(np.ones((2, 2)), np.zeros(2), count=5)
    list(strategy.configure_train(1, glob, ConfigRecord({}), _Grid()))
    still = _arrays(np.ones((2, 2)), np.zeros(2), count=7)
    moved = _arrays(np.ones((2, 2)), np.array([0.0, 4.0]), count=9)
    arrays, _ = strategy.aggregate_train(1, [_reply(still, 10, 1), _reply(moved, 10, 2)])
    np.testing.assert_allclose(arrays["b"].numpy(), [0.0, C / 2], rtol=1e-5)
    np.testing.assert_allclose(arrays["w"].numpy(), np.ones((2, 2)), rtol=1e-6)


@pytest.mark.parametrize("dp", ["server", "client"])
@pytest.mark.parametrize("failure", ["error", "missing"])
def test_a_failed_or_missing_device_counts_as_a_zero_update(dp, failure, task_identity):
    # Flower's wrappers alone skip a round with an error reply, and average a round with a
    # missing reply over fewer devices than the noise is calibrated for. The mean stays over
    # the m sampled devices, the failed one contributing no change.
    from flwr.app import Error

    C = 10.0
    strategy = build_strategy(RunConfig(dp=dp, dp_clipping_norm=C, dp_noise_multiplier=0.0), 2)
    glob = _arrays(np.ones((2, 2)), np.zeros(2), count=5)
    list(strategy.configure_train(1, glob, ConfigRecord({}), _Grid()))
    moved = _arrays(np.ones((2, 2)), np.array([0.0, 4.0]), count=9)  # within the clipping norm
    replies = [_reply(moved, 10, 1)]
    if failure == "error":
        replies.append(Message(Error(code=0, reason="device went away"), reply_to=_reply(glob, 0, 2)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None, "the round was skipped"
    np.testing.assert_allclose(arrays["b"].numpy(), [0.0, 2.0], rtol=1e-5)  # (4 + 0) / 2
    np.testing.assert_allclose(arrays["w"].numpy(), np.ones((2, 2)), rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(1.0)  # the stand-in does not pull it to 0


def test_a_round_where_no_device_answered_is_not_released(task_identity):
    strategy = build_strategy(RunConfig(dp="server", dp_clipping_norm=1.0, dp_noise_multiplier=1.0), 2)
    list(strategy.configure_train(1, _arrays(np.ones((2, 2)), np.zeros(2)), ConfigRecord({}), _Grid()))
    assert strategy.aggregate_train(1, []) == (None, None)


def test_client_mod_passes_a_zero_update(task_identity):
    from client.app import dp_clipping_mod

    def unchanged(msg, ctx):
        out = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 0})})
        return Message(out, reply_to=msg)

    context = Context(run_id=13, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = dp_clipping_mod(_received({"clipping_norm": 0.5}), context, unchanged)
    assert not reply.has_error()
    w, b = reply.content["arrays"]["w"].numpy(), reply.content["arrays"]["b"].numpy()
    update = np.concatenate([(w - 1.0).ravel(), b.ravel()])
    assert 0 < np.linalg.norm(update) < 1e-6


def test_client_side_wrapper_sends_the_clipping_norm(task_identity):
    strategy = build_strategy(RunConfig(dp="client", dp_clipping_norm=0.25), 2)
    messages = list(strategy.configure_train(1, _arrays(np.zeros((2, 2)), np.zeros(2)), ConfigRecord({}), _Grid()))
    assert len(messages) == 2
    assert all(m.content["config"]["clipping_norm"] == 0.25 for m in messages)


def _received(config: dict, **extra) -> Message:
    content = RecordDict({"arrays": _arrays(np.ones((2, 2)), np.zeros(2), count=3), "config": ConfigRecord(config),
                          **extra})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _trained(msg: Message, context) -> Message:
    """A device's train handler: a big update and a counter that moved."""
    out = RecordDict({"arrays": _arrays(np.full((2, 2), 5.0), np.full(2, 2.0), count=40),
                      "metrics": MetricRecord({"num-examples": 8, "train_loss": 0.5})})
    return Message(out, reply_to=msg)


def test_client_mod_clips_only_when_the_round_asks(task_identity):
    from client.app import dp_clipping_mod

    context = Context(run_id=13, node_id=1, node_config={}, state=RecordDict(), run_config={})
    plain = dp_clipping_mod(_received({"server-round": 1}), context, _trained)
    assert not plain.has_error()
    np.testing.assert_array_equal(plain.content["arrays"]["w"].numpy(), np.full((2, 2), 5.0))

    clipped = dp_clipping_mod(_received({"server-round": 1, "clipping_norm": 0.5}), context, _trained)
    assert not clipped.has_error()
    w, b = clipped.content["arrays"]["w"].numpy(), clipped.content["arrays"]["b"].numpy()
    update = np.concatenate([(w - 1.0).ravel(), b.ravel()])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-5)
    assert int(clipped.content["arrays"]["bn.num_batches_tracked"].numpy()) == 3  # sent back as received

    # A deployed device's messages may carry a second ConfigRecord (its enrolled groups):
    # still clipped, and the handler still sees it.
    seen = []

    def trained_enrolled(msg, ctx):
        seen.append(dict(msg.content["enrolment"]))
        return _trained(msg, ctx)

    msg = _received({"clipping_norm": 0.5}, enrolment=ConfigRecord({"gender": "female"}))
    enrolled = dp_clipping_mod(msg, context, trained_enrolled)
    assert not enrolled.has_error() and seen == [{"gender": "female"}]
    assert enrolled.metadata.reply_to_message_id == msg.metadata.message_id
    w = enrolled.content["arrays"]["w"].numpy()
    update = np.concatenate([(w - 1.0).ravel(), enrolled.content["arrays"]["b"].numpy().ravel()])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-5)


# ----------------------------------------------------------------------------- whole federations


def _checkpoints(cfg: RunConfig, run_name: str) -> list[dict[str, torch.Tensor]]:
    folder = Path(cfg.run_dir) / run_name / "checkpoints"
    return [torch.load(p, weights_only=False)["state_dict"] for p in sorted(folder.glob("round-*.pt"))]


def _step_norms(states: list[dict[str, torch.Tensor]]) -> list[float]:
    norms = []
    for before, after in zip(states, states[1:]):
        sq = sum(float(((after[k].double() - before[k].double()) ** 2).sum())
                 for k in before if before[k].is_floating_point())
        norms.append(math.sqrt(sq))
    return norms


@pytest.mark.parametrize("dp", ["server", "client"])
def test_global_model_moves_at_most_the_clipping_norm_per_round(dp, tone_manifest, tmp_path):
    from server.simulation import simulate

    C = 0.01
    cfg = RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=2, local_epochs=1, run_name=f"dp-{dp}",
                    dp=dp, dp_clipping_norm=C, dp_noise_multiplier=0.0, run_dir=str(tmp_path / "runs"),
                    cache_dir=str(tmp_path / "cache"))
    summary = simulate(cfg, all_folds=False, progress=False)
    rounds = summary["folds"][0]["rounds"]
    assert [r["train_failures"] for r in rounds[1:]] == [0, 0]
    norms = _step_norms(_checkpoints(cfg, f"dp-{dp}"))
    assert len(norms) == 2
    for norm in norms:
        assert 0.2 * C < norm <= C * (1 + 1e-4)  # moved, but no further than one clipped update
    # No noise, no finite epsilon: inf, which the run store (JSON, PostgreSQL) keeps as null.
    assert [r["dp_epsilon"] for r in rounds] == [0.0, None, None]


def test_epsilon_is_recorded_per_round_and_in_the_summary(tone_manifest, tmp_path):
    from server.simulation import simulate

    cfg = RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=3, local_epochs=1, run_name="dp-eps",
                    dp="server", dp_clipping_norm=1.0, dp_noise_multiplier=1.5, fraction_train=0.5,
                    run_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    summary = simulate(cfg, all_folds=False, progress=False)
    run = summary["folds"][0]
    q = 2 / 4  # 4 speakers, one device each, half of them sampled per round
    assert [r["train_devices"] for r in run["rounds"][1:]] == [2, 2, 2]
    eps = [r["dp_epsilon"] for r in run["rounds"]]
    assert eps == pytest.approx([0.0] + [privacy_spent(1.5, q, t, 1e-5) for t in (1, 2, 3)])
    assert eps == sorted(eps) and 0 < eps[1] < eps[3] < math.inf
    assert run["final"]["dp_epsilon"] == pytest.approx(eps[-1])
    assert run["privacy"] == {"dp": "server", "epsilon": pytest.approx(eps[-1]), "delta": 1e-5, "rounds": 3,
                              "clipping_norm": 1.0, "noise_multiplier": 1.5}
    assert summary["final"]["dp_epsilon"]["mean"] == pytest.approx(eps[-1])
