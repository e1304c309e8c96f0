"""Federation plans: held-out speakers never train, folds cover everyone once."""

import numpy as np
import pandas as pd
import pytest

from shared_models.federation import HELDOUT, TRAIN, plan_federation, speaker_folds


def manifest(n_speakers=10, clips=12):
    rows = []
    for s in range(n_speakers):
        for c in range(clips):
            rows.append(dict(path=f"/x/{s}_{c}.wav", speaker=f"spk{s:02d}", gender="female" if s % 2 else "male",
                             emotion=["anger", "sadness", "neutral"][c % 3]))
    return pd.DataFrame(rows)


def test_folds_partition_speakers_and_balance_gender():
    df = manifest()
    groups = speaker_folds(df, 5, seed=3)
    flat = [s for g in groups for s in g]
    assert sorted(flat) == sorted(df.speaker.unique())
    genders = df.groupby("speaker").gender.first()
    for g in groups:  # 5 male + 5 female over 5 folds: one of each per fold
        assert sorted(genders[g]) == ["female", "male"]


@pytest.mark.parametrize("partition", ["speaker", "iid", "dirichlet"])
def test_heldout_speakers_never_train(partition):
    df = manifest()
    plans = plan_federation(df, partition=partition, folds=5, fold=2, seed=1, dirichlet_alpha=0.3)
    held = {s for p in plans if p.role == HELDOUT for s in p.speakers}
    assert held == set(speaker_folds(df, 5, 1)[2])
    train_rows = np.concatenate([p.rows for p in plans if p.role == TRAIN])
    assert not set(df.speaker.iloc[train_rows]) & held
    # every clip is on exactly one device
    all_rows = np.concatenate([p.rows for p in plans])
    assert sorted(all_rows.tolist()) == list(range(len(df)))
    assert all(len(p.rows) > 0 for p in plans)


def test_speaker_partition_is_one_device_per_speaker():
    plans = plan_federation(manifest(), partition="speaker", folds=5, fold=0)
    assert [p.role for p in plans].count(TRAIN) == 8
    assert all(len(p.speakers) == 1 for p in plans)


def test_iid_partition_sizes_and_determinism():
    df = manifest()
    a = plan_federation(df, partition="iid", num_devices=4, folds=5, fold=0, seed=7)
    b = plan_federation(df, partition="iid", num_devices=4, folds=5, fold=0, seed=7)
    sizes = [len(p.rows) for p in a if p.role == TRAIN]
    assert sizes == [24, 24, 24, 24]
    assert all(np.array_equal(x.rows, y.rows) for x, y in zip(a, b))


def test_dirichlet_small_alpha_skews_labels():
    df = manifest(n_speakers=10, clips=30)
    plans = plan_federation(df, partition="dirichlet", num_devices=6, folds=1, fold=0, dirichlet_alpha=0.1, seed=0)
    shares = [df.emotion.iloc[p.rows].value_counts(normalize=True).max() for p in plans]
    assert np.mean(shares) > 0.6  # most devices dominated by one class


def test_no_heldout_with_one_fold_and_errors():
    df = manifest(n_speakers=3)
    assert all(p.role == TRAIN for p in plan_federation(df, folds=1, fold=0))
    with pytest.raises(ValueError, match="folds"):
        plan_federation(df, folds=5, fold=0)
    with pytest.raises(ValueError, match="partition"):
        plan_federation(df, partition="round-robin", folds=1, fold=0)
