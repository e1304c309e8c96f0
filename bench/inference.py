"""On-device inference: real-time factor on one core and parameter count per model.

RTF = (front-end + forward time) / audio duration, for a 4 s clip (a typical acted utterance,
within every front-end's crop), one thread, median
of 5 runs after a warm-up. Target RTF <= 0.01.

    python bench/inference.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import save

from shared_models.features import collate
from shared_models.models import MODELS, build_model, count_parameters, frontend_for


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seconds = 4.0
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 160 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    rows = []
    for name in MODELS:
        frontend, model = frontend_for(name), build_model(name, 6).eval()
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            with torch.no_grad():
                x, lengths = collate([frontend(wave)])
                model(x, lengths)
            if i:
                times.append(time.perf_counter() - t0)
        rtf = statistics.median(times) / seconds
        rows.append({"model": name, "parameters": count_parameters(model), "rtf": rtf})
        print(f"{name}: {count_parameters(model):,} parameters, RTF {rtf:.4f} (one thread)")
    save("inference", {"rows": rows})


if __name__ == "__main__":
    main()
