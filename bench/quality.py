"""Quality: federated UAR against centralised training of the same model on the same split.

Leave-speakers-out folds; one device per training speaker; the centralised baseline pools
the training devices' clips (each standardised with its own device statistics) and trains
for rounds x local-epochs epochs. Target: federated within 3 UAR points of centralised.

    python bench/quality.py --corpus synth --models egemaps-mlp,logmel-crnn --folds 4 --rounds 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import corpus_manifest, quiet_flower, save

from server.simulation import centralised_baseline, simulate
from shared_models.config import RunConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="synth")
    p.add_argument("--models", default="egemaps-mlp,logmel-crnn,wave-cnn-gru")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--run-folds", type=int, default=0, help="run only the first N folds (0 = all)")
    p.add_argument("--fold-list", default="", help="run only these folds, e.g. 2,3 (overrides --run-folds)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--task", default="both")
    p.add_argument("--batch-size", type=int, default=0, help="0: each model's default (RunConfig.local_batch_size)")
    p.add_argument("--compute-device", default="cpu", help="cpu, cuda or auto (RunConfig compute-device)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    quiet_flower()
    manifest = corpus_manifest(args.corpus)
    rows = []
    for model in args.models.split(","):
        fed, cen, t_fed, t_cen = [], [], 0.0, 0.0
        folds = [int(f) for f in args.fold_list.split(",")] if args.fold_list else range(args.run_folds or args.folds)
        for fold in folds:
            cfg = RunConfig(manifest=str(manifest), model=model, task=args.task, folds=args.folds, fold=fold,
                            num_server_rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
                            compute_device=args.compute_device,
                            run_dir="runs/bench", run_name=f"q-{args.corpus}-{model}-f{fold}-{int(time.time())}")
            t0 = time.perf_counter()
            fed.append(simulate(cfg, all_folds=False, progress=False)["final"])
            t1 = time.perf_counter()
            cen.append(centralised_baseline(cfg)["final"])
            t_fed, t_cen = t_fed + t1 - t0, t_cen + time.perf_counter() - t1
            print(f"  fold {fold}: federated UAR {fed[-1]['uar']['mean']:.3f}, centralised {cen[-1]['uar']:.3f} "
                  f"({t_fed:.0f} s + {t_cen:.0f} s so far)", flush=True)
        row = {"model": model, "folds_run": len(fed)}
        for key in ("uar", "ccc_arousal", "ccc_valence"):
            f = [x[key]["mean"] for x in fed]
            c = [x[key] for x in cen]
            row[f"fed_{key}"], row[f"cen_{key}"] = float(np.mean(f)), float(np.mean(c))
            row[f"fed_{key}_std"], row[f"cen_{key}_std"] = float(np.std(f)), float(np.std(c))
        row["uar_gap_points"] = 100 * (row["cen_uar"] - row["fed_uar"])
        row["fed_seconds"], row["cen_seconds"] = t_fed, t_cen
        rows.append(row)
        print(f"{args.corpus} {model}: federated UAR {row['fed_uar']:.3f}±{row['fed_uar_std']:.3f} "
              f"centralised {row['cen_uar']:.3f}±{row['cen_uar_std']:.3f} gap {row['uar_gap_points']:+.1f} pts; "
              f"CCC-A fed {row['fed_ccc_arousal']:.3f} cen {row['cen_ccc_arousal']:.3f}", flush=True)
    print("results:", save(f"quality-{args.corpus}" + (f"-{args.tag}" if args.tag else ""), {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
