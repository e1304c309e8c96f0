"""Reports of stored runs: learning curves as PNG files and a short HTML page.

``fedaffect report RUN`` draws, from the run store alone:

* ``loss.png``: mean training loss of the sampled devices and evaluation loss of the
  held-out devices per round;
* ``metrics.png``: UAR, WA, macro-F1 (categorical) and CCC of arousal and valence
  (dimensional) of the held-out devices per round;
* ``groups.png``: UAR (or CCC) per protected group per round, so a group falling behind
  shows at a glance;
* ``gap.png``: the largest gap between groups per round (UAR or arousal CCC per protected
  attribute, and the Equal Accuracy / Statistical Parity gaps);
* ``weights.png``: the aggregation weight each group received per round (strategy
  ``fair``), beside what FedAvg's example counts would have given (dashed);
* ``labels.png`` (cooperative learning: mode other than ``supervised`` or label fraction
  below 1): the learning curve, held-out UAR (CCC of arousal for task ``av``) against the
  human labels spent so far (initial labels + rater answers), with the pseudo-labels in force;
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
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.store import RunStore  # noqa: E402

__all__ = ["write_report"]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None and not (
        isinstance(r[key], float) and math.isnan(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _cell(key: str, value: float) -> str:
    """A final-table value: counts as integers, seconds with one decimal, scores with four."""
    if float(value).is_integer() and not key.startswith(("uar", "wa", "macro", "ccc", "gap", "worst")):
        return str(int(value))
    return f"{value:.1f}" if key.endswith(("_s", "seconds")) else f"{value:.4f}"


def _plot(path: Path, title: str, ylabel: str, curves: dict[str, tuple[list[int], list[float]]]) -> Path | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fairness_figures(store: RunStore, run, rounds: list[dict[str, Any]], out: Path, group_metric: str) -> list:
    """``gap.png`` (largest gap between groups per round) and, when the run stored
    ``agg_weight`` rows (strategy ``fair``), ``weights.png``."""
    prefix = "gap_uar/" if group_metric == "uar" else "gap_ccc_arousal/"
    keys = sorted({k for r in rounds for k in r if k.startswith(prefix)})
    keys += sorted({k for r in rounds for k in r if k.startswith(("gap_ea/", "gap_sp/", "gap_ea_arousal/",
                                                                    "gap_sp_arousal/"))})
    gap = _plot(out / "gap.png", f"{run.name}: group gaps", "largest gap (max - min over groups)",
                {k: _series(rounds, k) for k in keys})
    weights: dict[str, tuple[list[int], list[float]]] = {}
    for row in store.group_metrics(run.id):
        if row["metric"] in ("agg_weight", "count_weight"):
            label = f"{row['attribute']}={row['group']}" + (" (FedAvg)" if row["metric"] == "count_weight" else "")
            x, y = weights.setdefault(label, ([], []))
            x.append(row["round"])
            y.append(row["value"])
    figure = None
    if any(not k.endswith("(FedAvg)") for k in weights):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        colours: dict[str, Any] = {}
        for label, (x, y) in sorted(weights.items()):
            base = label.removesuffix(" (FedAvg)")
            line = ax.plot(x, y, marker="o", markersize=3, label=label, color=colours.get(base),
                           linestyle="--" if label.endswith("(FedAvg)") else "-")[0]
            colours.setdefault(base, line.get_color())
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("aggregation weight")
        ax.set_title(f"{run.name}: weight per group")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figure = out / "weights.png"
        fig.savefig(figure)
        plt.close(fig)
    return [gap, figure]


def _labels_figure(run, rounds: list[dict[str, Any]], out: Path) -> Path | None:
    """``labels.png``: held-out UAR against human labels spent (cooperative learning runs)."""
    if run.config.get("mode", "supervised") == "supervised" and run.config.get("label-fraction", 1.0) >= 1:
        return None
    metric = "ccc_arousal" if run.config.get("task") == "av" else "uar"
    pts = [(r["coop_human_labels"], r[metric], r.get("coop_pseudo_total") or 0, r["round"]) for r in rounds
           if r.get("coop_human_labels") is not None and r.get(metric) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"held-out {metric.upper()}")
    for x, y, _, r in pts:
        ax.annotate(str(r), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("human labels spent (initial labels + rater answers)")
    ax.set_ylabel(metric)
    twin = ax.twinx()
    twin.plot([p[0] for p in pts], [p[2] for p in pts], color="grey", linestyle="--", label="pseudo-labels in force")
    twin.set_ylabel("pseudo-labels")
    ax.set_title(f"{run.name}: learning curve ({run.config.get('mode', 'supervised')})")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "labels.png"
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
    # without held-out devices (simulation with folds = 1, or none enrolled as held-out) the
    # training devices evaluate the model on their own clips: in-sample numbers, said so
    held_out = any(d["role"] == "heldout" for d in store.device_metrics(run.id))
    evaluated = "held-out devices" if held_out else "training devices, in-sample"
    figures.append(_plot(out / "loss.png", f"{run.name}: loss", "loss", {
        "train (sampled devices)": _series(rounds, "train_loss"),
        f"evaluation ({evaluated})": _series(rounds, "eval_loss"),
    }))
    figures.append(_plot(out / "metrics.png", f"{run.name}: metrics ({evaluated})", "score", {
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
    figures += _fairness_figures(store, run, rounds, out, group_metric)
    figures.append(_labels_figure(run, rounds, out))

    final = rounds[-1] if rounds else {}
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_cell(k, v)}</td></tr>"
        for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
    )
    error = f"<p>error: <code>{html.escape(run.error)}</code></p>" if run.error else ""
    imgs = "".join(f'<img src="{f.name}" alt="{f.stem}">' for f in figures if f)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedaffect run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto}} img{{max-width:32%;margin:.3%}}
table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:2px 8px}}</style></head><body>
<h1>Run {html.escape(run.name)}</h1>
<p>status <b>{html.escape(run.status)}</b>, engine {html.escape(run.engine)}, {max(len(rounds) - 1, 0)} rounds,
model {html.escape(str(run.config.get('model')))}, task {html.escape(str(task))}</p>
{error}{imgs}
<h2>Final round (metrics: {evaluated})</h2><table>{table}</table>
<h2>Configuration</h2><pre>{html.escape(json.dumps(run.config, indent=2))}</pre>
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    return index
