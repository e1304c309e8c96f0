"""The ``fedaffect`` command line (Typer + Rich).

::

    fedaffect data prepare emodb --source ~/corpora/emodb --out emodb.csv
    fedaffect simulate --manifest emodb.csv --model egemaps-mlp --task emotion \\
        --partition speaker --folds 5 --rounds 30 --summary-json emodb-run.json
    fedaffect runs
    fedaffect report RUN
    fedaffect demo

Experiments can live in a TOML file (``--config exp.toml``); options given on the command
line override it, and ``--set key=value`` overrides any run-config key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.supernode import DEFAULT_POLL_S

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

__all__ = ["app", "main"]

app = typer.Typer(help="Federated and cooperative learning of speech affect models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Corpora: turn a corpus into a clip manifest.", no_args_is_help=True)
app.add_typer(data_app, name="data")
device_app = typer.Typer(help="On a device: keys, SuperNode, labelling the clips its model asked about.",
                         no_args_is_help=True)
app.add_typer(device_app, name="device")
server_app = typer.Typer(help="On the coordinator: certificates, SuperLink, enrolling devices.", no_args_is_help=True)
app.add_typer(server_app, name="server")
console = Console(stderr=True)
# Tables piped to a file or another program are not squeezed into 80 columns (Rich's width
# without a terminal); COLUMNS still wins when set.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the CLI: clips skipped (``SkippedClipsWarning``, a message
    for the user: how many, why, which) as one line without Python's file:line and source;
    every other warning as Python shows it."""
    from shared_models.audio import SkippedClipsWarning

    if issubclass(category, SkippedClipsWarning):
        console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def call_command(command, **given: Any) -> Any:
    """Call a command function of this CLI from Python (``demo`` runs ``simulate``): the
    parameters not given take their declared defaults. Called directly, a Typer function would
    get its ``typer.Option(...)`` objects as values for them, and an option added later would
    break every such call.

    Raises
    ------
    TypeError
        For a parameter the command does not have.
    """
    import inspect

    params = inspect.signature(command).parameters
    unknown = set(given) - set(params)
    if unknown:
        raise TypeError(f"{command.__name__} has no parameter {', '.join(sorted(unknown))}")
    defaults = {name: p.default.default if isinstance(p.default, typer.models.ParameterInfo) else p.default
                for name, p in params.items() if name not in given}
    return command(**given, **defaults)


def _setup_logging(verbose: bool) -> None:
    warnings.showwarning = _show_warning
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    logging.getLogger("fedaffect").setLevel(logging.INFO if verbose else logging.WARNING)
    import flwr.common.logger as flwr_logger

    # Flower logs through its own handler; keep it to warnings unless asked, and don't
    # let it reach the root handler a second time.
    flwr_logger.FLOWER_LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    flwr_logger.FLOWER_LOGGER.propagate = False


