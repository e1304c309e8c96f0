"""Shared set-up of the benchmarks: corpora on demand, machine description, result files."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
DATA = ROOT / "data"
RESULTS = ROOT / "bench" / "results"


def quiet_flower() -> None:
    """Keep Flower's INFO lines (several per round) out of a benchmark's output: one line per run.
    Call after Flower is imported (its logger sets its own level on import)."""
    import flwr  # noqa: F401  (configures the "flwr" logger)

    logging.getLogger("flwr").setLevel(logging.WARNING)


def corpus_manifest(name: str) -> Path:
    """Manifest of ``synth`` (default settings) or ``hedgewars``, prepared when missing."""
    from client.corpora import prepare

    out = DATA / f"{name}.csv"
    if not out.exists():
        kwargs = {"source": DATA / "synth"} if name == "synth" else {}
        prepare(name, out=out, **kwargs)
    return out


def machine() -> str:
    """One line describing this machine (CPU model, cores, memory, Python, torch)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def save(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the command line, machine and date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def model_names(parser, value: str) -> list[str]:
    """The comma-separated model names of a ``--models`` option; a parser error naming the
    unknown ones (and the known ones) otherwise."""
    from shared_models.models import MODELS

    names = [m for m in value.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(MODELS)}")
    return names
