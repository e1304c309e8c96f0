"""Local training speed: wall time of one optimiser step and the process's peak RSS, per model.

One torch thread, a batch of ``--batch`` random clips of ``--seconds`` seconds in the model's
input form (waveform for wave-cnn-gru, 64 log-Mel bands at 100 frames/s for logmel-crnn, 88
eGeMAPS functionals for egemaps-mlp), cross-entropy on the emotion head, Adam; median of
``--steps`` steps after two warm-up steps. Run each model in its own process (peak RSS is the
process's). Meant for A/B comparisons of the environment, e.g. glibc's allocator:

    python bench/train_step.py --models wave-cnn-gru --tag base
    MALLOC_MMAP_THRESHOLD_=1073741824 python bench/train_step.py --models wave-cnn-gru --tag mmap-1g
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from common import model_names, save

from shared_models.models import build_model


def _batch(name: str, batch: int, seconds: float) -> torch.Tensor:
    if name == "wave-cnn-gru":
        return torch.randn(batch, int(seconds * 16_000))
    if name == "logmel-crnn":
        return torch.randn(batch, int(seconds * 100), 64)
    return torch.randn(batch, 88)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wave-cnn-gru", help="comma-separated model names")
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--seconds", type=float, default=4.0, help="clip duration in seconds")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is kept)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    names = model_names(p, args.models)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name in names:
        model = build_model(name, 6).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = _batch(name, args.batch, args.seconds), torch.randint(0, 6, (args.batch,))
        times = []
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x)["emotion"], y).backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        rows.append({"model": name, "step_seconds": step, "peak_rss_mib": rss})
        print(f"{name}: {1000 * step:.0f} ms a step of {args.batch} x {args.seconds:g} s clips, peak RSS {rss:.0f} MiB")
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print("results:", save("train-step" + (f"-{args.tag}" if args.tag else ""),
                           {"args": vars(args), "malloc_env": env, "rows": rows}))


if __name__ == "__main__":
    main()