def _fail(message: str, code: int = 2) -> None:
    # the message is text, not Rich markup (a "[...]" in it would vanish), and one problem a
    # line stays on its line
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@data_app.command("prepare")
def data_prepare(
    corpus: str = typer.Argument(..., help="emodb, ravdess, crema-d, tess, csv, hedgewars or synth"),
    source: Optional[Path] = typer.Option(None, help="Corpus folder (for csv: the CSV file, columns path and "
                                          "speaker required, the others optional; for synth: the folder to generate into)"),
    out_path: Path = typer.Option(..., "--out", help="Manifest CSV to write; skipped clips are listed next to it "
                                  "(emodb.csv -> emodb.skipped.csv)"),
) -> None:
    """Scan a corpus and write its manifest (path, speaker, gender, emotion, arousal, valence, duration).

    Clips that cannot be used (unreadable, missing, empty, silent, too short, not named by the
    corpus's convention, duplicates) are skipped: the counts per reason are printed, and every
    skipped clip with its reason is written to OUT's name + ``.skipped.csv``. The output is
    checked to be writable before the corpus is scanned.
    """
    _setup_logging(False)
    from client.corpora import CORPORA, prepare
    from shared_models.audio import SkippedClipsWarning

    if corpus not in CORPORA:
        _fail(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    kwargs = {} if source is None else {"source": source}
    if source is None and corpus not in ("hedgewars",):
        _fail(f"--source is needed for {corpus}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedClipsWarning)  # summarised below, without Python's file:line
            result = prepare(corpus, out=out_path, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:  # FileNotFoundError, ManifestError among them
        _fail(str(err))
    out.print(f"[green]wrote[/] {escape(str(result.manifest))}: {result.n_clips} clips, {result.n_speakers} speakers",
              soft_wrap=True)
    if result.skipped.total:
        n_seen = result.n_clips + result.skipped.total
        console.print(f"[yellow]skipped[/] {result.skipped.total} of {n_seen} clips ({result.skipped.summary()}); "
                      f"each listed with its reason in {escape(str(result.skipped_csv))}", soft_wrap=True)


def _default(key: str) -> str:
    """`` [default: X]`` for an option's help: the run config's default of ``key``."""
    import dataclasses

    from shared_models.config import RunConfig

    # the field's default, not RunConfig(): building one validates emotions, which imports pandas
    default = {f.name: f.default for f in dataclasses.fields(RunConfig)}[key.replace("-", "_")]
    return escape(f" [default: {default}]")  # not Rich markup


def _config_values(config_file: Optional[Path], overrides: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Run-config values: the experiment file, then the options given, then ``--set`` items;
    keys hyphenated (``local_epochs`` in a file and ``--set local-epochs=3`` are one key).

    Raises
    ------
    ConfigError
        For a ``--set`` item that is not ``key=value``.
    """
    from shared_models.config import RunConfig, load_config_file, parse_set

    values: dict[str, Any] = {RunConfig.check_key(k): v for k, v in
                              (load_config_file(config_file) if config_file else {}).items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update(parse_set(item) for item in sets)
    return values


def _build_config(config_file: Optional[Path], overrides: dict[str, Any], sets: list[str]):
    """The run config and the values named for it (file, options, ``--set``), read once."""
    from shared_models.config import ConfigError, RunConfig

    try:
        values = _config_values(config_file, overrides, sets)
        return RunConfig.from_mapping(values), values
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))


def _evaluated_on(summary: dict[str, Any]) -> str:
    """Whose clips the metrics are on: held-out speakers, or (``folds = 1``) the training
    speakers' own clips."""
    return "held-out speakers" if int(summary.get("config", {}).get("folds", 2)) > 1 else \
        "training speakers: folds = 1 holds out nobody"


def _rounds_table(summary: dict[str, Any]) -> Table:
    folds = summary["folds"]
    title = f"Per-round metrics ({_evaluated_on(summary)})" + (f", mean over {len(folds)} folds" if len(folds) > 1 else "")
    table = Table(title=title)
    cols = ["round", "train_loss", "eval_loss", "uar", "wa", "macro_f1", "ccc_arousal", "ccc_valence", "wall_s"]
    for c in cols:
        table.add_column(c, justify="right")
    for i, r in enumerate(summary["rounds"]):  # the mean over folds (server.simulation.mean_rounds)
        table.add_row(*(str(i) if c == "round" else _fmt(r.get(c)) for c in cols))
    return table


#: Fairness measures shown in the final table beside the standard metrics.
TABLE_FAIRNESS = ("worst_uar", "gap_uar", "worst_ccc", "gap_ccc")


def _final_table(summary: dict[str, Any]) -> Table:
    from server.app import FINAL_METRICS

    folds = len(summary.get("folds") or [])
    table = Table(title=f"Final metrics ({_evaluated_on(summary)})" + (f", {folds} folds" if folds > 1 else ""))
    table.add_column("metric")
    table.add_column("mean" if folds > 1 else "value", justify="right")
    if folds > 1:  # a standard deviation over one fold says nothing
        table.add_column("std", justify="right")
    config = summary.get("config", {})
    for k, v in summary["final"].items():
        # Blank: a head this task does not train. The other fairness measures are in the JSON.
        if v["mean"] is not None and (k in FINAL_METRICS or k.startswith(TABLE_FAIRNESS)):
            table.add_row(k, _fmt(v["mean"]), *([_fmt(v["std"])] if folds > 1 else []))
    if config.get("dp", "off") != "off":  # epsilon means nothing without its delta; no noise, no guarantee
        eps = (summary["final"].get("dp_epsilon") or {}).get("mean")
        table.add_row(f"dp_epsilon (delta {config.get('dp-delta')})",
                      _fmt(eps) if eps is not None else "inf (no noise: no privacy guarantee)",
                      *([""] if folds > 1 else []))
    task = config.get("task", "emotion")
    keys = (["uar"] if task != "av" else []) + (["ccc_arousal", "ccc_valence"] if task != "emotion" else [])
    for attr, groups in summary["per_group"].items():
        for g, metrics in groups.items():
            for key in keys:  # a group without a value (a speaker only trained on) has no row
                if metrics.get(key) is not None:
                    table.add_row(f"{key} {attr}={g}", _fmt(metrics.get(key)), *([""] if folds > 1 else []))
    return table


@app.command()
def simulate(
    manifest: Optional[Path] = typer.Option(None, help="Clip manifest (from `fedaffect data prepare`)"),
    model: Optional[str] = typer.Option(None, help="egemaps-mlp, logmel-crnn or wave-cnn-gru" + _default("model")),
    task: Optional[str] = typer.Option(None, help="emotion, av (arousal/valence) or both" + _default("task")),
    partition: Optional[str] = typer.Option(None, help="speaker, iid or dirichlet" + _default("partition")),
    num_devices: Optional[int] = typer.Option(None, help="training devices for iid/dirichlet (0 = one per speaker)"
                                              + _default("num-devices")),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration for --partition dirichlet"
                                          + _default("dirichlet-alpha")),
    folds: Optional[int] = typer.Option(None, help="leave-speakers-out folds (1 = no held-out speakers)"
                                        + _default("folds")),
    fold: Optional[int] = typer.Option(None, help="run only this fold" + escape(" [default: every fold]")),
    rounds: Optional[int] = typer.Option(None, help="federated rounds" + _default("num-server-rounds")),
    local_epochs: Optional[int] = typer.Option(None, help="local epochs per round" + _default("local-epochs")),
    lr: Optional[float] = typer.Option(None, help="local learning rate (Adam)" + _default("lr")),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedprox, qfedavg or fair (tune with --set "
                                           "fair-beta=2 and --set fair-attribute=gender)" + _default("strategy")),
    seed: Optional[int] = typer.Option(None, help="seed of the folds, label split, sampling and training"
                                       + _default("seed")),
    mode: Optional[str] = typer.Option(None, help="supervised, self-labelling, active or cooperative"
                                       + _default("mode")),
    label_fraction: Optional[float] = typer.Option(None, help="share of each device's clips that keep their labels"
                                                   + _default("label-fraction")),
    init: Optional[Path] = typer.Option(None, help="start from this checkpoint (`fedaffect pretrain`)"),
    resume: Optional[str] = typer.Option(None, help="continue this stored run (one fold) from its last valid "
                                         "checkpoint, with its stored config: only --rounds and where its files "
                                         "are (--manifest, --run-dir) may change"),
    run_dir: Optional[Path] = typer.Option(None, help="folder for the run store, checkpoints and reports"),
    store_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the run store"),
    engine: str = typer.Option("inprocess", help="inprocess (fast, serial) or ray (Flower Simulation Engine)"),
    config: Optional[Path] = typer.Option(None, "--config", help="experiment file (TOML)"),
    set_: list[str] = typer.Option([], "--set", help="override any run-config key: --set batch-size=16"),
    summary_json: Optional[Path] = typer.Option(None, help="write config, per-round and final metrics here"),
    report: bool = typer.Option(True, help="write each fold's report (PNG + HTML)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every round and device event"),
) -> None:
    """Simulate a federation (one device per speaker by default) and report held-out metrics.

    Later settings win: defaults, --config FILE, these options, --set KEY=VALUE."""
    _setup_logging(verbose)
    options = {
        "manifest": str(manifest) if manifest else None, "model": model, "task": task, "partition": partition,
        "num-devices": num_devices, "dirichlet-alpha": alpha, "folds": folds, "fold": fold,
        "num-server-rounds": rounds, "local-epochs": local_epochs, "lr": lr, "strategy": strategy, "seed": seed,
        "run-dir": str(run_dir) if run_dir else None, "store-url": store_url,
        "mode": mode, "label-fraction": label_fraction, "init": str(init) if init else None, "resume": resume,
    }
    cfg, named = _build_config(config, options, set_)
    one_fold = "fold" in named  # named anywhere: option, file or --set
    if cfg.resume:  # the stored run is one fold: it continues alone, with its stored config
        from server.simulation import resumed_config

        try:
            cfg, one_fold = resumed_config(named), True
        except ValueError as err:
            _fail(str(err))
    if not cfg.manifest:
        _fail("no manifest: pass --manifest MANIFEST.csv (from `fedaffect data prepare`)")
    from shared_models.config import RunConfig

    # options given on this command line that the partition would ignore (a file's are left alone:
    # one experiment file serves several partitions)
    given = {k for k, v in options.items() if v is not None} | {
        RunConfig.check_key(item.split("=", 1)[0].strip()) for item in set_}
    if "dirichlet-alpha" in given and cfg.partition != "dirichlet":
        _fail(f"--alpha (dirichlet-alpha) applies to --partition dirichlet, not {cfg.partition!r}")
    if "num-devices" in given and cfg.num_devices and cfg.partition == "speaker":
        _fail(f"--num-devices applies to partitions iid and dirichlet; --partition speaker makes one device "
              "per speaker")
    from server.report import write_report
    from server.simulation import simulate as run_simulation
    from server.store import RunStore, default_store_url
    from shared_models.manifest import ManifestError

    n_folds = cfg.folds if (not one_fold and cfg.folds > 1) else 1
    from server.simulation import run_names

    if not cfg.run_name:  # named here, once for every fold, so that the resume hint can name the run stopped
        cfg = cfg.replace(run_name=run_names(cfg, all_folds=False)[0])
    names = run_names(cfg, all_folds=not one_fold)  # the runs this command stores
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    with progress:
        bar = progress.add_task("federated rounds", total=n_folds * (cfg.num_server_rounds + 1), status="")

        def on_round(f: int, r: int, m: dict[str, Any]) -> None:
            status = f"fold {f} round {r}: UAR {_fmt(m.get('uar'))} CCC-A {_fmt(m.get('ccc_arousal'))}"
            progress.update(bar, advance=1, status=status)
            if not console.is_terminal:  # no live bar in a log file: one line a round instead
                console.print(status, highlight=False)

        try:
            summary = run_simulation(cfg, engine=engine, all_folds=not one_fold, on_round=on_round)
        except KeyboardInterrupt:
            progress.stop()
            store = RunStore(cfg.store_url or default_store_url(cfg.run_dir))
            stopped = [n for n in names if (r := store.find_run(n)) is not None and r.status == "failed"]
            where = f"--run-dir {cfg.run_dir}" if not cfg.store_url else f"--store-url {store.shown_url}"
            if stopped:
                console.print(f"[yellow]interrupted[/]: run {escape(stopped[-1])} is stored as failed with the "
                              f"rounds it finished (`fedaffect report {escape(stopped[-1])} {escape(where)}`); "
                              f"`fedaffect simulate {escape(where)} --resume {escape(stopped[-1])}` continues it",
                              soft_wrap=True)
            else:
                console.print(f"[yellow]interrupted[/] with no run half-way: nothing to resume (`fedaffect runs "
                              f"{escape(where)}` lists the runs stored)", soft_wrap=True)
            raise typer.Exit(130)
        except (ValueError, FileNotFoundError, ManifestError) as err:
            progress.stop()
            _fail(str(err))
        except Exception as err:  # the run is marked failed in the store
            progress.stop()
            console.print_exception(show_locals=False)
            _fail(f"simulation failed: {err}", code=1)
    out.print(_rounds_table(summary))
    out.print(_final_table(summary))
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=str))
        out.print(f"summary: [bold]{summary_json}[/]")
    if report:
        store = RunStore(summary["config"]["store-url"] or default_store_url(cfg.run_dir))
        pages = [write_report(store, name, Path(cfg.run_dir) / name / "report") for name in summary["runs"]]
        out.print(f"report: [bold]{pages[-1]}[/]" if len(pages) == 1 else
                  "reports, one per fold:\n" + "\n".join(f"  [bold]{page}[/]" for page in pages))


def _existing_store(run_dir: Path) -> str:
    """The default SQLite store of ``run_dir``; reading commands do not create one.

    Raises
    ------
    ConnectionError
        When ``run_dir`` holds no run store (a mistyped folder).
    """
    path = Path(run_dir).expanduser().resolve() / "fedaffect.db"
    if not path.is_file():
        raise ConnectionError(f"no run store in {path.parent} (no fedaffect.db): pass the --run-dir of your "
                              "runs, or --store-url")
    return f"sqlite:///{path}"


@app.command()
def runs(
    run_dir: Path = typer.Option(Path("runs"), help="folder of the default run store"),
    store_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the run store"),
) -> None:
    """List stored runs with their status and final UAR / CCC (a failed or running run's:
    those of its last stored round)."""
    from server.store import RunStore

    try:
        store = RunStore(store_url or _existing_store(run_dir))
    except ConnectionError as err:
        _fail(str(err))
    table = Table(title=f"Runs in {store.shown_url}")
    listed = store.list_runs()
    for c in ("id", "name", "status", "model", "rounds", "uar", "ccc_arousal", "ccc_valence"):
        # the name is what `fedaffect report RUN` takes: never shortened, the other columns give way
        table.add_column(c, no_wrap=c == "name", min_width=max((len(r.name) for r in listed), default=4)
                         if c == "name" else None)
    for run in listed:
        rounds = store.rounds(run.id)
        final = (run.summary or {}).get("final") or (rounds[-1] if rounds else {})
        table.add_row(str(run.id), run.name, run.status, str(run.config.get("model")),
                      str(max(len(rounds) - 1, 0)), _fmt(final.get("uar")),
                      _fmt(final.get("ccc_arousal")), _fmt(final.get("ccc_valence")))
    out.print(table)


@app.command()
def report(
    run: str = typer.Argument(..., help="run name or id (see `fedaffect runs`)"),
    run_dir: Path = typer.Option(Path("runs"), help="folder of the default run store"),
    store_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the run store"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="report folder (default runs/RUN/report)"),
) -> None:
    """Draw a run's learning curves (PNG) and write its HTML report."""
    from server.report import write_report
    from server.store import RunStore

    try:
        store = RunStore(store_url or _existing_store(run_dir))
        name = store.get_run(run).name
        page = write_report(store, run, out_dir or run_dir / name / "report")
    except (KeyError, ConnectionError) as err:
        _fail(str(err.args[0]))
    out.print(f"report: [bold]{page}[/]")


@app.command()
def demo(
    data_dir: Path = typer.Option(Path("data"), help="where the synth corpus is generated"),
    run_dir: Path = typer.Option(Path("runs"), help="run store, checkpoints, reports"),
    rounds: int = typer.Option(10, help="federated rounds"),
    model: str = typer.Option("egemaps-mlp"),
) -> None:
    """Generate the synth corpus, simulate a federation of its speakers, and report."""
    _setup_logging(False)
    from client.corpora import prepare

    manifest = data_dir / "synth.csv"
    console.print(f"[bold]1/2[/] synth corpus (espeak-ng) -> {manifest}")
    result = prepare("synth", source=data_dir / "synth", out=manifest)
    console.print(f"    {result.n_clips} clips, {result.n_speakers} speakers")
    console.print(f"[bold]2/2[/] federated simulation: one device per speaker, {rounds} rounds, "
                  "2 speakers held out")
    call_command(simulate, manifest=manifest, model=model, task="both", partition="speaker", folds=4, fold=0,
                 rounds=rounds, run_dir=run_dir, engine="inprocess", summary_json=run_dir / "demo-summary.json",
                 report=True, verbose=False)


@app.command()
def pretrain(
    manifest: Path = typer.Option(..., help="manifest of the source corpus"),
    model: str = typer.Option("egemaps-mlp", help="egemaps-mlp, logmel-crnn or wave-cnn-gru"),
    out_path: Path = typer.Option(..., "--out", help="checkpoint to write (use with `simulate --init`)"),
    task: str = typer.Option("emotion", help="emotion, av or both"),
    epochs: int = typer.Option(20, min=1, help="training epochs"),
    lr: float = typer.Option(3e-3, help="learning rate (Adam)"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    emotions: Optional[str] = typer.Option(None, help="comma-separated classes of the head (default: the corpus's)"),
    cache_dir: Path = typer.Option(Path(".cache/fedaffect"), help="feature cache"),
    compute_device: str = typer.Option("cpu", "--compute-device", help="cpu, cuda or auto (a GPU when torch sees one)"),
    validation_speakers: int = typer.Option(0, min=0, help="speakers kept out of training to score the model on "
                                            "unheard voices (0: train on all)"),
) -> None:
    """Train a model centrally on a source corpus: the starting point of transfer learning."""
    _setup_logging(False)
    from client.transfer import pretrain as run_pretrain
    from shared_models.manifest import ManifestError

    if task not in ("emotion", "av", "both"):
        _fail(f"unknown task {task!r}; known: emotion, av, both")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    bar = None

    def on_epoch(epoch: int, loss: float) -> None:
        nonlocal bar
        if bar is None:  # features are extracted (their own bar) before the first epoch
            progress.start()
            bar = progress.add_task(f"pretraining {model}", total=epochs, status="")
        progress.update(bar, completed=epoch, status=f"loss {_fmt(loss)}")
        if not console.is_terminal:  # a log file: one line an epoch
            console.print(f"epoch {epoch}/{epochs}: loss {_fmt(loss)}", highlight=False)

    try:
        result = run_pretrain(manifest, model, out_path, task=task, epochs=epochs, lr=lr, batch_size=batch_size,
                              seed=seed, emotions=[e.strip() for e in emotions.split(",")] if emotions else None,
                              cache_dir=cache_dir, progress=True, compute_device=compute_device, on_epoch=on_epoch,
                              validation_speakers=validation_speakers)
    except (ValueError, FileNotFoundError, ManifestError) as err:
        progress.stop()
        _fail(str(err))
    progress.stop()
    out.print(f"[green]wrote[/] {result['path']}: {model} on {result['clips']} clips of {result['speakers']} "
              f"speakers, emotions {', '.join(result['emotions'])}; training loss {_fmt(result['train_loss'])}, "
              f"training UAR {_fmt(result['train_uar'])} ({result['seconds']:.0f}s)")
    if "validation_speakers" in result:
        out.print(f"validation on {len(result['validation_speakers'])} unheard speakers "
                  f"({', '.join(result['validation_speakers'])}): UAR {_fmt(result['val_uar'])}, "
                  f"CCC arousal {_fmt(result['val_ccc_arousal'])}, valence {_fmt(result['val_ccc_valence'])}")


@device_app.command("label")
def device_label(
    data_dir: Path = typer.Option(..., help="the device's data directory (node config data-dir)"),
    play: bool = typer.Option(True, "--play/--no-play", help="offer to play clips (aplay, paplay, ffplay or play)"),
    drop_missing: bool = typer.Option(False, "--drop-missing", help="drop queued clips whose files are gone even when "
                                      "their folder is missing too (they are kept, in case a drive is not mounted)"),
    guesses: bool = typer.Option(True, "--guesses/--no-guesses", help="show the model's guesses for each clip "
                                 "(--no-guesses: label unprompted; a shown guess anchors the answer)"),
) -> None:
    """Label the clips the device's model is least certain about, one at a time (q quits).

    Answer with an emotion (`happy`), arousal and valence in [-1, 1] (`a=0.6 v=0.2`), or
    both (`happy a=0.6 v=0.2`), as the run's task asks; a bad answer is asked again.
    """
    _setup_logging(False)
    from client.labelling import label_session

    try:
        label_session(data_dir, stdin=sys.stdin, stdout=sys.stdout, play=play, drop_missing=drop_missing,
                      guesses=guesses)
    except FileNotFoundError as err:
        _fail(str(err))


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="a run's checkpoint (runs/<run>/checkpoints/round-NNNN.pt) or a "
                                                "`fedaffect pretrain` one"),
    clips: list[Path] = typer.Argument(..., help="audio files (wav, flac, ogg, ...)"),
    data_dir: Optional[Path] = typer.Option(None, help="the device's data directory: its manifest's clips give the "
                                                        "standardisation statistics"),
    reference: Optional[Path] = typer.Option(None, help="a manifest of the device's clips, for the statistics "
                                                        "(default: the clips given, at least 5)"),
    cache_dir: Path = typer.Option(Path(".cache/fedaffect"), help="feature cache"),
    top: int = typer.Option(3, min=1, help="classes shown per clip"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the predictions as JSON"),
) -> None:
    """What a trained model hears in clips: emotion probabilities, arousal and valence (on this device)."""
    _setup_logging(False)
    from client.inference import predict_clips, reference_clips
    from shared_models.manifest import ManifestError

    if not (data_dir or reference):
        # Models see features standardised per device (per speaker); from the given clips
        # alone, a batch of one speaker's angry clips looks "average" and is misread.
        console.print(f"[yellow]note[/]: standardising features on the {len(clips)} clip(s) given; for the "
                      "speaker's own statistics pass --data-dir (the device's folder) or --reference MANIFEST")
    try:
        ref = reference_clips(data_dir, reference) if (data_dir or reference) else None
        preds = predict_clips(checkpoint, clips, reference=ref, cache_dir=cache_dir, progress=True)
    except (ValueError, FileNotFoundError, ManifestError) as err:
        _fail(str(err))
    table = Table(title=f"{checkpoint.name}: {len(preds)} clips")
    for col in ("clip", "emotion", f"top {top}", "arousal", "valence"):
        table.add_column(col)
    for p in preds:
        if p.skipped:
            table.add_row(Path(p.path).name, f"[yellow]skipped: {p.skipped}[/]", "", "", "")
        else:
            table.add_row(Path(p.path).name, p.emotion or "-", ", ".join(f"{e} {v:.2f}" for e, v in p.top(top)) or "-",
                          *("-" if v != v else f"{v:+.2f}" for v in (p.arousal, p.valence)))  # NaN: head not trained
    out.print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([p.as_dict() for p in preds], indent=2))
        out.print(f"wrote {json_out}")

