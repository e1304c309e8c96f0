"""Aggregation strategies of fedaffect, built on ``flwr.serverapp.strategy``.

A strategy decides which devices train in a round and how their updates are combined.
:func:`build_strategy` turns a run config into one of:

``fedavg``
    Federated Averaging, weights by ``num-examples`` (McMahan et al., AISTATS 2017).
``fedprox``
    FedAvg with a proximal term ``mu/2 ||w - w_global||^2`` in local training (Li et al.,
    MLSys 2020); the devices read ``proximal-mu`` from the round config.
``qfedavg``
    q-FFL, fair resource allocation (Li et al., ICLR 2020): re-weights by ``train_loss``.
``fair``
    Fairness-normalised FedAvg (:class:`strategies.fair.FairAvg`, after FairFed, Ezzeldin et
    al., AAAI 2023): FedAvg's weights re-balanced between the groups of a protected
    attribute (``fair-balance``), then devices of a group that is behind the global metric get
    more weight (``fair-beta``, ``fair-attribute``); ``fair-beta = 0`` with
    ``fair-balance = 1`` is FedAvg.

With ``dp = "server"`` or ``"client"`` the strategy (``fedavg`` or ``fedprox``) is wrapped in
Flower's fixed-clipping differential-privacy wrapper (:mod:`strategies.dp`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, QFedAvg, Strategy

from shared_models.config import STRATEGIES, RunConfig
from strategies.dp import DP_WEIGHT_KEY, wrap_dp
from strategies.fair import FairAvg

__all__ = ["build_strategy", "min_train_devices", "STRATEGIES"]


def min_train_devices(cfg: RunConfig, num_train_devices: int) -> int:
    """Devices a round's training needs: ``min-train-devices``, capped at the federation's
    training devices, at least 1 (the strategies' ``min_train_nodes`` and
    ``min_available_nodes``)."""
    return max(1, min(cfg.min_train_devices, num_train_devices))


def build_strategy(cfg: RunConfig, num_train_devices: int) -> Strategy:
    """Build the aggregation strategy named by ``cfg.strategy``.

    Parameters
    ----------
    cfg : RunConfig
        Run config (``strategy``, ``fraction-train``, ``min-train-devices``,
        ``proximal-mu``, ``qffl-q``, ``qffl-lipschitz``, ``fair-beta``, ``fair-attribute``, ``task``,
        ``dp``, ``dp-clipping-norm``, ``dp-noise-multiplier``, ``dp-delta``).
    num_train_devices : int
        Training devices in the federation (caps ``min-train-devices``).

    Returns
    -------
    flwr.serverapp.strategy.Strategy

    Raises
    ------
    ValueError
        For an unknown strategy name (the list of known names is in the message), or a
        ``fair-attribute`` that is not one of the ``protected`` attributes.
    """
    min_train = min_train_devices(cfg, num_train_devices)
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_train,
        min_evaluate_nodes=1,
        min_available_nodes=min_train,
    )
    if cfg.dp != "off":  # equal weights: the DP noise is calibrated to a mean of clipped updates
        common["weighted_by_key"] = DP_WEIGHT_KEY
    if cfg.strategy == "fedavg":
        return wrap_dp(FedAvg(**common), cfg, num_train_devices)
    if cfg.strategy == "fedprox":
        return wrap_dp(FedProx(proximal_mu=cfg.proximal_mu, **common), cfg, num_train_devices)
    if cfg.strategy == "qfedavg":
        return QFedAvg(client_learning_rate=1.0 / cfg.qffl_lipschitz, q=cfg.qffl_q, **common)
    if cfg.strategy == "fair":
        if cfg.fair_attribute not in cfg.protected_list:
            raise ValueError(f"fair-attribute {cfg.fair_attribute!r} is not a protected attribute "
                             f"(protected = {cfg.protected!r}); add it to 'protected'")
        return FairAvg(beta=cfg.fair_beta, attribute=cfg.fair_attribute, balance=cfg.fair_balance, task=cfg.task,
                       **common)
    raise ValueError(f"unknown strategy {cfg.strategy!r}; known: {', '.join(STRATEGIES)}")
