"""Run configuration: every key a fedaffect run understands, its default and its check.

One place defines what a run can be told. The same keys travel as Flower's
``run_config`` (hyphenated, as in ``pyproject.toml``'s ``[tool.flwr.app.config]``), are
read from experiment files (TOML) and are overridden from the command line
(``fedaffect simulate --rounds 30`` sets ``num-server-rounds``).

A bad value or an unknown key raises :class:`ConfigError` naming the key, so a typo in an
experiment file is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ConfigError", "RunConfig", "load_config_file", "parse_set", "resumed_values", "STRATEGIES", "PARTITIONS", "TASKS"]

STRATEGIES = ("fedavg", "fedprox", "qfedavg", "fair")
PARTITIONS = ("speaker", "iid", "dirichlet")
TASKS = ("emotion", "av", "both")
MODES = ("supervised", "self-labelling", "active", "cooperative")  # cooperative learning (client/cooperative.py)
DP_MODES = ("off", "server", "client")  # differential privacy (strategies/dp.py)
DP_STRATEGIES = ("fedavg", "fedprox")  # strategies whose aggregate is a mean of updates


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


def _choice(options: tuple[str, ...]):
    def check(value: Any) -> str | None:
        return None if value in options else f"must be one of {', '.join(options)}"

    return check


def _names(text: Any) -> list[str]:
    """A comma-separated list of names, stripped, empty items dropped."""
    return [e.strip() for e in str(text).split(",") if e.strip()]


def _emotion_names(value: Any) -> str | None:
    from .manifest import EMOTIONS  # lazily: pandas

    names = _names(value)
    unknown = [e for e in names if e not in EMOTIONS]
    if unknown:
        return f"unknown emotion(s) {', '.join(map(repr, unknown))}; known: {', '.join(EMOTIONS)}"
    twice = sorted({e for e in names if names.count(e) > 1})
    return f"lists {', '.join(twice)} twice" if twice else None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _flag(value: Any) -> str | None:
    return None if value in (0, 1) else "must be 0 or 1"


def _probability(value: Any) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _half_open_unit(value: Any) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _open_unit(value: Any) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def _reliabilities(value: Any) -> str | None:
    try:
        probs = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        probs = []
    ok = probs and all(0 < p <= 1 for p in probs)
    return None if ok else "must be comma-separated probabilities in (0, 1], one per rater"


#: Local batch size of each model when ``batch-size`` is 0 (the default). A device holds tens
#: of clips, so a batch of 32 gives it a handful of optimiser steps an epoch; the sequence
#: models need more steps (docs/BENCHMARKS.md, quality: with 8 on both sides logmel-crnn's
#: federated-centralised gap on synth goes from +8.3 to 0.0 points and its hedgewars UAR from
#: .255 to .285), while egemaps-mlp loses 2.6-5.3 points of UAR with 8.
MODEL_BATCH_SIZES = {"egemaps-mlp": 32, "logmel-crnn": 8, "wave-cnn-gru": 8}
DEFAULT_BATCH_SIZE = 32
#: The models of :data:`shared_models.models.MODELS` (checked equal by the tests), so that a
#: config naming another is refused before any device loads it.
MODEL_NAMES = tuple(MODEL_BATCH_SIZES)

#: Torch threads of the in-process simulation per model (absent: torch's default, one per
#: core). egemaps-mlp's operations (a 32 x 88 batch) are too small to share between threads:
#: with two threads on a 2-core box that had other work, its synth cooperative runs took 3x
#: longer (13-24 s against 5 s) for identical results, while logmel-crnn ran as fast with
#: one as with two (docs/BENCHMARKS.md, issue 3).
MODEL_SIMULATION_THREADS = {"egemaps-mlp": 1}


def _opt(check, **kw):
    return field(metadata={"check": check}, **kw)


#: Command-line option names (``fedaffect simulate --rounds``) and the run-config keys they
#: set, for the hint of an unknown key written the option's way in a file or ``--set``.
OPTION_KEYS = {"rounds": "num-server-rounds", "epochs": "local-epochs", "alpha": "dirichlet-alpha",
               "devices": "num-devices", "batch": "batch-size"}


@dataclass
class RunConfig:
    """Configuration of one federated run (simulated or deployed).

    Attribute names are the run-config keys with ``-`` replaced by ``_``.

    Attributes
    ----------
    manifest : str
        Path of the clip manifest (CSV, see :mod:`shared_models.manifest`).
    model : str
        Registered affect model (``egemaps-mlp``, ``logmel-crnn``, ``wave-cnn-gru``).
    task : str
        ``emotion`` (categories, cross-entropy), ``av`` (arousal/valence, 1 - CCC) or
        ``both``.
    num_server_rounds : int
        Federated rounds.
    local_epochs, lr, batch_size : int, float, int
        Local training on each device per round (Adam). ``batch_size`` 0 (default): the
        model's own (:data:`MODEL_BATCH_SIZES`), see :attr:`local_batch_size`.
    strategy : str
        Aggregation strategy: ``fedavg``, ``fedprox``, ``qfedavg`` or ``fair``.
    proximal_mu, qffl_q, qffl_lipschitz : float
        FedProx proximal weight; q-FFL fairness exponent and its Lipschitz constant L
        (Flower's QFedAvg takes ``1 / L`` as ``client_learning_rate``; ``L = 1/lr`` assumes
        one local SGD step and shrinks multi-epoch Adam updates to nearly nothing).
    compute_device : str
        Where models train and evaluate: ``cpu`` (default), ``cuda``, or ``auto`` (CUDA when
        torch sees a GPU). Devices of a simulation share the one GPU, one after the other.
    bn_adapt : int
        1 (default): a device evaluates a global model with its batch-norm statistics
        re-estimated on its own clips (AdaBN, :func:`shared_models.training.adapt_batch_norm`;
        labels unused, nothing leaves the device); models without batch norm
        (``egemaps-mlp``) are unaffected. On the held-out speakers of the quality benchmark's
        stored models it raised UAR by up to 5.8 points (docs/BENCHMARKS.md). 0: the
        federation's averaged statistics.
    partition : str
        How clips become devices: ``speaker`` (one device per speaker), ``iid`` or
        ``dirichlet`` (label skew with concentration ``dirichlet_alpha``).
    num_devices : int
        Training devices for ``iid``/``dirichlet``; 0 means one per training speaker.
    folds, fold : int
        Leave-speakers-out cross-validation: speakers split into ``folds`` groups, group
        ``fold`` is held out (its devices only evaluate). ``folds = 1`` holds out nobody.
    seed : int
        Seed for folds, partitions, initial weights and local shuffling.
    fraction_train, min_train_devices : float, int
        Share of training devices sampled per round, and the least accepted.
    round_timeout : float
        Seconds the server waits for replies in a round; devices that do not answer in time
        are left out of that round.
    min_devices : int
        Deployment: devices that must be connected before the run starts (the coordinator
        waits up to ``round_timeout`` seconds for them); 0 starts with whoever is there.
    resume : str
        Name of a stored run to continue from its last valid checkpoint
        (``fedaffect train --resume RUN``, ``fedaffect simulate --resume RUN``); rounds stored
        after that checkpoint are re-run.
    store_url, run_dir, cache_dir, run_name : str
        Run store (SQLAlchemy URL; empty = SQLite file in ``run_dir``), folder for
        checkpoints and reports, feature cache folder, and a unique name for the run.
    mode : str
        Cooperative learning on the devices (Zhang et al., TASLP 2015; :mod:`client.cooperative`):
        ``supervised`` (labelled clips only), ``self-labelling`` (confident pool clips become
        pseudo-labels), ``active`` (least certain pool clips are asked of the device's person,
        or of simulated raters) or ``cooperative`` (both).
    label_fraction : float
        Simulation: each training device keeps the labels of a seeded stratified fraction of
        its clips; the rest is its unlabelled pool (deployment: unlabelled manifest rows).
    pseudo_schedule, pseudo_start, pseudo_end : str, float, float
        Pseudo-label confidence threshold over rounds, ``cosine`` (FedSTAR) or ``linear``,
        from ``pseudo-start`` at round 0 to ``pseudo-end`` at the last round. The defaults
        (0.9 -> 0.98, ``pseudo-per-class`` 2, ``pseudo-keep`` 0.8) are stricter than FedSTAR's
        0.5 -> 0.9: with a few labels per device the models are confidently wrong often, and
        on synth (egemaps-mlp, 10 % labels, 20 rounds, 4 folds) FedSTAR's range gave
        pseudo-labels of precision .55 that cost 1.2 UAR points against supervised-only
        training, the strict ones precision .68 and +0.5 points (docs/BENCHMARKS.md).
    pseudo_views, view_noise, pseudo_max_std : int, float, float
        Augmented views per clip (feature noise of std ``view-noise``, in standardised units),
        and the largest std of the chosen class's probability across views (view agreement;
        every view must also predict the same class).
    pseudo_per_class, pseudo_keep, pseudo_recheck : int, float, int
        At most ``pseudo-per-class`` new pseudo-labels per class and round; with
        ``pseudo-recheck = 1`` an accepted pseudo-label is dropped when the current model no
        longer predicts it or its mean probability falls below ``pseudo-keep``.
    pseudo_global_view : int
        1: the global model as received this round (before local training) is one more
        view: a pseudo-label needs its agreement too, and the re-check its support
        (co-training-like; on synth, 4 folds, 10 rounds, 10 % labels, thresholds 0.5 -> 0.9,
        it raised pseudo-label precision from .63 to .76).
    pseudo_knn : int
        k > 0: a categorical pseudo-label also needs the majority label of the clip's k nearest
        clips labelled by the device's person (standardised features; sequences averaged over
        time) to be the predicted class: a second, model-free opinion (co-training, Blum and
        Mitchell 1998). 0: off. No effect on raw waveforms.
    pseudo_align : int
        1: before choosing and re-checking categorical pseudo-labels, align the pool's predicted
        class distribution with the device's own labels (distribution alignment, Berthelot et
        al., ReMixMatch, ICLR 2020; :func:`client.cooperative.align_distribution`). On synth
        the commonest wrong pseudo-label was a bored clip called sad (46 % of the errors):
        alignment raised precision by 5-11 points at equal UAR (docs/BENCHMARKS.md).
    pseudo_max_share : float
        At most this share of a device's unlabelled clips holds a pseudo-label at once, the
        most confident first (curriculum labelling, Cascante-Bonilla et al., AAAI 2021); 1: no
        cap. A model trained on its own pseudo-labels grows sure of most of its pool, right or
        wrong, so past a point the threshold no longer tells them apart: on synth from a
        pre-trained start (docs/BENCHMARKS.md) the pool ended 80 % pseudo-labelled at precision
        .77-.78; the default 0.4 kept precision at .90-.93 with the same or a better UAR, and
        changed almost nothing from a random start (whose pool seldom reached 40 %).
    upsample : int
        1: upsample the labelled set (labels, answers, pseudo-labels) to an even class
        distribution before local training (cross-task self-labelling).
    uncertainty, av_max_std : str, float
        Uncertainty of arousal/valence: std across ``views`` or Monte-Carlo dropout
        (``mc-dropout``) samples; an arousal/valence pseudo-label needs std <= ``av-max-std``.
    query_per_round, query_total : int
        Active learning budget per device: clips queued per round and in total.
    pool_sample : int
        Most unlabelled clips a device's cooperative step scores a round besides those holding
        a pseudo-label (a new seeded random sample each round; 0: the whole pool). Bounds the
        step's cost on a device with many recordings.
    rater_reliability, agreement_min, agreement_max, max_raters : str, int, int, int
        Simulated raters (dynamic active learning, Yue Zhang et al. 2015): comma-separated
        probabilities of giving the true label (asked most reliable first); the agreement
        required rises from ``agreement-min`` (certain model) to ``agreement-max`` (uncertain
        model); at most ``max-raters`` are asked, then the majority is taken.
    init, freeze_rounds : str, int
        Transfer learning: checkpoint of ``fedaffect pretrain`` the federation starts from
        (empty: random init), and rounds in which devices train only the heads.
    emotions : str
        Comma-separated emotion classes of the categorical head, in output order; empty
        means every emotion found in the manifest, sorted.
    protected : str
        Comma-separated manifest columns whose values define the groups that per-group
        metrics are computed for (default ``gender``).
    fair_beta, fair_attribute : float, str
        Strategy ``fair`` (:mod:`strategies.fair`): step size of the fairness-normalised
        weights (0 = FedAvg) and the protected attribute (one of ``protected``) whose groups
        it balances.
    fair_balance : float
        Strategy ``fair``: each group's total aggregation weight before the fairness step is
        its FedAvg total to this power (1: FedAvg's; 0: every group the same total, however
        few devices it has; :func:`strategies.fair.group_balanced`). The defaults, balance
        0.5 with beta 5, narrowed FedAvg's gender gap in all four benchmark settings (12
        folds each, docs/BENCHMARKS.md) where beta 1 alone widened it in two.
    fair_validation : float
        Strategy ``fair``: the fraction of each device's labelled clips (seeded, stratified by
        emotion, at least one clip) kept out of local training and used for the device's
        ``pre-stats``, so that the group gaps the strategy reacts to come from clips the model
        has not been trained on. 0 (default): ``pre-stats`` on all the device's clips, as in
        FairFed's local metrics (the global model has trained on them). Measured with 0.2
        (docs/BENCHMARKS.md): it did not help on synth or hedgewars (4 folds): 7-14 clips per
        device make a noisy gap signal and the clips are missing from training.
    faireg : str
        ``on``: FaiReg label normalisation (:mod:`shared_models.fairness`): devices train on
        arousal/valence standardised per protected group (the intersection of the
        ``protected`` attributes) and predictions are mapped back to the label scale;
        ``off`` (default). Needs task ``av`` or ``both``.
    faireg_reference : str
        The FaiReg group whose label statistics define the label scale that predictions are
        mapped back to (e.g. ``male``; a group of several attributes is their values joined
        as the group keys are, see :func:`shared_models.fairness.faireg_group_keys`). Empty
        (default): the pooled statistics of all training labels, which carry any group's
        labelling bias, averaged over the groups, onto every prediction; with the reference
        of a group labelled without bias they carry none (docs/BENCHMARKS.md, fairness).
    dp, dp_clipping_norm, dp_noise_multiplier, dp_delta : str, float, float, float
        Differential privacy of the model updates (:mod:`strategies.dp`, user-level: one
        device): ``off``, ``server`` (the coordinator clips each update) or ``client`` (each
        device clips its own update); the L2 clipping norm ``C`` of an update, the noise
        multiplier ``z`` (Gaussian noise of std ``z C / m`` on the mean of ``m`` sampled
        updates) and the ``delta`` at which the spent epsilon is reported. Needs strategy
        ``fedavg`` or ``fedprox`` (updates are then averaged with equal weights).
    """

    manifest: str = ""
    model: str = _opt(_choice(MODEL_NAMES), default="egemaps-mlp")
    task: str = _opt(_choice(TASKS), default="emotion")
    num_server_rounds: int = _opt(_positive, default=10)
    local_epochs: int = _opt(_positive, default=2)
    lr: float = _opt(_positive, default=3e-3)
    batch_size: int = _opt(_non_negative, default=0)
    strategy: str = _opt(_choice(STRATEGIES), default="fedavg")
    proximal_mu: float = _opt(_non_negative, default=0.01)
    qffl_q: float = _opt(_non_negative, default=0.1)
    qffl_lipschitz: float = _opt(_positive, default=1.0)
    compute_device: str = _opt(_choice(("cpu", "cuda", "auto")), default="cpu")
    bn_adapt: int = _opt(_flag, default=1)
    partition: str = _opt(_choice(PARTITIONS), default="speaker")
    num_devices: int = _opt(_non_negative, default=0)
    dirichlet_alpha: float = _opt(_positive, default=0.5)
    folds: int = _opt(_positive, default=5)
    fold: int = _opt(_non_negative, default=0)
    seed: int = _opt(_non_negative, default=0)
    fraction_train: float = _opt(_fraction, default=1.0)
    min_train_devices: int = _opt(_positive, default=1)
    round_timeout: float = _opt(_positive, default=600.0)
    min_devices: int = _opt(_non_negative, default=0)
    resume: str = ""
    store_url: str = ""
    run_dir: str = "runs"
    cache_dir: str = ".cache/fedaffect"
    run_name: str = ""
    mode: str = _opt(_choice(MODES), default="supervised")
    label_fraction: float = _opt(_fraction, default=1.0)
    pseudo_schedule: str = _opt(_choice(("cosine", "linear")), default="cosine")
    pseudo_start: float = _opt(_probability, default=0.9)
    pseudo_end: float = _opt(_probability, default=0.98)
    pseudo_views: int = _opt(_positive, default=5)
    view_noise: float = _opt(_non_negative, default=0.1)
    pseudo_max_std: float = _opt(_non_negative, default=0.05)
    pseudo_per_class: int = _opt(_non_negative, default=2)
    pseudo_keep: float = _opt(_probability, default=0.8)
    pseudo_recheck: int = _opt(_flag, default=1)
    pseudo_global_view: int = _opt(_flag, default=1)
    pseudo_knn: int = _opt(_non_negative, default=0)
    pseudo_align: int = _opt(_flag, default=1)
    pseudo_max_share: float = _opt(_probability, default=0.4)
    upsample: int = _opt(_flag, default=0)
    uncertainty: str = _opt(_choice(("views", "mc-dropout")), default="views")
    av_max_std: float = _opt(_non_negative, default=0.05)
    query_per_round: int = _opt(_non_negative, default=2)
    query_total: int = _opt(_non_negative, default=10)
    pool_sample: int = _opt(_non_negative, default=512)
    rater_reliability: str = _opt(_reliabilities, default="0.9,0.85,0.8,0.75,0.7")
    agreement_min: int = _opt(_positive, default=2)
    agreement_max: int = _opt(_positive, default=3)
    max_raters: int = _opt(_positive, default=5)
    init: str = ""
    freeze_rounds: int = _opt(_non_negative, default=0)
    emotions: str = _opt(_emotion_names, default="")
    protected: str = "gender"
    fair_beta: float = _opt(_non_negative, default=5.0)
    fair_attribute: str = "gender"
    fair_validation: float = _opt(_half_open_unit, default=0.0)
    fair_balance: float = _opt(_probability, default=0.5)
    faireg: str = _opt(_choice(("off", "on")), default="off")
    faireg_reference: str = ""
    dp: str = _opt(_choice(DP_MODES), default="off")
    dp_clipping_norm: float = _opt(_positive, default=1.0)
    dp_noise_multiplier: float = _opt(_non_negative, default=1.0)
    dp_delta: float = _opt(_open_unit, default=1e-5)

    def __post_init__(self) -> None:
        for f in fields(self):
            key = f.name.replace("_", "-")
            want = _field_type(f)
            value = _coerce(want, getattr(self, f.name))
            setattr(self, f.name, value)
            if not isinstance(value, want) or isinstance(value, bool):
                raise ConfigError(f"config key '{key}': expected {want.__name__}, got {value!r}")
            check = f.metadata.get("check")
            problem = check(value) if check else None
            if problem:
                raise ConfigError(f"config key '{key}' = {value!r}: {problem}")
        if self.fold >= self.folds:
            raise ConfigError(f"config key 'fold' = {self.fold}: must be < folds ({self.folds})")
        if self.agreement_min > self.agreement_max:
            raise ConfigError(f"config key 'agreement-min' = {self.agreement_min}: must be <= agreement-max "
                              f"({self.agreement_max})")
        if self.dp != "off" and self.strategy not in DP_STRATEGIES:
            raise ConfigError(f"config key 'dp' = {self.dp!r}: needs strategy {' or '.join(DP_STRATEGIES)} (the "
                              f"privacy accounting assumes a mean of clipped updates), got {self.strategy!r}")

    @classmethod
    def typed(cls, key: str, value: Any) -> Any:
        """``value`` as the config holds it for ``key`` (unchecked): an int for a float key
        becomes a float, a number for a text key text (``--set run-name=7``: TOML reads
        numbers); other values are returned as they are.

        Raises
        ------
        ConfigError
            For an unknown key.
        """
        return _coerce(_field_type(_FIELDS[cls.check_key(key).replace("-", "_")]), value)

    @classmethod
    def keys(cls) -> list[str]:
        """Run-config keys (hyphenated), in definition order."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a run-config mapping (hyphenated or underscored keys).

        Raises
        ------
        ConfigError
            For an unknown key (with the closest known key suggested) or a bad value.
        """
        kwargs = {cls.check_key(key).replace("-", "_"): value for key, value in values.items()}
        return cls(**kwargs)

    @classmethod
    def check_key(cls, key: str) -> str:
        """The hyphenated run-config key ``key`` names (``local_epochs`` -> ``local-epochs``).

        Raises
        ------
        ConfigError
            For an unknown key: the key a command-line option of that name sets (``rounds``
            -> ``num-server-rounds``) or the closest known key is suggested; the known keys
            are listed only when nothing is close.
        """
        known = set(cls.keys())
        hyphen = key.replace("_", "-")
        if hyphen in known:
            return hyphen
        close = [OPTION_KEYS[hyphen]] if hyphen in OPTION_KEYS else difflib.get_close_matches(hyphen, known, n=1)
        if close:
            raise ConfigError(f"unknown config key '{key}' (did you mean '{close[0]}'?)")
        raise ConfigError(f"unknown config key '{key}'; known keys: {', '.join(sorted(known))}")

    def to_mapping(self) -> dict[str, Any]:
        """Hyphenated run-config mapping (what Flower's ``run_config`` carries)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def local_batch_size(self) -> int:
        """The batch size devices train with: ``batch_size``, or the model's default when 0."""
        return self.batch_size or MODEL_BATCH_SIZES.get(self.model, DEFAULT_BATCH_SIZE)

    @property
    def emotion_list(self) -> list[str]:
        """``emotions`` as a list (empty when unset)."""
        return _names(self.emotions)

    @property
    def protected_list(self) -> list[str]:
        """``protected`` as a list of manifest column names."""
        return _names(self.protected)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some keys changed (underscored or hyphenated names)."""
        merged = self.to_mapping()
        merged.update({k.replace("_", "-"): v for k, v in changes.items()})
        return RunConfig.from_mapping(merged)

    # Lightning-style persistence, so a stored run can be resumed with its own config.
    def state_dict(self) -> dict[str, Any]:
        return self.to_mapping()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        other = RunConfig.from_mapping(state)
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))


_FIELDS = {f.name: f for f in fields(RunConfig)}


def _field_type(f: dataclasses.Field) -> type:
    """The Python type of a RunConfig field (annotations are strings here)."""
    return f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]


def _coerce(want: type, value: Any) -> Any:
    """``value`` for a field of type ``want``: an int becomes a float for a float field, a
    number text for a text field (``--set rater-reliability=0.9``: one rater, ``run-name=7``:
    TOML reads numbers); anything else is left for the check."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def resumed_values(stored: Mapping[str, Any], name: str, named: Mapping[str, Any], may_change: Sequence[str],
                   *, ignored: Sequence[str] = (), command: str = "simulate", how: str = "") -> dict[str, Any]:
    """The run config that continues the stored run ``name``: its ``stored`` config with the
    ``may_change`` keys of ``named`` (the keys named for the resumed command, hyphenated), and
    ``resume`` = ``name``. Shared by ``simulate --resume`` and deployment's ``train --resume``.

    Raises
    ------
    ConfigError
        Naming every other key of ``named`` (but ``ignored`` and ``resume``) whose value
        differs from the stored one, with both values (the same value is accepted: a command
        or experiment file given again): the run's rounds and checkpoint were trained with it.
    """
    before = RunConfig.from_mapping(stored).to_mapping()
    before["run-name"] = name
    skip = {*may_change, *ignored, "resume"}
    changed = [f"{key} {before[key]!r} -> {RunConfig.typed(key, value)!r}" for key, value in named.items()
               if key not in skip and RunConfig.typed(key, value) != before[key]]
    if changed:
        them = "it" if len(changed) == 1 else "them"
        raise ConfigError(f"run {name!r} is resumed with its stored config: {', '.join(changed)} would change what "
                          f"it trains. Drop {them}, or {command} with {them} in a new run (without --resume); a "
                          f"resumed run may change only {', '.join(may_change)}{how}")
    return {**stored, **{k: v for k, v in named.items() if k in may_change}, "resume": name}


def parse_set(item: str) -> tuple[str, Any]:
    """One ``--set key=value`` item: the hyphenated run-config key and the value read as a TOML
    value (``3``, ``0.5``, ``true``, ``'text'``), or as text when it is not one
    (``--set rater-reliability=0.9,0.8``).

    Raises
    ------
    ConfigError
        For an item without ``=``, or an unknown key (named, with the closest known key).
    """
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        key = RunConfig.check_key(key.strip())
    except ConfigError as err:
        raise ConfigError(f"--set {item}: {err}") from None
    try:
        return key, tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw.strip()


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read an experiment file (TOML) into a run-config mapping.

    The file holds run-config keys at top level, or under a ``[run]`` table::

        model = "logmel-crnn"
        num-server-rounds = 30

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ConfigError
        If the TOML does not parse or names an unknown key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"experiment file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    data = data.get("run", data)
    try:
        RunConfig.from_mapping(data)  # validate keys and values now, naming the bad key
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return dict(data)
