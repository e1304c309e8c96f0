"""Resampling speed at an odd rate: TESS's 24414 Hz to 16 kHz, torchaudio against
:func:`shared_models.audio.resample` (soxr through audresample for such rates).

    python bench/resample.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torchaudio.functional as AF

from shared_models.audio import resample


def main() -> None:
    torch.set_num_threads(1)
    rate, seconds = 24414, 2.5
    x = (0.5 * np.sin(2 * np.pi * 3000 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    for name, run in (("torchaudio.functional.resample", lambda: AF.resample(torch.from_numpy(x), rate, 16000)),
                      ("shared_models.audio.resample", lambda: resample(x, rate, 16000))):
        t0 = time.perf_counter()
        run()
        print(f"{name}: {1000 * (time.perf_counter() - t0):.1f} ms for a {seconds} s clip at {rate} Hz")


if __name__ == "__main__":
    main()
