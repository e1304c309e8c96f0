"""The federation plan: which speakers are held out, and which clips each device holds.

A plan is a pure function of the manifest and the run configuration, so that the
coordinator, every simulated device and a centralised baseline compute the same split
without talking to each other.

Leave-speakers-out evaluation (the standard protocol of speaker-independent speech emotion
recognition, e.g. Schuller et al., "Acoustic emotion recognition: a benchmark comparison
of performances", ASRU 2009): speakers are dealt into ``folds`` groups, balanced by gender;
the speakers of group ``fold`` are *held out*: each becomes an evaluation-only device and
is never trained on. The remaining clips are spread over training devices by one of the
partitions:

``speaker``
    one device per training speaker (the natural federation: a device is a person's phone);
``iid``
    clips shuffled and dealt evenly over ``num_devices`` devices;
``dirichlet``
    label skew: for every emotion class, its clips are split over the devices with
    proportions drawn from ``Dirichlet(alpha)`` (Hsu et al., "Measuring the effects of
    non-identical data distribution for federated visual classification", 2019).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["DevicePlan", "speaker_folds", "plan_federation", "emotion_classes", "TRAIN", "HELDOUT"]

TRAIN = "train"
HELDOUT = "heldout"


@dataclass(frozen=True)
class DevicePlan:
    """One device of a planned federation.

    Attributes
    ----------
    partition_id : int
        Index of the device (Flower's ``partition-id`` node config in simulation).
    role : str
        ``"train"`` (trains and evaluates) or ``"heldout"`` (evaluates only).
    rows : np.ndarray
        Integer positions (``iloc``) of the device's clips in the manifest, shape (n_clips,).
    speakers : tuple of str
        Speakers whose clips the device holds.
    """

    partition_id: int
    role: str
    rows: np.ndarray = field(repr=False)
    speakers: tuple[str, ...]

    @property
    def name(self) -> str:
        """Human-readable device name, e.g. ``dev-03 (synth-f1)``."""
        who = self.speakers[0] if len(self.speakers) == 1 else f"{len(self.speakers)} speakers"
        return f"dev-{self.partition_id:02d} ({who})"


def speaker_folds(manifest: pd.DataFrame, folds: int, seed: int) -> list[list[str]]:
    """Deal the manifest's speakers into ``folds`` groups, balanced by gender.

    Speakers are shuffled with ``seed`` within each gender and dealt round-robin, the
    genders one after the other, so every fold gets as even a gender mix as the corpus
    allows.

    Parameters
    ----------
    manifest : pd.DataFrame
        Manifest with ``speaker`` and ``gender`` columns.
    folds : int
        Number of groups (1 puts every speaker in the single group).
    seed : int
        Shuffling seed.

    Returns
    -------
    list of list of str
        ``folds`` lists of speaker ids.

    Raises
    ------
    ValueError
        If there are fewer speakers than folds.
    """
    genders = manifest.groupby("speaker", sort=True)["gender"].first()
    if len(genders) < folds:
        raise ValueError(f"{len(genders)} speakers cannot be split into {folds} folds")
    rng = np.random.default_rng(seed)
    ordered: list[str] = []
    for gender in sorted(genders.unique()):
        speakers = sorted(genders.index[genders == gender])
        ordered += [speakers[i] for i in rng.permutation(len(speakers))]
    groups: list[list[str]] = [[] for _ in range(folds)]
    for i, speaker in enumerate(ordered):
        groups[i % folds].append(speaker)
    return groups


def _dirichlet_split(labels: np.ndarray, n_devices: int, alpha: float, rng) -> list[np.ndarray]:
    """Positions of ``labels`` per device with Dirichlet(alpha) class proportions.

    Redraws (up to 100 times) until every device holds at least one clip.
    """
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_devices)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_devices, alpha))) * len(idx)).astype(int)[:-1]
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev] += chunk.tolist()
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"could not give each of {n_devices} devices a clip with dirichlet-alpha={alpha}; "
        "raise alpha or lower num-devices"
    )


def plan_federation(
    manifest: pd.DataFrame,
    *,
    partition: str = "speaker",
    num_devices: int = 0,
    folds: int = 5,
    fold: int = 0,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
) -> list[DevicePlan]:
    """Plan the devices of a simulated federation.

    Parameters
    ----------
    manifest : pd.DataFrame
        Validated manifest (see :func:`shared_models.manifest.read_manifest`).
    partition : {"speaker", "iid", "dirichlet"}
        How training clips are spread over training devices.
    num_devices : int
        Training devices for ``iid`` and ``dirichlet``; 0 means one per training speaker.
        Ignored for ``speaker``.
    folds, fold : int
        Leave-speakers-out split: speakers of group ``fold`` of ``folds`` are held out.
        With ``folds == 1`` nobody is held out.
    dirichlet_alpha : float
        Concentration of the label-skew partition (smaller is more skewed).
    seed : int
        Seed of the folds and the partition.

    Returns
    -------
    list of DevicePlan
        Training devices first (partition ids 0..), then one held-out device per held-out
        speaker.

    Raises
    ------
    ValueError
        For an unknown partition, ``fold >= folds`` or too few speakers.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    heldout = set(speaker_folds(manifest, folds, seed)[fold]) if folds > 1 else set()
    speakers = manifest["speaker"].to_numpy()
    train_pos = np.flatnonzero(~np.isin(speakers, list(heldout)))
    rng = np.random.default_rng(seed + 1)

    if partition == "speaker":
        parts = [train_pos[speakers[train_pos] == s] for s in sorted(set(speakers[train_pos]))]
    elif partition in ("iid", "dirichlet"):
        n_dev = num_devices or len(set(speakers[train_pos]))
        if n_dev > len(train_pos):
            raise ValueError(f"num-devices={n_dev} exceeds the {len(train_pos)} training clips")
        if partition == "iid":
            parts = [np.sort(p) for p in np.array_split(rng.permutation(train_pos), n_dev)]
        else:
            labels = manifest["emotion"].to_numpy()[train_pos]
            parts = [train_pos[p] for p in _dirichlet_split(labels, n_dev, dirichlet_alpha, rng)]
    else:
        raise ValueError(f"unknown partition {partition!r}; known: speaker, iid, dirichlet")

    plans = [
        DevicePlan(i, TRAIN, rows, tuple(sorted(set(speakers[rows])))) for i, rows in enumerate(parts)
    ]
    for speaker in sorted(heldout):
        rows = np.flatnonzero(speakers == speaker)
        plans.append(DevicePlan(len(plans), HELDOUT, rows, (speaker,)))
    return plans


def emotion_classes(cfg, manifest: pd.DataFrame) -> list[str]:
    """Emotion classes of the categorical head, in output order.

    The run config's ``emotions`` when set (so every party agrees even without the whole
    manifest), else every emotion present in ``manifest``, sorted.

    Parameters
    ----------
    cfg : shared_models.config.RunConfig
    manifest : pd.DataFrame

    Returns
    -------
    list of str
    """
    return cfg.emotion_list or sorted(e for e in manifest["emotion"].unique() if e)
