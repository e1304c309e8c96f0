"""Differential privacy of the model updates: Flower's central-DP wrappers and the privacy spent.

With run-config key ``dp`` on, the strategy of :func:`strategies.build_strategy` is wrapped in
one of Flower's fixed-clipping wrappers (DP-FedAvg, McMahan et al., "Learning Differentially
Private Recurrent Language Models", ICLR 2018; Andrew et al., arXiv:1710.06963 for the
flat clipping):

``server``
    :class:`flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`: the
    coordinator clips each device's update ``theta_k - theta`` to L2 norm at most
    ``dp-clipping-norm`` ``C`` before aggregating (the coordinator sees unclipped updates).
``client``
    :class:`flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping`: the round
    config carries ``clipping_norm`` and each device clips its own update before replying
    (``fixedclipping_mod`` on the ClientApp's train handler, :mod:`client.app`).

Either way the mean of the ``m`` sampled updates gets Gaussian noise of standard deviation
``z C / m`` (``z`` = ``dp-noise-multiplier``), i.e. the sum of clipped updates, whose
sensitivity to one device is ``C``, gets noise ``z C``: the Gaussian mechanism with noise
multiplier ``z`` on the device level (user-level DP: a neighbouring federation has one device,
with all its clips, more or less).

Two details keep that sensitivity true in fedaffect:

* the updates are averaged with **equal weights** (the inner FedAvg/FedProx weighs by
  :data:`DP_WEIGHT_KEY`, set to 1 on every reply): FedAvg's ``num-examples`` weights would
  let one device with many clips move the mean by more than ``C / m``. Strategies that are
  not a mean of updates (``qfedavg``, ``fair``) are refused by :class:`RunConfig`;
* integer arrays (BatchNorm's ``num_batches_tracked`` counters) are not learnt: they stay on
  the devices (a model travels as its floating-point entries, :func:`shared_models.models.to_record`;
  a per-tensor record has them kept at the global model's value), so that they neither use
  up the clipping norm (a counter grows by the number of local batches) nor tell the
  coordinator how many batches a device trained on;
* a sampled device that fails or does not answer counts as a **zero update** (the mean is
  always over the ``m`` sampled devices, the fixed denominator of DP-FedAvg). Flower's
  wrappers alone skip a round with any error reply, and average over the replies that came
  when some are missing, which puts noise for ``m`` devices on a mean of fewer: sensitivity
  ``C / m'`` under noise ``z C / m``. A round in which no device answered is not aggregated
  (and still counts in epsilon).

Privacy spent: :func:`privacy_spent` gives the device-level epsilon after ``T`` rounds at
``dp-delta``; each round's metrics get ``dp_epsilon`` (every round that sampled devices
counts, whether or not its aggregate was released; with ``dp-noise-multiplier = 0`` it is
``inf``, which the run store keeps as null). It covers the model updates only: the
metrics, counts and evaluation statistics that devices also send are not privatised.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from shared_models.config import DP_MODES, RunConfig
from shared_models.models import clippable_update

__all__ = [
    "DP_MODES",
    "DP_WEIGHT_KEY",
    "ServerSideFixedClipping",
    "ClientSideFixedClipping",
    "num_sampled_devices",
    "privacy_spent",
    "wrap_dp",
]

log = logging.getLogger("fedaffect.strategies")

DP_WEIGHT_KEY = "dp-weight"
"""Metric the inner strategy weighs replies by under DP: 1 on every reply (equal weights)."""


@functools.lru_cache(maxsize=256)
def privacy_spent(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Device-level epsilon spent after ``rounds`` rounds of the subsampled Gaussian mechanism.

    Each round samples each training device with probability ``q = sampling_rate`` and
    releases the noisy mean of the clipped updates (Gaussian mechanism of noise multiplier
    ``z`` on a sum of sensitivity ``C``). The rounds are composed with the Rényi-DP
    accountant of Google's ``dp-accounting`` (``RdpAccountant``,
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` composed ``rounds`` times,
    add-or-remove-one neighbouring relation), and converted to ``(epsilon, delta)``:

    * Rényi differential privacy and its composition: Mironov, "Rényi Differential
      Privacy", CSF 2017; the sampled Gaussian mechanism: Mironov, Talwar and Zhang,
      arXiv:1908.10530 (2019);
    * the moments accountant it refines: Abadi et al., "Deep Learning with Differential
      Privacy", CCS 2016;
    * devices instead of examples (user-level DP of federated averaging): McMahan et al.,
      "Learning Differentially Private Recurrent Language Models", ICLR 2018.

    fedaffect samples a fixed number ``m`` of the ``N`` training devices per round
    (uniformly, without replacement); like DP-FedAvg it is accounted as Poisson sampling with
    ``q = m / N``. With ``q = 1`` (every device every round, fedaffect's default) there is no
    sampling and the bound is the plain Gaussian mechanism's.

    Parameters
    ----------
    noise_multiplier : float
        ``z`` >= 0: noise standard deviation over the clipping norm (0 = no noise).
    sampling_rate : float
        ``q`` in (0, 1]: share of the training devices sampled per round.
    rounds : int
        Rounds so far (>= 0).
    delta : float
        Target delta in (0, 1).

    Returns
    -------
    float
        Epsilon; ``0.0`` after 0 rounds, ``inf`` when ``noise_multiplier`` is 0.

    Raises
    ------
    ValueError
        For a value out of range.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    absl = logging.getLogger("absl")  # fractional orders that do not converge are skipped, with a warning
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(rounds)))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def num_sampled_devices(cfg: RunConfig, num_train_devices: int) -> int:
    """Devices FedAvg samples per round: ``max(int(N * fraction-train), min-train-devices)``, at most ``N``."""
    min_train = max(1, min(cfg.min_train_devices, num_train_devices))
    return max(1, min(num_train_devices, max(int(num_train_devices * cfg.fraction_train), min_train)))


class _DeviceLevelDP:
    """What fedaffect adds to Flower's fixed-clipping wrappers: equal weights, the sampling
    rate and delta for accounting, and :meth:`epsilon`."""

    sampling_rate: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds (:func:`privacy_spent`)."""
        return privacy_spent(self.noise_multiplier, self.sampling_rate, rounds, self.delta)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        """Flower's, remembering the global arrays a zero update stands for."""
        self.round_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def _equal_weights(self, replies: list[Message]) -> None:
        for reply in replies:
            if not reply.has_error():
                for record in reply.content.metric_records.values():
                    record[DP_WEIGHT_KEY] = 1

    def _with_zero_updates(self, replies: list[Message]) -> list[Message]:
        """The successful replies, plus one zero update for every sampled device that failed or
        did not answer, up to ``num_sampled_clients``; ``replies`` as they are when none
        succeeded (nothing to release) or none is missing.

        A zero update is the global arrays of the round; its metrics are the mean of the
        successful replies' (so that e.g. ``train_loss`` is not pulled towards 0), weight 1.
        """
        good = [r for r in replies if not r.has_error()]
        missing = self.num_sampled_clients - len(good)
        if not good or missing <= 0:
            return replies
        log.info("DP: %d of %d sampled devices failed or did not answer; they count as zero updates",
                 missing, self.num_sampled_clients)
        template = good[0].content
        metrics = {}
        for name, record in template.metric_records.items():
            metrics[name] = MetricRecord({
                key: sum(float(g.content[name][key]) for g in good) / len(good)
                for key, value in record.items() if isinstance(value, (int, float))})
            metrics[name][DP_WEIGHT_KEY] = 1
        stand_ins = [
            Message(RecordDict({**{name: _copy_record(self.round_arrays) for name in template.array_records},
                                **{name: MetricRecord(dict(m)) for name, m in metrics.items()}}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
            for _ in range(missing)]
        return good + stand_ins


class ServerSideFixedClipping(_DeviceLevelDP, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, with equal weights and integer arrays kept."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._equal_weights(replies)
        replies = self._with_zero_updates(replies)
        for reply in replies:  # zero updates included: Flower's clipping divides by the norm
            if not reply.has_error():
                for name, record in list(reply.content.array_records.items()):
                    reply.content[name] = clippable_update(record, self.current_arrays)
        return super().aggregate_train(server_round, replies)


class ClientSideFixedClipping(_DeviceLevelDP, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (devices clip and keep integer arrays), with equal weights."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._equal_weights(replies)
        return super().aggregate_train(server_round, self._with_zero_updates(replies))


def _copy_record(record: ArrayRecord) -> ArrayRecord:
    """A new ArrayRecord with copies of ``record``'s arrays (same keys)."""
    return ArrayRecord({k: Array(np.array(a.numpy(), copy=True)) for k, a in record.items()})


def wrap_dp(strategy: Strategy, cfg: RunConfig, num_train_devices: int) -> Strategy:
    """Wrap ``strategy`` for ``cfg.dp`` (``off``: returned as is).

    The inner strategy must weigh replies by :data:`DP_WEIGHT_KEY` (``build_strategy`` builds
    it so). The wrapper's ``sampling_rate`` is ``m / N`` (:func:`num_sampled_devices`).

    Raises
    ------
    ValueError
        For an unknown ``dp`` mode.
    """
    if cfg.dp == "off":
        return strategy
    classes = {"server": ServerSideFixedClipping, "client": ClientSideFixedClipping}
    if cfg.dp not in classes:
        raise ValueError(f"unknown dp mode {cfg.dp!r}; known: {', '.join(DP_MODES)}")
    m = num_sampled_devices(cfg, num_train_devices)
    wrapped = classes[cfg.dp](strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, m)
    wrapped.sampling_rate = m / max(num_train_devices, 1)
    wrapped.delta = cfg.dp_delta
    log.info("DP (%s-side clipping): C = %g, z = %g, %d of %d devices per round (q = %.3f), delta = %g",
             cfg.dp, cfg.dp_clipping_norm, cfg.dp_noise_multiplier, m, num_train_devices, wrapped.sampling_rate,
             cfg.dp_delta)
    return wrapped
