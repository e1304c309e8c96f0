"""Speed and memory of simulated federations.

Speed: wall time per round of a simulated federation, and the ratio of its wall time to
the *same* local training done centrally in one process without Flower (every training
device's local epochs run one after the other, weights averaged by hand, the same
held-out evaluation). Target ratio <= 1.5 (stretch 1.3).

Memory: peak resident memory (RSS) of a simulation with 200 devices (iid partition of the
synth corpus). Target <= 4 GB.

    python bench/speed.py --model egemaps-mlp --rounds 5 [--engine ray] [--tag NAME]
    python bench/speed.py --memory --devices 200
"""

from __future__ import annotations

import argparse
import importlib
import resource
import time

import numpy as np
import torch
from common import corpus_manifest, quiet_flower, save

from client.app import WARM_MODULES, load_device
from server.simulation import prepare_run, simulate
from shared_models.config import MODEL_SIMULATION_THREADS, RunConfig
from shared_models.models import build_model
from shared_models.training import evaluate_local, train_local


def reference_seconds(cfg: RunConfig) -> float:
    """Wall time of the same rounds of local training + evaluation, without Flower."""
    cfg, n = prepare_run(cfg, progress=False)
    devices = [load_device(cfg.to_mapping(), {"partition-id": i}) for i in range(n)]
    train = [d for d in devices if d.role == "train" and (d.data.emotion >= 0).any()]
    held = [d for d in devices if d.role == "heldout"] or train
    n_classes = len(cfg.emotion_list)
    torch.manual_seed(cfg.seed)
    state = build_model(cfg.model, n_classes).state_dict()
    t0 = time.perf_counter()
    model = build_model(cfg.model, n_classes)
    for _ in range(cfg.num_server_rounds + 1):
        model.load_state_dict(state)
        for d in held:
            evaluate_local(model, d.data, task=cfg.task, n_classes=n_classes, adapt_bn=bool(cfg.bn_adapt))
        updates, weights = [], []
        for d in train:
            model.load_state_dict(state)
            res = train_local(model, d.data, task=cfg.task, epochs=cfg.local_epochs, lr=cfg.lr,
                              batch_size=cfg.local_batch_size, seed=0)
            updates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(res["num_examples"])
        w = np.asarray(weights, float) / sum(weights)
        state = {k: sum(wi * u[k].double() for wi, u in zip(w, updates)).to(updates[0][k].dtype) for k in state}
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="synth")
    p.add_argument("--model", default="egemaps-mlp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--engine", default="inprocess")
    p.add_argument("--memory", action="store_true", help="measure peak RSS with --devices devices")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    suffix = f"-{args.tag}" if args.tag else ""
    quiet_flower()
    manifest = corpus_manifest(args.corpus)
    base = RunConfig(manifest=str(manifest), model=args.model, task="both", folds=4, fold=0,
                     num_server_rounds=args.rounds, run_dir="runs/bench", local_epochs=2)
    if args.memory:
        cfg = base.replace(partition="iid", num_devices=args.devices, run_name=f"mem-{int(time.time())}")
        t0 = time.perf_counter()
        simulate(cfg, engine=args.engine, all_folds=False, progress=False)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(f"{args.devices} devices, {args.engine}: peak RSS {peak:.2f} GiB (largest child {peak_children:.2f} GiB), "
              f"{wall:.0f} s for {args.rounds} rounds")
        save(f"memory-{args.engine}-{args.devices}{suffix}", {"args": vars(args), "peak_rss_gib": peak,
                                                       "peak_child_rss_gib": peak_children, "wall_seconds": wall})
        return
    prepare_run(base, progress=True)  # features cached before anything is timed
    cfg = base.replace(run_name=f"speed-{args.model}-{args.engine}-{int(time.time())}")
    # Both sides start warm: devices loaded (features read from the cache) and the lazy
    # imports done (the first Adam pulls in torch._dynamo, ~3 s; the first confusion matrix
    # scikit-learn, ~2 s: client.app.WARM_MODULES, what a device's warm SuperExec imports),
    # so only rounds are timed.
    for module in WARM_MODULES:
        importlib.import_module(module)
    resolved, n = prepare_run(cfg, extract=False)
    devices = [load_device(resolved.to_mapping(), {"partition-id": i, "num-partitions": n}) for i in range(n)]
    train_local(build_model(cfg.model, len(resolved.emotion_list)), devices[0].data, task=cfg.task, epochs=1,
                lr=cfg.lr, batch_size=cfg.local_batch_size, seed=0)
    t0 = time.perf_counter()
    summary = simulate(cfg, engine=args.engine, all_folds=False, progress=False)
    sim = time.perf_counter() - t0
    # the plain side with the simulation's torch threads (MODEL_SIMULATION_THREADS): the same work
    threads = torch.get_num_threads()
    torch.set_num_threads(MODEL_SIMULATION_THREADS.get(cfg.model, threads))
    try:
        ref = reference_seconds(base.replace(run_name="reference"))
    finally:
        torch.set_num_threads(threads)
    # a round's exchange evaluates it and trains the next one: round 0's trains round 1
    walls = [r["wall_s"] for r in summary["folds"][0]["rounds"]]
    row = {"sim_seconds": sim, "reference_seconds": ref, "ratio": sim / ref,
           "round_seconds_mean": float(np.sum(walls) / (len(walls) - 1)), "round_seconds_max": float(np.max(walls))}
    print(f"{args.model} {args.engine}: {sim:.1f} s simulated vs {ref:.1f} s plain local training "
          f"-> ratio {sim / ref:.2f}; {row['round_seconds_mean']:.2f} s per round")
    save(f"speed-{args.model}-{args.engine}{suffix}", {"args": vars(args), **row})


if __name__ == "__main__":
    main()
