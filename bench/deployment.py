"""A real federation on localhost against the same rounds simulated.

For N devices (3 and 10) and each model: a coordinator (``fedaffect server start``: TLS
SuperLink, SuperNode authentication) and N SuperNodes (``fedaffect device start``) run
on this machine; ``fedaffect train`` runs R rounds. The devices are the IID split of the
synth corpus into N devices with no held-out speakers (``partition = iid``,
``folds = 1``), and the *same* split, config and rounds are simulated in-process
(``fedaffect simulate``), so both do the same work.

Measured:

* wall time per round (the whole run, from the first exchange to the last round stored,
  over R: the R trained rounds and the evaluations of rounds 0..R, one exchange per round
  plus one for the last evaluation), deployment vs simulation; target: deployment within 1.5x;
* bytes per device per round, from Flower's own counters (``flwr list --run-id``:
  bytes into and out of the SuperLink), against the model's size in float32;
  target: within 5 % of the model's size plus metrics (each direction);
* peak resident memory of the coordinator (SuperLink, SuperExec, ServerApp processes
  summed) while the run is in flight.

    python bench/deployment.py --devices 3 10 --models egemaps-mlp logmel-crnn --rounds 3
    python bench/deployment.py ... --plain-flower   # devices on Flower's own SuperNode (before)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from common import ROOT, corpus_manifest, save

from client.deployment import init_device
from server.deployment import CONNECTION, ServerConfig, StatePaths, enrol_device, init_server, train
from server.simulation import simulate
from server.superlink import flwr_cli, json_from, wait_healthy
from shared_models.config import RunConfig
from shared_models.federation import plan_federation
from shared_models.manifest import read_manifest
from shared_models.models import build_model
from shared_models.processes import descendants, flower_environment, free_port

FEDAFFECT = str(Path(sys.executable).parent / "fedaffect")


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


class PeakMemory(threading.Thread):
    """Samples the summed RSS of a process tree every 0.5 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_mib([self.pid, *descendants(self.pid)]))
            time.sleep(0.5)


def model_bytes(model: str, n_classes: int) -> int:
    return sum(t.numel() * t.element_size() for t in build_model(model, n_classes).state_dict().values())


def deployed(work: Path, cfg: RunConfig, n: int, device_args: tuple[str, ...] = ()) -> dict:
    """Run the rounds on a localhost federation of ``n`` SuperNodes."""
    manifest = read_manifest(cfg.manifest)
    plans = plan_federation(manifest, partition="iid", num_devices=n, folds=1, seed=cfg.seed)
    state = work / "state"
    init_server(state, names=["localhost", "127.0.0.1"], port=free_port(), emotions=cfg.emotions)
    paths = StatePaths(state.resolve())
    server_cfg = ServerConfig.load(paths.config)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    server = subprocess.Popen([FEDAFFECT, "server", "start", "--state-dir", str(state)], env=env,
                              stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)
    devices = []
    try:
        wait_healthy(server, f"https://localhost:{server_cfg.port}/health",
                     collections.deque(maxlen=5), cafile=paths.ca_cert, timeout_s=120, name="fedaffect server start")
        for plan in plans:
            data = work / plan.name.split()[0]
            init_device(data)
            manifest.iloc[plan.rows].to_csv(data / "manifest.csv", index=False)
            enrol_device(state, data.name, data / "keys" / "device.pub")
            devices.append(subprocess.Popen(
                [FEDAFFECT, "device", "start", "--data-dir", str(data), "--superlink",
                 f"localhost:{server_cfg.port}", "--ca",
                 str(paths.ca_cert), *device_args], env=env, stdout=open(work / f"{data.name}.log", "wb"),
                stderr=subprocess.STDOUT))
        memory = PeakMemory(server.pid)
        memory.start()
        overrides = {k: v for k, v in cfg.to_mapping().items()
                     if k in ("model", "num-server-rounds", "local-epochs", "lr", "batch-size", "seed", "task")}
        t0 = time.perf_counter()
        result = train(state, {**overrides, "min-devices": n, "run-name": "bench"}, timeout_s=3600)
        seconds = time.perf_counter() - t0
        memory.done.set()
        if not result.ok:
            raise RuntimeError(f"deployed run failed: {result}")
        store = server_cfg.store(paths)
        rounds = store.rounds(store.get_run("bench").id)
        res = flwr_cli(["list", CONNECTION, "--run-id", str(result.flower_run_id), "--format", "json"],
                       flower_environment(paths.flower_home), paths.flower_home)
        traffic = json_from(res.stdout)["runs"][0]["network-traffic"]
        return {"rounds": rounds, "seconds": seconds, "traffic": traffic, "coordinator_peak_mib": memory.peak}
    finally:
        for proc in [*devices, server]:
            proc.send_signal(signal.SIGTERM)
        for proc in [*devices, server]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def simulated(work: Path, cfg: RunConfig) -> dict:
    """The same rounds in-process, warm as the devices' SuperExecs are: the first run in a
    process pays torch's and scikit-learn's lazy imports (~4 s, in round 0), so a one-round
    run goes first, untimed."""
    simulate(cfg.replace(run_dir=str(work / "warm-up"), run_name="warm-up", num_server_rounds=1), engine="inprocess",
             all_folds=False, progress=False)
    t0 = time.perf_counter()
    summary = simulate(cfg.replace(run_dir=str(work / "sim"), run_name="sim"), engine="inprocess", all_folds=False)
    return {"rounds": summary["folds"][0]["rounds"], "seconds": time.perf_counter() - t0}


