"""On-device inference: real-time factor on one core and parameter count per model.

RTF = (front-end + forward time) / audio duration, for a 4 s clip (a typical acted utterance,
within every front-end's crop), one thread, median
of 5 runs after a warm-up, with the model as ``fedaffect predict`` runs it
(:func:`shared_models.models.for_inference`: batch norms folded into the convolutions;
``--no-fuse`` for the training model). Target RTF <= 0.01.

    python bench/inference.py [--models egemaps-mlp,logmel-crnn] [--seconds 4] [--runs 5] [--no-fuse]
                              [--chunk-values N] [--tag NAME]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import model_names, save

from shared_models.features import collate
from shared_models.models import MODELS, build_model, count_parameters, for_inference, frontend_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--seconds", type=float, default=4.0, help="clip duration in seconds")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (the median is kept)")
    p.add_argument("--no-fuse", action="store_true",
                   help="time the training model (batch norms not folded into the convolutions)")
    p.add_argument("--chunk-values", type=int, default=None,
                   help="time chunks of the sequence models' eval-mode conv blocks, in output values "
                        "(default: the models' own; 0: whole clips)")
    p.add_argument("--tag", default="", help="suffix of the result file name (default: overwrite inference.json)")
    args = p.parse_args()
    names = model_names(p, args.models)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seconds = args.seconds
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 160 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    rows = []
    for name in names:
        frontend, trained = frontend_for(name), build_model(name, 6).eval()
        model = trained if args.no_fuse else for_inference(trained)  # what `fedaffect predict` runs
        if args.chunk_values is not None and hasattr(model, "chunk_values"):
            model.chunk_values = args.chunk_values
        times = []
        for i in range(args.runs + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                x, lengths = collate([frontend(wave)])
                model(x, lengths)
            if i:
                times.append(time.perf_counter() - t0)
        rtf = statistics.median(times) / seconds
        rows.append({"model": name, "parameters": count_parameters(trained), "rtf": rtf})
        print(f"{name}: {count_parameters(trained):,} parameters, RTF {rtf:.4f} (one thread)")
    print("results:", save("inference" + (f"-{args.tag}" if args.tag else ""), {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
