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
  human labels spent so far (initial labels + rater answers), with the pseudo-labels in force
  (modes ``self-labelling`` and ``cooperative``);
* ``confusion.png`` (tasks ``emotion`` and ``both``): the confusion matrix of the final
  round's evaluation, rows the true class and columns the predicted one, each row normalised
  to the share of that class's clips (colour) with the clip counts written in the cells. It
  is drawn from the pooled counts the round stored under ``confusion`` (a C x C list of
  integers, the sum of the evaluating devices' ``cm``); a run whose rounds lack them gets a
  line saying so instead;
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
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from server.store import CONFUSION_KEY, RunStore  # noqa: E402

__all__ = ["write_report", "confusion_rates", "final_confusion", "metric_label", "CONFUSION_KEY"]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None and not (
        isinstance(r[key], float) and math.isnan(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _cell(key: str, value: float) -> str:
    """A final-table value: counts as integers, seconds with one decimal, scores with four."""
    if float(value).is_integer() and not key.startswith(("uar", "wa", "macro", "ccc", "gap", "worst")):
        return str(int(value))
    return f"{value:.1f}" if key.endswith(("_s", "seconds")) else f"{value:.4f}"


#: How a metric key reads on a figure (axis labels, legends).
METRIC_LABELS = {"uar": "UAR", "wa": "WA", "macro_f1": "macro-F1", "ccc_arousal": "CCC arousal",
                 "ccc_valence": "CCC valence"}

#: How a gap key's measure reads (``gap_<measure>/<attribute>``, :mod:`shared_models.fairness`).
GAP_LABELS = {"uar": "UAR gap", "ccc_arousal": "CCC arousal gap", "ccc_valence": "CCC valence gap",
              "ea": "Equal Accuracy gap", "sp": "Statistical Parity gap",
              "ea_arousal": "Equal Accuracy gap (arousal)", "sp_arousal": "Statistical Parity gap (arousal)",
              "ea_valence": "Equal Accuracy gap (valence)", "sp_valence": "Statistical Parity gap (valence)"}


def metric_label(key: str) -> str:
    """A figure's name for a metric or gap key: ``ccc_arousal`` -> ``CCC arousal``,
    ``gap_sp/gender`` -> ``Statistical Parity gap, gender``; an unknown key as it is."""
    if key.startswith("gap_") and "/" in key:
        measure, attribute = key[len("gap_"):].split("/", 1)
        return f"{GAP_LABELS.get(measure, 'gap_' + measure)}, {attribute}"
    return METRIC_LABELS.get(key, key)


def _plot(path: Path, title: str, ylabel: str, curves: dict[str, tuple[list[int], list[float]]]) -> Path | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    many = len(curves) > 4  # a legend that long would cover the curves: beside them instead
    fig, ax = plt.subplots(figsize=(8.4 if many else 6.4, 4.0), dpi=110)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
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
                {metric_label(k): _series(rounds, k) for k in keys})
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


def _labels_figure(run, rounds: list[dict[str, Any]], out: Path, evaluated: str = "held-out devices") -> Path | None:
    """``labels.png``: held-out UAR against human labels spent (cooperative learning runs);
    the pseudo-labels in force on a second axis in the modes that pseudo-label."""
    if run.config.get("mode", "supervised") == "supervised" and run.config.get("label-fraction", 1.0) >= 1:
        return None
    metric = "ccc_arousal" if run.config.get("task") == "av" else "uar"
    pts = [(r["coop_human_labels"], r[metric], r.get("coop_pseudo_total") or 0, r["round"]) for r in rounds
           if r.get("coop_human_labels") is not None and r.get(metric) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    mode = run.config.get("mode", "supervised")
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
            label=f"{metric_label(metric)} ({evaluated}); rounds marked")
    for x, y, _, r in pts:
        ax.annotate(str(r), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("human labels spent (initial labels + rater answers)")
    ax.set_ylabel(metric_label(metric))
    lines = ax.get_legend_handles_labels()[0]
    if mode in ("self-labelling", "cooperative"):  # the modes that pseudo-label
        twin = ax.twinx()
        twin.plot([p[0] for p in pts], [p[2] for p in pts], color="grey", linestyle="--",
                  label="pseudo-labels in force")
        twin.set_ylabel("pseudo-labels in force (clips)")
        twin.set_ylim(bottom=0, top=max(max(p[2] for p in pts) * 1.1, 1))  # a count: never below 0
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        lines += twin.get_legend_handles_labels()[0]
    ax.set_title(f"{run.name}: learning curve ({mode})")
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "labels.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_rates(counts) -> np.ndarray:
    """Row-normalised confusion matrix: the share of each true class's clips per predicted class.

    Parameters
    ----------
    counts : array-like, shape (C, C)
        Clip counts, ``counts[i, j]`` clips of true class ``i`` predicted as ``j``.

    Returns
    -------
    np.ndarray, shape (C, C), float
        ``counts[i, j] / counts[i].sum()``; a class with no clips (row of zeros) gets a row
        of zeros, not NaN (nothing is divided by zero).

    Raises
    ------
    ValueError
        If ``counts`` is not a square matrix or holds a negative count.
    """
    cm = np.asarray(counts, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square (C, C); got shape {cm.shape}")
    if (cm < 0).any():
        raise ValueError("a confusion matrix holds counts; got a negative value")
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def final_confusion(rounds: list[dict[str, Any]]) -> tuple[int, np.ndarray] | None:
    """``(round, counts)`` of the final stored round's pooled confusion counts.

    None when there are no rounds, the final round stored no counts (``CONFUSION_KEY``
    missing or null, as for runs stored before the coordinator kept them, or task ``av``),
    the counts are not a square matrix, or no clip with an emotion label was evaluated.
    """
    if not rounds:
        return None
    raw = rounds[-1].get(CONFUSION_KEY)
    if raw is None:
        return None
    try:
        counts = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.size == 0 or counts.sum() <= 0:
        return None
    return int(rounds[-1]["round"]), counts.round().astype(np.int64)


def _class_names(config: dict[str, Any], n: int) -> list[str]:
    """The run's ``emotions`` (comma-separated text or a list), or ``class i`` when they do
    not match the matrix."""
    raw = config.get("emotions") or ""
    names = [str(e).strip() for e in (raw if isinstance(raw, (list, tuple)) else str(raw).split(","))]
    names = [e for e in names if e]
    return names if len(names) == n else [f"class {i}" for i in range(n)]


def _confusion_figure(path: Path, title: str, counts: np.ndarray, names: list[str]) -> Path:
    """``confusion.png``: rows true class, columns predicted, colour the row share, text the counts."""
    rates = confusion_rates(counts)
    n = len(names)
    fig, ax = plt.subplots(figsize=(6.4, 4.0 if n <= 6 else 5.6), dpi=110)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="share of the true class's clips")
    size = 8 if n <= 6 else 6
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=size,
                    color="white" if rates[i, j] > 0.5 else "black")
    totals = counts.sum(axis=1)
    ax.set_xticks(range(n), names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=size)
    ax.set_yticks(range(n), [f"{name} ({int(t)})" for name, t in zip(names, totals)], fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (clips)")
    ax.set_title(title)
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
    figures.append(_plot(out / "groups.png", f"{run.name}: {metric_label(group_metric)} per group ({evaluated})",
                         metric_label(group_metric), curves))
    figures += _fairness_figures(store, run, rounds, out, group_metric)
    figures.append(_labels_figure(run, rounds, out, evaluated))
    confusion_note = ""
    if task in ("emotion", "both"):  # task av has no categories
        found = final_confusion(rounds)
        if found:
            last, counts = found
            figures.append(_confusion_figure(out / "confusion.png",
                                             f"{run.name}: confusion, round {last} ({evaluated})",
                                             counts, _class_names(run.config, len(counts))))
        elif rounds:
            confusion_note = "<p>No confusion matrix: the final round stored no pooled confusion counts.</p>"

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
{error}{imgs}{confusion_note}
<h2>Final round (metrics: {evaluated})</h2><table>{table}</table>
<h2>Configuration</h2><pre>{html.escape(json.dumps(run.config, indent=2))}</pre>
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    return index