# --------------------------------------------------------------------------- real federation (issue 5)


def _when(iso: str) -> str:
    """A registry time (ISO 8601 UTC, ``2026-11-23T07:04:19Z``) as tables show it:
    ``2026-11-23 07:04:19Z``; empty stays empty."""
    return iso.replace("T", " ", 1)


def _state_error(err: Exception) -> None:
    from shared_models.config import ConfigError
    from shared_models.security import CertificateError

    if isinstance(err, (FileNotFoundError, FileExistsError, ConfigError, CertificateError, ValueError, KeyError,
                        ConnectionError)):
        _fail(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    raise err


@server_app.command("init")
def server_init(
    state_dir: Path = typer.Option(..., help="the coordinator's state directory (e.g. /srv/fedaffect)"),
    name: list[str] = typer.Option([], "--host", help="host name or IP devices use to reach the coordinator "
                                   "(repeat; default: localhost, 127.0.0.1 and this machine's names)"),
    listen: Optional[str] = typer.Option(None, help="address the SuperLink listens on [default: 0.0.0.0]"),
    port: Optional[int] = typer.Option(None, help="the SuperLink's HTTPS port [default: 8000]"),
    store_url: str = typer.Option("", help="run store URL (default: SQLite in the state directory; "
                                  "PostgreSQL: postgresql://user:pass@host/db)"),
    emotions: Optional[str] = typer.Option(None, help="comma-separated classes of the categorical head"),
    renew: bool = typer.Option(False, help="keep the CA and devices; make a new server certificate (and take "
                               "--listen, --port, --store-url when given)"),
) -> None:
    """Create the coordinator's CA, server certificate, config and run store."""
    _setup_logging(False)
    from server.deployment import DEFAULT_EMOTIONS, StatePaths, init_server

    try:
        paths = init_server(state_dir, names=list(name) or None, host=listen, port=port, store_url=store_url,
                            emotions=emotions or DEFAULT_EMOTIONS, renew=renew)
    except Exception as err:  # noqa: BLE001 - known errors become messages
        _state_error(err)
    assert isinstance(paths, StatePaths)
    out.print(f"[green]{'renewed' if renew else 'initialised'}[/] {paths.root}")
    out.print(f"  CA certificate for devices: [bold]{paths.ca_cert}[/]")
    out.print(f"  server certificate: {paths.server_cert}\n  config: {paths.config}")
    out.print(f"next: fedaffect server start --state-dir {paths.root}")


@server_app.command("start")
def server_start(
    state_dir: Path = typer.Option(..., help="the coordinator's state directory"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="echo the SuperLink's log"),
) -> None:
    """Run the SuperLink (TLS, device authentication) in the foreground; Ctrl-C or SIGTERM stops it."""
    _setup_logging(True)
    from server.deployment import start_server

    def ready(address: str) -> None:
        console.print(f"[green]SuperLink up[/] on {address} (TLS, SuperNode authentication); logs in "
                      f"{Path(state_dir) / 'logs'}")

    try:
        code = start_server(state_dir, ready=ready, echo=(lambda line: console.print(line, markup=False,
                                                                                      highlight=False))
                            if verbose else None)
    except RuntimeError as err:
        _fail(str(err), code=1)
    except Exception as err:  # noqa: BLE001
        _state_error(err)
    raise typer.Exit(code)


@server_app.command("enrol")
def server_enrol(
    state_dir: Path = typer.Option(..., help="the coordinator's state directory"),
    name: str = typer.Option(..., help="the device's name"),
    public_key: Path = typer.Option(..., help="the device's public key (from `fedaffect device init`)"),
    group: list[str] = typer.Option([], help="protected-group attribute, e.g. gender=female (repeat)"),
    force: bool = typer.Option(False, "--force", help="enrol a public key that was revoked before (refused "
                               "otherwise: a revoked key may have leaked)"),
) -> None:
    """Enrol a device: register its key with the SuperLink and record it in the registry.

    A revoked name can be enrolled again with a new key; the registry keeps the revoked
    enrolment (`fedaffect server devices --all`)."""
    _setup_logging(False)
    from server.deployment import enrol_device

    try:
        info = enrol_device(state_dir, name, public_key, group, force=force)
    except RuntimeError as err:
        _fail(str(err), code=1)
    except Exception as err:  # noqa: BLE001
        _state_error(err)
    groups = ", ".join(f"{k}={v}" for k, v in info["groups"].items()) or "none"
    out.print(f"[green]enrolled[/] {info['name']}: node {info['node-id']}, key {info['fingerprint']}, groups {groups}")
    if info.get("replaces"):
        old = info["replaces"]
        out.print(f"  in place of its enrolment revoked {_when(old['revoked-at'])} (key {old['fingerprint']}), kept in "
                  f"the registry: `fedaffect server devices --state-dir {state_dir} --all`", soft_wrap=True)


@server_app.command("unenrol")
def server_unenrol(
    name: str = typer.Argument(..., help="the device's name"),
    state_dir: Path = typer.Option(..., help="the coordinator's state directory"),
) -> None:
    """Revoke a device: the SuperLink refuses it from now on."""
    _setup_logging(False)
    from server.deployment import unenrol_device

    try:
        info = unenrol_device(state_dir, name)
    except RuntimeError as err:
        _fail(str(err), code=1)
    except Exception as err:  # noqa: BLE001
        _state_error(err)
    out.print(f"[yellow]revoked[/] {info['name']} (node {info['node-id']}) at {_when(info['revoked-at'])}")


@server_app.command("devices")
def server_devices(
    state_dir: Path = typer.Option(..., help="the coordinator's state directory"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table (times ISO 8601, UTC)"),
    show_all: bool = typer.Option(False, "--all", help="also list the earlier, revoked enrolments of names "
                                  "enrolled again"),
) -> None:
    """List enrolled devices with their status and when they last came online (times in UTC)."""
    _setup_logging(False)
    from server.deployment import list_devices

    try:
        rows = list_devices(state_dir, include_superseded=show_all)
    except Exception as err:  # noqa: BLE001
        _state_error(err)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"Devices of {state_dir}")
    for c in ("name", "status", "groups", "came online", "enrolled", "node id"):
        table.add_column(c)
    colours = {"online": "green", "offline": "yellow", "revoked": "red"}
    for r in rows:
        status = f"[{colours.get(r['status'], 'white')}]{r['status']}[/]" + (
            f" {_when(r['revoked-at'])}" if r["revoked-at"] else "")
        table.add_row(r["name"], status, ", ".join(f"{k}={v}" for k, v in r["groups"].items()),
                      _when(r["last-seen"]), _when(r["enrolled-at"]), r["node-id"])
    out.print(table)


@app.command()
def train(
    state_dir: Path = typer.Option(..., help="the coordinator's state directory (its SuperLink must be running)"),
    model: Optional[str] = typer.Option(None, help="egemaps-mlp, logmel-crnn or wave-cnn-gru"),
    task: Optional[str] = typer.Option(None, help="emotion, av or both"),
    rounds: Optional[int] = typer.Option(None, help="federated rounds"),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedprox, qfedavg or fair"),
    min_devices: Optional[int] = typer.Option(None, help="wait for this many connected devices before round 1"),
    run_name: Optional[str] = typer.Option(None, help="name of the run (default train-DATE-TIME)"),
    resume: Optional[str] = typer.Option(None, help="continue this stored run from its last valid checkpoint, with "
                                         "its stored config: only --rounds, --min-devices and --set round-timeout / "
                                         "min-train-devices may change"),
    mode: Optional[str] = typer.Option(None, help="supervised, self-labelling, active or cooperative (devices' "
                                       "clips without a label form their pool)"),
    config: Optional[Path] = typer.Option(None, "--config", help="experiment file (TOML)"),
    set_: list[str] = typer.Option([], "--set", help="override any run-config key: --set round-timeout=120"),
    timeout: float = typer.Option(24 * 3600, help="seconds the run may take"),
) -> None:
    """Submit a federated run to the coordinator's devices, follow it, exit with its status.

    Ctrl-C, SIGTERM and SIGHUP (a closed ssh session) stop the run and mark it failed; it can
    be continued with --resume RUN. A resumed run keeps its stored config: options that would
    change what it trains (model, strategy, task, mode, learning rate...) are refused."""
    _setup_logging(False)
    import signal

    from shared_models.config import ConfigError
    from server.deployment import train as run_train

    try:
        values = _config_values(config, {"model": model, "task": task, "num-server-rounds": rounds,
                                         "strategy": strategy, "min-devices": min_devices, "run-name": run_name,
                                         "mode": mode}, set_)
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))

    def interrupted(signum, _frame) -> None:  # as Ctrl-C: follow_run stops the Flower run on its way out
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def on_line(line: str) -> None:
        if "fedaffect." in line or "ERROR" in line or "rror" in line:
            console.print(line.split("fedaffect.server ", 1)[-1], markup=False, highlight=False)

    if not resume and not values.get("run-name"):  # named here, so that the resume hint can name it
        import time

        values["run-name"] = f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    name = resume or values["run-name"]
    handlers = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = run_train(state_dir, values, resume=resume or "", timeout_s=timeout, on_line=on_line)
    except KeyboardInterrupt as err:
        stored, next_step = _after_stopped_train(state_dir, name)
        what = "" if stored is False else "the run is stopped on the devices and marked failed; "
        console.print(f"[yellow]stopped[/] ({escape(str(err) or 'Ctrl-C')}): {what}{escape(next_step)}",
                      soft_wrap=True)
        raise typer.Exit(130)
    except (ConfigError, KeyError, FileNotFoundError, ValueError) as err:
        _fail(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    except RuntimeError as err:
        _fail(f"{err}\n{_after_stopped_train(state_dir, name)[1]}", code=1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    colour = "green" if result.ok else "red"
    out.print(f"[{colour}]run {result.run}[/]: Flower {result.flower_status}, store {result.store_status} "
              f"({result.seconds:.0f}s)" + (f"\n{result.error}" if result.error else ""))
    where = _store_option(state_dir)
    out.print(f"see: fedaffect runs {where} / fedaffect report {result.run} {where}")
    raise typer.Exit(0 if result.ok else 1)


def _after_stopped_train(state_dir: Path, name: str) -> tuple[Optional[bool], str]:
    """Whether a stopped or failed ``train`` left its run in the store (None: the store cannot
    say), and what to do next: resume it, or (nothing stored) run the command again."""
    from server.deployment import StatePaths, stored_run

    resume = f"`fedaffect train --state-dir {state_dir} --resume {name}` continues it"
    try:
        run = stored_run(state_dir, name)
    except Exception:  # noqa: BLE001 - the store cannot be read now: say when the hint holds
        return None, f"if `fedaffect runs` lists {name}, {resume}"
    if run is not None:
        return True, resume
    log_file = StatePaths(Path(state_dir).expanduser().resolve()).runs / name / "flower.log"
    said = f" (what it logged: {log_file})" if log_file.is_file() else ""
    return False, f"the run was not stored, so there is nothing to resume{said}: run the same command again to start it"


def _store_option(state_dir: Path) -> str:
    """How `runs` and `report` reach a coordinator's run store: its ``--run-dir`` (SQLite in the
    state directory), or its ``--store-url`` (password hidden: give yours)."""
    from sqlalchemy.engine import make_url

    from server.deployment import ServerConfig, StatePaths

    paths = StatePaths(Path(state_dir).expanduser().resolve())
    url = ServerConfig.load(paths.config).store_url
    if not url:
        return f"--run-dir {paths.runs}"
    return f"--store-url '{make_url(url).render_as_string(hide_password=True)}' --run-dir {paths.runs}"


@device_app.command("init")
def device_init(
    data_dir: Path = typer.Option(..., help="the device's data directory"),
    name: Optional[str] = typer.Option(None, help="device name (default: the folder's name)"),
    role: Optional[str] = typer.Option(None, help="train (trains and evaluates) or heldout (evaluates only); "
                                       "default: the device's current role, train for a new device"),
) -> None:
    """Make the device's key pair, local config and label queue; show the public key to enrol."""
    _setup_logging(False)
    from client.deployment import init_device

    try:
        info = init_device(data_dir, name, role)
    except ValueError as err:
        _fail(str(err))
    out.print(f"[green]device {info['name']}[/] ({'new key pair' if info['created'] == 'yes' else 'existing key'}) "
              f"in {data_dir}")
    out.print(f"public key ({info['fingerprint']}), send {info['public-key-file']} to the operator:")
    out.print(info["public-key"], markup=False, highlight=False, soft_wrap=True)
    if info["manifest"] == "missing":
        console.print(f"[yellow]no {Path(data_dir) / 'manifest.csv'} yet:[/] list the device's clips there "
                      "(`fedaffect data prepare ... --out DIR/manifest.csv`)")


@device_app.command("start")
def device_start(
    data_dir: Path = typer.Option(..., help="the device's data directory"),
    superlink: str = typer.Option(..., help="the coordinator's address, host:port"),
    ca: Path = typer.Option(..., help="the federation's CA certificate (the coordinator's certs/ca.crt)"),
    port: Optional[int] = typer.Option(None, help="local port of the SuperNode's ClientApp API (default: free)"),
    max_wait: Optional[float] = typer.Option(None, help="give up after this many seconds without the SuperLink"),
    poll: float = typer.Option(DEFAULT_POLL_S, min=0.05, help="seconds between an idle device's polls of the SuperLink "
                               "(Flower's default is 3: fewer requests, slower rounds)"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for training (default: one per core); "
                                          "1 when several devices share a machine"),
    plain_flower: bool = typer.Option(False, "--plain-flower", help="run Flower's own flower-supernode: a fresh "
                                      "ClientApp process that imports torch for every message, 3 s polls"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="echo the SuperNode's log"),
) -> None:
    """Run the device's SuperNode in the foreground; Ctrl-C or SIGTERM stops it.

    By default each ClientApp message is forked from a process that imported torch once
    (client/supernode.py), which saves seconds per message.
    """
    _setup_logging(True)
    from client.deployment import DeviceRefused, start_device

    console.print(f"device {data_dir}: connecting to {superlink} (TLS, CA {ca}); audio stays here")
    try:
        code = start_device(data_dir, superlink, ca, port=port, max_wait_s=max_wait,
                            poll_s=None if plain_flower else poll, threads=threads,
                            echo=(lambda line: console.print(line, markup=False, highlight=False)) if verbose else None)
    except DeviceRefused as err:
        _fail(str(err), code=3)
    except RuntimeError as err:  # another device start on this data directory
        _fail(str(err), code=1)
    except Exception as err:  # noqa: BLE001
        _state_error(err)
    if code != 0 and max_wait is not None:
        console.print(f"[red]gave up[/]: no SuperLink at {superlink} within --max-wait {max_wait:g}s "
                      f"(or the SuperNode stopped: see {Path(data_dir) / 'logs' / 'supernode.log'})")
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