def per_round(rounds: list[dict]) -> float:
    """Seconds per trained round: every stored round's wall time (round 0 included: since
    evaluations travel with the next round's training, round 0's exchange trains round 1)."""
    return sum(r["wall_s"] for r in rounds) / max(r["round"] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--models", nargs="+", default=["egemaps-mlp", "logmel-crnn"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="")
    parser.add_argument("--plain-flower", action="store_true",
                        help="devices run Flower's own flower-supernode (`device start --plain-flower`)")
    parser.add_argument("--device-threads", type=int, default=1,
                        help="torch threads per device (`device start --threads`; 0: torch's default). N devices "
                             "share this machine's cores; more threads than cores make OpenMP spin")
    args = parser.parse_args()
    manifest = corpus_manifest("synth")
    emotions = ",".join(sorted(e for e in pd.read_csv(manifest, keep_default_na=False)["emotion"].unique() if e))
    results = []
    for model in args.models:
        for n in args.devices:
            cfg = RunConfig(manifest=str(manifest), model=model, partition="iid", num_devices=n, folds=1,
                            num_server_rounds=args.rounds, local_epochs=1, emotions=emotions,
                            cache_dir=str(ROOT / "bench" / ".cache"))
            with tempfile.TemporaryDirectory(prefix="fedaffect-bench-") as tmp:
                work = Path(tmp)
                sim = simulated(work, cfg)
                device_args = ("--threads", str(args.device_threads)) if args.device_threads else ()
                dep = deployed(work / "dep", cfg, n, device_args + (("--plain-flower",) if args.plain_flower else ()))
            size = model_bytes(model, len(cfg.emotion_list))
            # The model goes down with every train message (rounds 1..R, each also evaluating the
            # model it carries) and the last round's evaluate message, and up with every train
            # reply; everything else is config, metrics and statistics.
            down, up = n * (args.rounds + 1) * size, n * args.rounds * size
            row = {
                "model": model, "devices": n, "rounds": args.rounds, "plain_flower": args.plain_flower, "device_threads": args.device_threads, "model_float32_bytes": size,
                "sim_round_s": per_round(sim["rounds"]), "deploy_round_s": per_round(dep["rounds"]),
                "deploy_total_s": dep["seconds"], "sim_total_s": sim["seconds"],
                "bytes_to_devices_per_device_round": dep["traffic"]["outbound-bytes"] / (n * args.rounds),
                "bytes_from_devices_per_device_round": dep["traffic"]["inbound-bytes"] / (n * args.rounds),
                "down_overhead": dep["traffic"]["outbound-bytes"] / down - 1,
                "up_overhead": dep["traffic"]["inbound-bytes"] / up - 1,
                "traffic": dep["traffic"], "coordinator_peak_mib": dep["coordinator_peak_mib"],
            }
            row["ratio"] = row["deploy_round_s"] / row["sim_round_s"]
            results.append(row)
            print(json.dumps(row), flush=True)
            path = save(f"deployment{args.tag}", {"results": results})  # after every row: long runs
    print(f"saved {path}")


if __name__ == "__main__":
    main()
