"""Fairness: worst group and largest gap between genders, and how much of a labelling bias FaiReg removes.

Scenarios (gender is the protected attribute; the held-out speakers of a fold are the same in
every scenario, and their labels are never changed):

``balanced``
    the corpus as it is;
``underrep``
    one gender (``--minority``) under-represented 1:4 in training devices: all but
    ``max(1, n_majority // 4)`` of its training speakers lose their labels (their devices do
    not train; evaluation is untouched);
``bias``
    labelling bias: the training speakers of one gender (``--minority``) get arousal labels
    ``clip(a * y + b, -1, 1)`` (``--bias-a``, ``--bias-b``).

Strategies ``fedavg``, ``qfedavg``, ``fair`` run in every scenario given; FaiReg on is run only
for ``--faireg-strategies`` in ``--faireg-scenarios`` (the bias scenario needs the balanced
run of the same strategy and FaiReg setting as its clean reference). Per run: mean UAR and
arousal CCC of the held-out speakers, the worst group and the largest gap between genders,
Equal Accuracy / Statistical Parity gaps, averaged over the folds run.

Target (a): the fair strategy's largest gender UAR gap is at most half of FedAvg's, at a mean
UAR at most 1 point below FedAvg's (same scenario, FaiReg off, gaps and UAR averaged over
folds).

Target (b): FaiReg removes >= 80 % of an injected per-group affine label bias. Devices
standardise their features per device (= per speaker), which hides gender from the model, so
a bias in one gender's training labels becomes a shift of *everybody's* predictions and
hardly opens a gap between the genders: a between-gender gap has nothing to measure. What is
measured instead is how much of the injected bias reaches the predictions, clip by clip,
against the clean run. After each run the bench loads the final global model and predicts the
held-out clips itself (the same clips in both scenarios); for a held-out clip ``i`` with
arousal label ``y_i``:

* ``inj_i = clip(a y_i + b, -1, 1) - y_i``: what the biased labellers would have done to it;
* ``shift_i = p_i(bias) - p_i(balanced)``: how the prediction moved when the training labels
  were biased (same strategy, same FaiReg setting, same fold and seed);
* ``carried_g = sum_i shift_i inj_i / sum_i inj_i^2`` over the held-out clips of gender ``g``
  (all folds): the share of the injected per-clip bias found in the predictions (1: the
  predictions follow the biased labels; 0: no trace of them), and ``shift_g`` its mean.

``bias_removed = 1 - carried(FaiReg on) / carried(FaiReg off)`` for the biased gender (the
same for the other gender is reported as ``bias_removed_other``: the bias leaks to it).
FaiReg on is measured in two spaces:

``model`` (FaiReg's claim)
    the model's own outputs ``p'`` (normalised scale), put in label units with the clean
    run's mapping ``3 * std_pooled(clean) * p'`` (linear, unclipped), so that only the model
    differs between the two runs;
``label`` (what a user of the model sees)
    predictions mapped back to the label scale as the devices report them,
    ``clip(mean_pooled + 3 * std_pooled * p', -1, 1)`` with the *pooled* statistics of the
    run's own (biased) training labels (:meth:`shared_models.fairness.FaiRegParams.denormalise`).

FaiReg off has one space (label = model). The pooled mapping back carries the labellers'
bias averaged over the groups (the biased group's labels are in the pooled mean and std),
so in label space FaiReg can remove at most what the per-group normalisation keeps out of
the model *and* the mapping does not put back.

    python bench/fairness.py --corpora synth --folds 4 --rounds 10 --strategies fedavg,fair,qfedavg --tag synth
    python bench/fairness.py --corpora synth --rounds 3 --run-folds 1 --tag small   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import DATA, corpus_manifest, quiet_flower, save

from client.app import load_device
from server.simulation import simulate
from server.store import RunStore, default_store_url
from shared_models.config import RunConfig
from shared_models.fairness import FAIREG_SCALE, faireg_group_keys, faireg_params, label_stats, pool_label_stats
from shared_models.federation import HELDOUT, TRAIN, plan_federation, speaker_folds
from shared_models.manifest import read_manifest, write_manifest
from shared_models.metrics import ccc
from shared_models.models import build_model
from shared_models.training import predict

SCENARIOS = ("balanced", "underrep", "bias")


def bench_manifest(corpus: str, synth_speakers: int) -> Path:
    """``hedgewars`` (13 packs) or a synth corpus with ``synth_speakers`` voices (10 gives
    4 + 4 training speakers per fold with 5 folds, so 1:4 is possible)."""
    if corpus != "synth":
        return corpus_manifest(corpus)
    from client.corpora import synth_prepare

    out = DATA / f"synth{synth_speakers}.csv"
    if not out.exists():
        synth_prepare(DATA / f"synth{synth_speakers}", out, n_speakers=synth_speakers)
    return out


def scenario_manifest(src: Path, scenario: str, *, folds: int, fold: int, seed: int, minority: str,
                      bias_a: float, bias_b: float, out_dir: Path) -> tuple[Path, dict]:
    """Write the scenario's manifest (training speakers changed only); returns it and a note."""
    df = read_manifest(src)
    heldout = set(speaker_folds(df, folds, seed)[fold]) if folds > 1 else set()
    train = df[~df["speaker"].isin(heldout)]
    genders = train.groupby("speaker")["gender"].first()
    minority_speakers = sorted(genders.index[genders == minority])
    majority = int((genders != minority).sum())
    note = {"heldout": sorted(heldout), "train_speakers": {g: int((genders == g).sum()) for g in sorted(set(genders))}}
    if scenario == "underrep":
        keep = max(1, majority // 4)
        dropped = minority_speakers[keep:]
        m = df["speaker"].isin(dropped)
        df.loc[m, "emotion"] = ""
        df.loc[m, ["arousal", "valence"]] = np.nan
        note.update(kept=minority_speakers[:keep], dropped=dropped, ratio=f"{keep}:{majority}")
    elif scenario == "bias":
        m = df["speaker"].isin(minority_speakers)
        df.loc[m, "arousal"] = np.clip(bias_a * df.loc[m, "arousal"] + bias_b, -1, 1)
        note.update(biased=minority_speakers, affine=[bias_a, bias_b])
    elif scenario != "balanced":
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    path = out_dir / f"{src.stem}-{scenario}-f{fold}.csv"
    write_manifest(df, path)
    return path, note



def final_group_uar(cfg: RunConfig) -> dict[str, float]:
    """Held-out UAR per gender at the run's last round, from the run store (group -> UAR)."""
    store = RunStore(cfg.store_url or default_store_url(cfg.run_dir))
    rows = [r for r in store.group_metrics(store.get_run(cfg.run_name).id)
            if r["attribute"] == "gender" and r["metric"] == "uar"]
    last = max((r["round"] for r in rows), default=None)
    return {r["group"]: r["value"] for r in rows if r["round"] == last}


def paired(rows: list[dict], corpus: str, scenario: str, strategy: str) -> str | None:
    """Fold-paired change of ``strategy`` against FedAvg (FaiReg off): the largest gender gap
    and the minority's UAR, with standard errors over the folds; None without both runs."""
    pick = {r["strategy"]: r for r in rows if (r["corpus"], r["scenario"], r["faireg"]) == (corpus, scenario, "off")}
    if "fedavg" not in pick or strategy not in pick:
        return None
    a, b = (np.asarray(pick[k]["gap_uar/gender:folds"], float) for k in ("fedavg", strategy))
    if a.size < 2 or a.size != b.size:
        return None
    d = b - a

    def se(x: np.ndarray) -> float:
        return float(np.std(x, ddof=1) / np.sqrt(x.size))

    text = (f"{corpus} {scenario}: {strategy} - FedAvg, paired over {a.size} folds: gap {d.mean():+.3f} "
            f"(s.e. {se(d):.3f}; a halving would be {-a.mean() / 2:+.3f}), folds at or under half of "
            f"FedAvg's gap {int((b <= a / 2).sum())}/{a.size}")
    groups = [k.split("=")[1].split(":")[0] for k in pick["fedavg"] if k.startswith("uar/gender=")]
    if {"female", "male"} <= set(groups):
        fa, ma = (np.asarray(pick["fedavg"][f"uar/gender={g}:folds"], float) for g in ("female", "male"))
        text += f"; FedAvg female - male UAR {np.mean(fa - ma):+.3f} (s.e. {se(fa - ma):.3f})"
    return text


def _final(summary: dict, key: str) -> float:
    v = summary["final"].get(key, {}).get("mean")
    return float("nan") if v is None else float(v)


def heldout_arousal(cfg: RunConfig) -> dict:
    """The run's final global model on its held-out clips, predicted here (not on a device).

    Returns
    -------
    dict
        Per held-out clip: ``path``, ``gender``, ``y`` (arousal label), ``model`` (the model's
        arousal output: normalised scale with FaiReg on) and ``label`` (the prediction on the
        label scale, as devices report it); ``pooled`` = ``(mean, std)`` of the training
        arousal labels that FaiReg maps back with (None with FaiReg off).
    """
    import torch

    ckpt = torch.load(Path(cfg.run_dir) / cfg.run_name / "checkpoints" / f"round-{cfg.num_server_rounds:04d}.pt",
                      weights_only=True)
    run_cfg = RunConfig.from_mapping(ckpt["config"])
    plans = plan_federation(read_manifest(run_cfg.manifest), partition=run_cfg.partition,
                            num_devices=run_cfg.num_devices, folds=run_cfg.folds, fold=run_cfg.fold,
                            dirichlet_alpha=run_cfg.dirichlet_alpha, seed=run_cfg.seed)
    mapping = run_cfg.to_mapping()
    params = None
    if run_cfg.faireg == "on":  # what the server computed before round 1 (server/app.py, _faireg_config)
        parts = []
        for plan in plans:
            if plan.role == TRAIN:
                dev = load_device(mapping, {"partition-id": plan.partition_id})
                parts.append(label_stats(dev.data.av, faireg_group_keys(dev.data.groups, run_cfg.protected_list,
                                                                        len(dev.data))))
        params = faireg_params(pool_label_stats(parts), run_cfg.protected_list, reference=run_cfg.faireg_reference)
    model = build_model(run_cfg.model, max(len(ckpt["emotions"]), 1))
    model.load_state_dict(ckpt["state_dict"])
    manifest = read_manifest(run_cfg.manifest)
    out = {k: [] for k in ("path", "gender", "y", "model", "label")}
    for plan in plans:
        if plan.role != HELDOUT:
            continue
        dev = load_device(mapping, {"partition-id": plan.partition_id})
        _, av = predict(model, dev.data)
        label = params.denormalise(av) if params is not None else av
        rows = manifest.iloc[plan.rows]
        if len(rows) != len(dev.data):
            raise RuntimeError(f"{plan.name}: {len(rows) - len(dev.data)} unusable clips; cannot pair clips")
        out["path"] += rows["path"].astype(str).tolist()
        out["gender"] += [str(g) for g in dev.data.groups["gender"]]
        out["y"] += dev.data.av[:, 0].tolist()
        out["model"] += av[:, 0].tolist()
        out["label"] += label[:, 0].tolist()
    res = {k: np.asarray(v) for k, v in out.items()}
    res["pooled"] = None if params is None else tuple(float(v) for v in params.pooled[0])
    return res


def carried(clean: list[dict], biased: list[dict], *, space: str, gender: str, a: float, b: float) -> dict:
    """How much of the injected bias reaches the predictions of ``gender``'s held-out clips.

    ``clean`` and ``biased`` are :func:`heldout_arousal` of the same folds (balanced and bias
    scenario). In ``space = "model"`` the model outputs are put in label units with the clean
    run's mapping (``FAIREG_SCALE * std_pooled(clean)``; identity with FaiReg off).

    Returns ``carried`` (least-squares share of ``inj_i`` in ``shift_i``), ``shift`` (mean
    shift), ``injected`` (mean ``inj_i``), ``n`` (clips).
    """
    num = den = 0.0
    shifts, injs = [], []
    for c, bi in zip(clean, biased):
        if not np.array_equal(c["path"], bi["path"]):
            raise RuntimeError("held-out clips differ between the clean and the biased run")
        m = c["gender"] == gender
        if space == "model":
            scale = 1.0 if c["pooled"] is None else FAIREG_SCALE * c["pooled"][1]
            shift = scale * (bi["model"][m] - c["model"][m])
        else:
            shift = bi["label"][m] - c["label"][m]
        y = c["y"][m]
        inj = np.clip(a * y + b, -1, 1) - y
        num += float(shift @ inj)
        den += float(inj @ inj)
        shifts.append(shift)
        injs.append(inj)
    shifts, injs = np.concatenate(shifts), np.concatenate(injs)
    nan = float("nan")
    return {"carried": num / den if den > 0 else nan, "shift": float(shifts.mean()) if shifts.size else nan,
            "injected": float(injs.mean()) if injs.size else nan, "n": int(shifts.size)}


def runs_wanted(args) -> list[tuple[str, str, str]]:
    """(scenario, strategy, faireg) cells to run."""
    cells = []
    for scenario in args.scenarios.split(","):
        strategies = args.bias_strategies if scenario == "bias" else args.strategies
        for strategy in strategies.split(","):
            for faireg in args.faireg.split(","):
                if faireg == "on" and (scenario not in args.faireg_scenarios.split(",")
                                       or strategy not in args.faireg_strategies.split(",")):
                    continue
                cells.append((scenario, strategy, faireg))
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default="synth,hedgewars")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--strategies", default="fedavg,qfedavg,fair", help="strategies of balanced and underrep")
    p.add_argument("--bias-strategies", default="fedavg", help="strategies of the bias scenario")
    p.add_argument("--faireg", default="off,on")
    p.add_argument("--faireg-strategies", default="fedavg", help="strategies also run with FaiReg on")
    p.add_argument("--faireg-scenarios", default="balanced,bias", help="scenarios also run with FaiReg on")
    p.add_argument("--faireg-reference", default="",
                   help="FaiReg group whose statistics map predictions back (default: all training labels pooled)")
    p.add_argument("--model", default="egemaps-mlp")
    p.add_argument("--task", default="both")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--run-folds", type=int, default=0, help="run only the first N folds (0 = all)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--fair-beta", type=float, default=5.0)
    p.add_argument("--fair-balance", type=float, default=0.5, help="strategy fair: group re-balancing (1 none, 0 equal)")
    p.add_argument("--qffl-q", type=float, default=0.1)
    p.add_argument("--fair-validation", type=float, default=0.0,
                   help="fair: fraction of each device's labelled clips kept back for its pre-stats")
    p.add_argument("--minority", default="female", help="gender under-represented / biased")
    p.add_argument("--bias-a", type=float, default=0.5)
    p.add_argument("--bias-b", type=float, default=0.4)
    p.add_argument("--synth-speakers", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    quiet_flower()
    out_dir = DATA / "fairness"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, notes, heldout, verdicts = [], {}, {}, []
    stamp = int(time.time())
    folds = range(args.run_folds or args.folds)
    for corpus in args.corpora.split(","):
        src = bench_manifest(corpus, args.synth_speakers)
        for scenario, strategy, faireg in runs_wanted(args):
            per_fold, preds, group_uar = [], [], []
            t0 = time.perf_counter()
            for fold in folds:
                manifest, note = scenario_manifest(
                    src, scenario, folds=args.folds, fold=fold, seed=args.seed, minority=args.minority,
                    bias_a=args.bias_a, bias_b=args.bias_b, out_dir=out_dir)
                notes[f"{corpus}/{scenario}/fold{fold}"] = note
                cfg = RunConfig(manifest=str(manifest), model=args.model, task=args.task, folds=args.folds,
                                fold=fold, num_server_rounds=args.rounds, local_epochs=args.local_epochs,
                                strategy=strategy, fair_beta=args.fair_beta, fair_balance=args.fair_balance,
                                qffl_q=args.qffl_q,
                                fair_validation=args.fair_validation if strategy == "fair" else 0.0,
                                faireg=faireg, faireg_reference=args.faireg_reference if faireg == "on" else "",
                                seed=args.seed, run_dir="runs/bench",
                                run_name=f"fair-{corpus}-{scenario}-{strategy}-{faireg}-f{fold}-{stamp}")
                per_fold.append(simulate(cfg, all_folds=False, progress=False))
                group_uar.append(final_group_uar(cfg))
                if scenario in ("balanced", "bias") and "bias" in args.scenarios.split(","):
                    preds.append(heldout_arousal(cfg))
                    mine = ccc(preds[-1]["label"], preds[-1]["y"])  # the devices' CCC, recomputed here
                    theirs = _final(per_fold[-1], "ccc_arousal")
                    if not abs(mine - theirs) < 1e-3:
                        print(f"WARNING fold {fold}: held-out arousal CCC {mine:.4f} here, "
                              f"{theirs:.4f} from the devices")
            heldout[(corpus, scenario, strategy, faireg)] = preds
            row = {"corpus": corpus, "scenario": scenario, "strategy": strategy, "faireg": faireg,
                   "folds_run": len(per_fold), "seconds": time.perf_counter() - t0}
            for key in ("uar", "ccc_arousal", "worst_uar/gender", "gap_uar/gender", "gap_ea/gender",
                        "gap_sp/gender", "worst_ccc_arousal/gender", "gap_ccc_arousal/gender",
                        "gap_ea_arousal/gender", "gap_sp_arousal/gender"):
                vals = [_final(s, key) for s in per_fold]
                row[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
                row[key + ":folds"] = vals
            for g in sorted({g for u in group_uar for g in u}):
                row[f"uar/gender={g}:folds"] = [u.get(g, float("nan")) for u in group_uar]
            rows.append(row)
            print(f"{corpus:9s} {scenario:8s} {strategy:7s} faireg={faireg:3s}  UAR {row['uar']:.3f} "
                  f"worst {row['worst_uar/gender']:.3f} gap {row['gap_uar/gender']:.3f} | CCC-A "
                  f"{row['ccc_arousal']:.3f} worst {row['worst_ccc_arousal/gender']:.3f} gap "
                  f"{row['gap_ccc_arousal/gender']:.3f} ({row['seconds']:.0f}s)", flush=True)
        # (b) bias carried into the predictions, against the clean run of the same strategy and FaiReg setting
        for r in rows:
            if r["corpus"] != corpus or r["scenario"] != "bias":
                continue
            clean = heldout.get((corpus, "balanced", r["strategy"], r["faireg"]))
            biased = heldout[(corpus, "bias", r["strategy"], r["faireg"])]
            if not clean or len(clean) != len(biased):
                continue
            genders = sorted(set(np.concatenate([c["gender"] for c in clean]).tolist()))
            for space in ("model", "label"):
                for g in genders:
                    res = carried(clean, biased, space=space, gender=g, a=args.bias_a, b=args.bias_b)
                    who = "biased" if g == args.minority else "other"
                    for k, v in res.items():
                        r[f"{k}_{who}_{space}"] = v
            print(f"{corpus} bias {r['strategy']} faireg={r['faireg']}: carried into the predictions of the biased "
                  f"gender {r['carried_biased_model']:.2f} (model space) / {r['carried_biased_label']:.2f} (label "
                  f"space), other gender {r['carried_other_model']:.2f} / {r['carried_other_label']:.2f}; mean shift "
                  f"{r['shift_biased_label']:+.3f} (label space), injected {r['injected_biased_label']:+.3f}")
        for strategy in {r["strategy"] for r in rows if r["corpus"] == corpus and r["scenario"] == "bias"}:
            cell = {r["faireg"]: r for r in rows
                    if (r["corpus"], r["scenario"], r["strategy"]) == (corpus, "bias", strategy)}
            off, on = [cell["off"]] if "off" in cell else [], [cell["on"]] if "on" in cell else []
            if not (off and on and "carried_biased_label" in off[0] and "carried_biased_model" in on[0]):
                continue
            off, on = off[0], on[0]
            for space in ("model", "label"):
                on[f"bias_removed_{space}"] = 1 - on[f"carried_biased_{space}"] / off["carried_biased_label"]
                on[f"bias_removed_other_{space}"] = 1 - on[f"carried_other_{space}"] / off["carried_other_label"]
                met = on[f"bias_removed_{space}"] >= 0.8
                verdicts.append(f"(b) {corpus} {strategy} {space} space: FaiReg removed "
                                f"{100 * on[f'bias_removed_{space}']:.0f} % of the bias FaiReg-off carried into the "
                                f"biased gender ({100 * on[f'bias_removed_other_{space}']:.0f} % for the other): "
                                f"{'met' if met else 'MISSED'}")
        # (a) fair against FedAvg, FaiReg off
        for scenario in args.scenarios.split(","):
            pick = [r for r in rows if r["corpus"] == corpus and r["scenario"] == scenario and r["faireg"] == "off"]
            fed = [r for r in pick if r["strategy"] == "fedavg"]
            for other in [r for r in pick if r["strategy"] != "fedavg"]:
                if not fed:
                    break
                f = fed[0]
                d_uar = 100 * (other["uar"] - f["uar"])
                met = other["gap_uar/gender"] <= 0.5 * f["gap_uar/gender"] and d_uar >= -1
                verdicts.append(f"(a) {corpus} {scenario}: {other['strategy']}/FedAvg UAR gap "
                                f"{other['gap_uar/gender']:.3f}/{f['gap_uar/gender']:.3f}, mean UAR {d_uar:+.1f} points"
                                + (f": {'met' if met else 'MISSED'}" if other["strategy"] == "fair" else ""))
        for scenario in args.scenarios.split(","):
            for strategy in sorted({r["strategy"] for r in rows} - {"fedavg"}):
                line = paired(rows, corpus, scenario, strategy)
                if line:
                    verdicts.append(line)
    for v in verdicts:
        print(v)
    print("results:", save("fairness" + (f"-{args.tag}" if args.tag else ""),
                           {"args": vars(args), "rows": rows, "verdicts": verdicts, "scenarios": notes}))


if __name__ == "__main__":
    main()
