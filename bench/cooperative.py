"""Label efficiency: held-out UAR against human labels spent, for cooperative learning on devices.

Leave-speakers-out folds, one device per training speaker. Runs supervised-only FL at several
label fractions (default 5, 10, 20, 50, 100 %) and self-labelling, active and cooperative FL
from low fractions (default 5 and 10 %). Human labels spent = clips labelled at the start +
rater answers of the simulated oracle (Yue Zhang et al. 2015: raters asked until enough agree).

Per run it records the learning curve (UAR per round against human labels spent), the final
UAR, the pseudo-label precision (against the hidden labels) and the cooperative step's share of
the round wall time (device seconds in the step / round seconds; the in-process engine runs
devices one after the other, so the sum of device seconds is the round's device time).

Targets (issue 3): cooperative FL within 2 UAR points of 100 %-label FL with at most 25 % of
its human labels; pseudo-label precision above 90 %; the cooperative step adds at most 30 %
to a round's wall time (``coop_overhead`` = step seconds / (round seconds - step seconds);
``coop_share`` = step seconds / round seconds is also kept).

    python bench/cooperative.py --corpus synth --folds 4 --rounds 20
    python bench/cooperative.py --corpus synth --rounds 6 --fractions 0.1,1.0 --coop-fractions 0.1 --tag small
    python bench/cooperative.py --corpus synth --init runs/pretrained/hedgewars-egemaps-mlp.pt --tag transfer
    python bench/cooperative.py --corpus synth --folds 4 --run-folds 4 --init other-voices --set pseudo-max-share=0.4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import DATA, ROOT, corpus_manifest, quiet_flower, save

from server.simulation import simulate
from shared_models.config import RunConfig, parse_set


def run_one(args, manifest, mode: str, fraction: float, fold: int) -> dict:
    """One fold of one (mode, label fraction) setting: curve, final metrics, timings."""
    cfg = RunConfig(manifest=str(manifest), model=args.model, task=args.task, folds=args.folds, fold=fold,
                    num_server_rounds=args.rounds, local_epochs=args.local_epochs, mode=mode,
                    label_fraction=fraction, query_per_round=args.query_per_round, query_total=args.query_total,
                    **({} if args.pseudo_per_class is None else {"pseudo_per_class": args.pseudo_per_class}),
                    **({} if args.pseudo_knn is None else {"pseudo_knn": args.pseudo_knn}),
                    init=args.init, freeze_rounds=args.freeze_rounds, seed=args.seed, run_dir="runs/bench",
                    run_name=f"c-{args.corpus}-{mode}-{fraction:g}-f{fold}-{time.time_ns() % 10**10}",
                    **overrides(args.set))
    t0 = time.perf_counter()
    summary = simulate(cfg, all_folds=False, progress=False)
    seconds = time.perf_counter() - t0
    rounds = summary["folds"][0]["rounds"]
    trained = [r for r in rounds if r["round"] > 0]
    wall = sum(r["wall_s"] for r in rounds)  # round 0's exchange already trains round 1
    coop = sum(r.get("coop_seconds") or 0.0 for r in trained)
    last = rounds[-1]
    return {
        "fold": fold,
        "uar": last["uar"],
        "best_uar": max(r["uar"] for r in rounds if r.get("uar") is not None),
        "human_labels": last["coop_human_labels"],
        "initial_labels": rounds[0]["coop_human_labels"],
        "rater_answers": last["coop_rater_answers_total"],
        "queries": last["coop_queries_total"],
        "labelled_fraction": last["coop_labelled_fraction"],
        "pseudo_total": last["coop_pseudo_total"],
        "pseudo_precision": last["coop_pseudo_precision"],
        "pseudo_added": sum(r.get("coop_pseudo_added") or 0 for r in trained),
        "pseudo_dropped": sum(r.get("coop_pseudo_dropped") or 0 for r in trained),
        "coop_share": coop / wall if wall else float("nan"),
        "coop_overhead": coop / (wall - coop) if wall > coop else float("nan"),
        "curve": [(r["coop_human_labels"], r["uar"]) for r in rounds],
        "seconds": seconds,
    }


OTHER_VOICES = "other-voices"


def other_voices_checkpoint(corpus_manifest_path, model: str) -> str:
    """``--init other-voices``: a model pre-trained on the synth voices that no synth corpus of at
    most 12 voices has (the last 24 of the 36), made once and reused.

    The source is as close to the target as transfer gets (the same generator, other voices):
    the setting of a federation that starts from a model trained on a large in-domain corpus.
    """
    from client.corpora import SYNTH_VOICES, synth_prepare
    from client.transfer import pretrain
    from shared_models.manifest import read_manifest, write_manifest

    target = set(read_manifest(corpus_manifest_path)["speaker"])
    full = read_manifest(synth_prepare(DATA / "synth36", DATA / "synth36.csv", n_speakers=len(SYNTH_VOICES)).manifest)
    source = full[full["speaker"].isin({f"synth-{v.lower()}" for v in list(SYNTH_VOICES)[12:]})]
    if target & set(source["speaker"]):  # only corpora of at most 12 voices leave the last 24 unheard
        raise SystemExit(f"--init {OTHER_VOICES}: the corpus has voices beyond the first 12 of SYNTH_VOICES")
    name = f"synth-other{source['speaker'].nunique()}"
    out = ROOT / "runs" / "pretrained" / f"{name}-{model}.pt"
    if not out.exists():
        write_manifest(source, DATA / f"{name}.csv")
        print(f"pre-training {model} on {source['speaker'].nunique()} other synth voices -> {out}", flush=True)
        pretrain(DATA / f"{name}.csv", model, out)
    return str(out)


def overrides(items: list[str]) -> dict:
    """``--set`` items (``["pseudo-end=0.99", ...]``) -> RunConfig keyword arguments."""
    out = {}
    for item in items:
        key, value = parse_set(item)
        out[key.replace("-", "_")] = RunConfig.typed(key, value)
    return out


def mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="synth")
    p.add_argument("--model", default="egemaps-mlp")
    p.add_argument("--task", default="emotion")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--run-folds", type=int, default=1, help="run only the first N folds (0 = all)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--fractions", default="0.05,0.1,0.2,0.5,1.0", help="label fractions of supervised FL")
    p.add_argument("--coop-fractions", default="0.05,0.1", help="starting label fractions of the other modes")
    p.add_argument("--modes", default="self-labelling,active,cooperative")
    p.add_argument("--query-per-round", type=int, default=1)
    p.add_argument("--query-total", type=int, default=8)
    p.add_argument("--pseudo-per-class", type=int, default=None, help="default: the run config's")
    p.add_argument("--pseudo-knn", type=int, default=None, help="default: the run config's")
    p.add_argument("--init", default="", help="start every run from this checkpoint (fedaffect pretrain); "
                   f"'{OTHER_VOICES}': pre-train on the synth voices the corpus lacks (made once)")
    p.add_argument("--freeze-rounds", type=int, default=0, help="rounds that train only the heads (with --init)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run-config key of every run, e.g. --set pseudo-end=0.99 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    quiet_flower()
    manifest = corpus_manifest(args.corpus)
    if args.init == OTHER_VOICES:
        args.init = other_voices_checkpoint(manifest, args.model)
    folds = range(args.run_folds or args.folds)
    settings = [("supervised", float(f)) for f in args.fractions.split(",")]
    settings += [(m, float(f)) for m in args.modes.split(",") if m for f in args.coop_fractions.split(",")]
    rows = []
    for mode, fraction in settings:
        runs = [run_one(args, manifest, mode, fraction, fold) for fold in folds]
        row = {"mode": mode, "label_fraction": fraction, "folds_run": len(runs)}
        for key in ("uar", "best_uar", "human_labels", "initial_labels", "rater_answers", "queries",
                    "labelled_fraction", "pseudo_total", "pseudo_precision", "pseudo_added", "pseudo_dropped",
                    "coop_share", "coop_overhead", "seconds"):
            row[key] = mean(r[key] for r in runs)
        row["uar_std"] = float(np.std([r["uar"] for r in runs]))
        row["curves"] = [r["curve"] for r in runs]
        rows.append(row)
        print(f"{args.corpus} {mode:>14} {100 * fraction:5.1f}% labels: UAR {row['uar']:.3f} "
              f"(best {row['best_uar']:.3f}) human labels {row['human_labels']:.0f} "
              f"(start {row['initial_labels']:.0f} + {row['rater_answers']:.0f} rater answers for "
              f"{row['queries']:.0f} queries), pseudo {row['pseudo_total']:.0f} precision {row['pseudo_precision']:.3f}, "
              f"coop step {100 * row['coop_share']:.1f}% of round time, adds {100 * row['coop_overhead']:.1f}% "
              f"to the rest ({row['seconds']:.0f}s)", flush=True)
    full = next((r for r in rows if r["mode"] == "supervised" and r["label_fraction"] == 1.0), None)
    if full:
        for r in rows:
            r["uar_gap_points_vs_full"] = 100 * (full["uar"] - r["uar"])
            r["label_share_vs_full"] = r["human_labels"] / full["human_labels"] if full["human_labels"] else None
        print(f"reference: supervised FL with every label, UAR {full['uar']:.3f} with {full['human_labels']:.0f} labels")
        for r in rows:
            if r["mode"] != "supervised":
                print(f"  {r['mode']:>14} from {100 * r['label_fraction']:.0f}%: {r['uar_gap_points_vs_full']:+.1f} "
                      f"UAR points below, {100 * r['label_share_vs_full']:.0f}% of the human labels")
    print("results:", save(f"cooperative-{args.corpus}" + (f"-{args.tag}" if args.tag else ""),
                           {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
