"""Run every benchmark with the settings docs/BENCHMARKS.md reports (hours on a 2-core box).

    python bench/run_all.py            # all of them, one after the other
    python bench/run_all.py --list     # the commands only
    python bench/run_all.py speed inference   # those whose script name matches

Each script writes ``bench/results/<name>.json`` (command, machine, date); copy the numbers
into docs/BENCHMARKS.md. Benchmarks run alone: anything else on the machine skews times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (script, arguments) in order of running time.
COMMANDS = [
    ("inference.py", []),
    ("train_step.py", ["--models", "egemaps-mlp,logmel-crnn,wave-cnn-gru"]),
    ("speed.py", ["--model", "egemaps-mlp", "--rounds", "5"]),
    ("speed.py", ["--model", "logmel-crnn", "--rounds", "5"]),
    ("speed.py", ["--memory", "--devices", "200", "--rounds", "3"]),
    ("quality.py", ["--corpus", "synth", "--models", "egemaps-mlp"]),
    ("quality.py", ["--corpus", "hedgewars", "--models", "egemaps-mlp"]),
    ("cooperative.py", []),
    ("fairness.py", []),
    ("deployment.py", ["--devices", "3", "10", "--models", "egemaps-mlp", "logmel-crnn", "--rounds", "3"]),
    ("quality.py", ["--corpus", "synth", "--models", "logmel-crnn", "--run-folds", "2"]),
    ("quality.py", ["--corpus", "hedgewars", "--models", "logmel-crnn", "--run-folds", "2"]),
    ("quality.py", ["--corpus", "hedgewars", "--models", "wave-cnn-gru", "--run-folds", "1", "--rounds", "10"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="run only scripts whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    chosen = [(s, a) for s, a in COMMANDS if not args.only or any(o in s for o in args.only)]
    failed = 0
    for script, extra in chosen:
        cmd = [sys.executable, script, *extra]
        print("$ python " + " ".join([script, *extra]), flush=True)
        if args.list:
            continue
        t0 = time.monotonic()
        code = subprocess.call(cmd, cwd=HERE)
        print(f"  -> exit {code} after {time.monotonic() - t0:.0f}s", flush=True)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
