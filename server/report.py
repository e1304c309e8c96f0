"""Reports of stored runs: learning curves as PNG files and a short HTML page.

``fedaffect report RUN`` draws, from the run store alone:

* ``loss.png``: mean training loss of the sampled devices and evaluation loss of the
  held-out devices per round;
* ``metrics.png``: UAR, WA, macro-F1 (categorical) and CCC of arousal and valence
  (dimensional) of the held-out devices per round;
* ``groups.png``: UAR (or CCC) per protected group per round, so a group falling behind
  shows at a glance;
* ``index.html``: the figures, the final metrics and the run's configuration.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from server.store import RunStore  # noqa: E402

__all__ = ["write_report"]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None and not (
        isinstance(r[key], float) and math.isnan(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(path: Path, title: str, ylabel: str, curves: dict[str, tuple[list[int], list[float]]]) -> Path | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(store: RunStore, run_ref: str | int, out_dir: str | Path) -> Path:
    """Write the report of one stored run.

    Parameters
    ----------
    store : RunStore
    run_ref : str or int
        Run name or id.
    out_dir : path
        Folder to write the PNG files and ``index.html`` into (created).

    Returns
    -------
    Path
        The HTML page.

    Raises
    ------
    KeyError
        If the run is not in the store.
    """
    run = store.get_run(run_ref)
    rounds = store.rounds(run.id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    figures.append(_plot(out / "loss.png", f"{run.name}: loss", "loss", {
        "train (sampled devices)": _series(rounds, "train_loss"),
        "evaluation (held-out devices)": _series(rounds, "eval_loss"),
    }))
    figures.append(_plot(out / "metrics.png", f"{run.name}: held-out metrics", "score", {
        "UAR": _series(rounds, "uar"), "WA": _series(rounds, "wa"), "macro-F1": _series(rounds, "macro_f1"),
        "CCC arousal": _series(rounds, "ccc_arousal"), "CCC valence": _series(rounds, "ccc_valence"),
    }))
    task = run.config.get("task", "emotion")
    group_metric = "uar" if task in ("emotion", "both") else "ccc_arousal"
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for row in store.group_metrics(run.id):
        if row["metric"] == group_metric:
            x, y = curves.setdefault(f"{row['attribute']}={row['group']}", ([], []))
            x.append(row["round"])
            y.append(row["value"])
    figures.append(_plot(out / "groups.png", f"{run.name}: {group_metric.upper()} per group", group_metric, curves))

    final = rounds[-1] if rounds else {}
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
        for k, v in final.items() if isinstance(v, float)
    )
    imgs = "".join(f'<img src="{f.name}" alt="{f.stem}">' for f in figures if f)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedaffect run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto}} img{{max-width:32%;margin:.3%}}
table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:2px 8px}}</style></head><body>
<h1>Run {html.escape(run.name)}</h1>
<p>status <b>{html.escape(run.status)}</b>, engine {html.escape(run.engine)}, {len(rounds) - 1 if rounds else 0} rounds,
model {html.escape(str(run.config.get('model')))}, task {html.escape(str(task))}</p>
{imgs}
<h2>Final round (held-out devices)</h2><table>{table}</table>
<h2>Configuration</h2><pre>{html.escape(json.dumps(run.config, indent=2))}</pre>
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    return index
