"""Transfer learning: pre-train a model centrally on a source corpus, start a federation from it.

``fedaffect pretrain --manifest M --model NAME --out CKPT`` trains the model on every labelled
clip of a source corpus (for example ``synth`` or ``hedgewars``), each speaker's features
standardised with that speaker's own statistics, exactly as a device standardises its own
clips, and saves a checkpoint ``{"kind", "model", "emotions", "task", "state_dict", ...}``.
``fedaffect simulate --init CKPT`` (config key ``init``) starts the federation from it: the
coordinator builds the initial global model with :func:`load_initial`. A checkpoint of a
federated run (``runs/<run>/checkpoints/round-NNNN.pt``) works as well.

Compatibility: the model name must be the run's (else a clear error). When the emotion
classes differ, every layer but the categorical head is loaded and the head rows of the
classes both sets share are copied; the message says so. With ``freeze-rounds`` > 0 the
devices train only the heads for the first rounds (:func:`client.cooperative.freeze_frontend`),
so the transferred front-end is not disturbed while the new heads settle.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from shared_models.features import Standardiser, extract_features
from shared_models.manifest import read_manifest
from shared_models.metrics import ccc_from_sums, classification_metrics, confusion
from shared_models.models import MODELS, build_model, frontend_for
from shared_models.training import LocalData, evaluate_local, predict, train_local
from shared_models.training import compute_device as resolve_compute_device

__all__ = ["pretrain", "load_checkpoint", "load_initial", "check_initial"]

log = logging.getLogger("fedaffect.client.transfer")

KIND = "fedaffect-pretrained"


def pretrain(manifest: str | Path, model_name: str, out: str | Path, *, task: str = "emotion", epochs: int = 20,
             lr: float = 3e-3, batch_size: int = 32, seed: int = 0, emotions: Sequence[str] | None = None,
             cache_dir: str | Path = ".cache/fedaffect", progress: bool = False,
             compute_device: str = "cpu", on_epoch: Callable[[int, float], None] | None = None,
             validation_speakers: int = 0) -> dict[str, Any]:
    """Train ``model_name`` centrally on a source corpus and save a checkpoint.

    Parameters
    ----------
    manifest : path
        Manifest of the source corpus.
    model_name : str
        Registered model (:data:`shared_models.models.MODELS`).
    out : path
        Checkpoint file to write (parent folders are created).
    task : {"emotion", "av", "both"}
    epochs, lr, batch_size, seed
        Training settings (Adam, as on the devices).
    emotions : sequence of str, optional
        Classes of the categorical head in order; default every emotion in the manifest, sorted.
    cache_dir : path
        Feature cache.
    compute_device : str
        Where torch trains: ``cpu``, ``cuda`` or ``auto`` (:func:`shared_models.training.compute_device`); the
        checkpoint holds CPU tensors either way.
    on_epoch : callable, optional
        ``on_epoch(epoch, loss)`` after each training epoch (1-based), e.g. for a progress bar.
    validation_speakers : int
        Speakers (drawn with ``seed``) kept out of training to measure the model on voices it
        has not heard; 0 (default) trains on every speaker.

    Returns
    -------
    dict
        ``path``, ``clips`` (trained on), ``speakers`` (trained on), ``emotions``,
        ``train_loss``, ``train_uar`` (on the training clips themselves, a sanity check),
        ``seconds``; with validation speakers also ``validation_speakers`` (their names),
        ``val_uar``, ``val_ccc_arousal``, ``val_ccc_valence`` (NaN for a head the task does
        not train).

    Raises
    ------
    ValueError
        For an unknown model, a corpus without the labels the task needs, an emotion class
        without a clip in the manifest, ``cuda`` on a machine where torch sees no GPU, or
        ``validation_speakers`` not below the number of speakers.
    FileNotFoundError, ManifestError
        For a missing or invalid manifest.
    """
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(MODELS)}")
    torch_device = resolve_compute_device(compute_device)  # before any work: a bad name fails at once
    t0 = time.perf_counter()
    table = read_manifest(manifest)
    present = sorted(e for e in table["emotion"].unique() if e)
    emotions = list(emotions or present)
    absent = [e for e in emotions if e not in present]
    if absent:  # a typo (happy for happiness) would train a class without a single clip
        raise ValueError(f"emotion class(es) {', '.join(absent)} have no clip in {manifest}; it has {', '.join(present)}")
    if task in ("emotion", "both") and len(emotions) < 2:
        raise ValueError(f"task {task!r} needs at least 2 emotion classes; {manifest} has {emotions}")
    if task in ("av", "both") and table["arousal"].isna().all():
        raise ValueError(f"task {task!r} needs arousal/valence labels; {manifest} has none")
    frontend = frontend_for(model_name)
    feats, _ = extract_features(table["path"].tolist(), frontend, cache_dir, progress=progress,
                                description=f"{model_name} features")
    keep = np.array([f is not None for f in feats], dtype=bool)
    table = table[keep].reset_index(drop=True)
    feats = [f for f in feats if f is not None]
    x: list = [None] * len(feats)
    for speaker, rows in table.groupby("speaker").indices.items():  # per speaker, as a device would
        scaler = Standardiser.for_frontend(frontend).fit([feats[i] for i in rows])
        for i in rows:
            x[i] = scaler.transform(feats[i])
    index = {e: i for i, e in enumerate(emotions)}
    data = LocalData(x, np.array([index.get(e, -1) for e in table["emotion"]], dtype=np.int64),
                     table[["arousal", "valence"]].to_numpy(dtype=np.float32))
    speakers = sorted(table["speaker"].astype(str).unique())
    if not 0 <= validation_speakers < len(speakers):
        raise ValueError(f"validation_speakers must be in [0, {len(speakers) - 1}] for {len(speakers)} speakers, "
                         f"got {validation_speakers}")
    held = sorted(np.random.default_rng(seed).choice(speakers, validation_speakers, replace=False).tolist())
    is_held = table["speaker"].astype(str).isin(held).to_numpy()
    data, validation = data.subset(~is_held), data.subset(is_held)
    torch.manual_seed(seed)
    model = build_model(model_name, max(len(emotions), 1)).to(torch_device)
    result = train_local(model, data, task=task, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                         on_epoch=on_epoch)
    probs, _ = predict(model, data)
    known = data.emotion >= 0
    cm = confusion(data.emotion[known], probs[known].argmax(axis=1), len(emotions))
    scores: dict[str, Any] = {}
    if held:
        stats = evaluate_local(model, validation, task=task, n_classes=max(len(emotions), 1))
        scores = {"validation_speakers": held,
                  "val_uar": classification_metrics(stats["cm"])["uar"]
                  if task != "av" and stats["cm"].sum() else float("nan"),
                  **{f"val_ccc_{d}": ccc_from_sums(stats[f"sums_{d}"]) if task != "emotion" else float("nan")
                     for d in ("arousal", "valence")}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": KIND, "model": model_name, "emotions": emotions, "task": task,
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "source": str(manifest), "epochs": epochs, "seed": seed}, out)
    return {"path": str(out), "clips": len(data), "speakers": len(speakers) - len(held), "emotions": emotions,
            "train_loss": result["train_loss"], "train_uar": classification_metrics(cm)["uar"] if known.any() else float("nan"),
            **scores, "seconds": time.perf_counter() - t0}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of :func:`pretrain` (or of a federated run).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If it is not a fedaffect checkpoint (no ``model``, ``emotions`` and ``state_dict``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (a run's are in RUN_DIR/RUN/checkpoints; "
                                "`fedaffect pretrain` makes one)")
    try:
        # tensors and plain Python values only: unpickling arbitrary objects could run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is a bad file
        # not torch's own text: it suggests loading the file with weights_only=False
        raise ValueError(f"{path}: not a readable checkpoint (not a torch file of tensors and plain "
                         f"values: {type(err).__name__})") from err
    if not isinstance(ckpt, dict) or not {"model", "emotions", "state_dict"} <= set(ckpt):
        raise ValueError(f"{path}: not a fedaffect checkpoint (needs model, emotions and state_dict)")
    return ckpt


def load_initial(model: nn.Module, path: str | Path, model_name: str, emotions: Sequence[str], *,
                 task: str | None = None, warn: bool = True) -> str:
    """Load a checkpoint into ``model`` (the run's freshly built model); return what was done.

    Every layer is loaded when model and emotion classes match. When the classes differ,
    every layer but the categorical head is loaded, and the head rows of the shared classes
    are copied (the other rows keep their fresh initialisation), and (``warn``) a warning
    says so; a warning also says when the checkpoint comes from a FaiReg run (its
    arousal/valence head predicts normalised targets), and when the run's ``task`` (``av`` or
    ``both``) needs an arousal/valence head that the checkpoint never trained (pre-trained
    with task ``emotion``). The coordinator calls it once per run, in simulation and in
    deployment alike.

    Raises
    ------
    ValueError
        If the checkpoint's model is not ``model_name``, or a non-head layer's shape differs.
    FileNotFoundError
        If the file is missing.
    """
    ckpt = load_checkpoint(path)
    if ckpt["model"] != model_name:
        raise ValueError(f"init checkpoint {path} holds model {ckpt['model']!r}, but the run trains "
                         f"{model_name!r}: pretrain with --model {model_name}, or run with --model {ckpt['model']}")
    source, target = list(ckpt["emotions"]), list(emotions)
    state = model.state_dict()
    loaded = {}
    for key, value in ckpt["state_dict"].items():
        if key not in state:
            raise ValueError(f"init checkpoint {path}: layer {key} is not in model {model_name}")
        if key.startswith("emotion.") and source != target:
            continue
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"init checkpoint {path}: layer {key} has shape {tuple(value.shape)}, "
                             f"the run's model {tuple(state[key].shape)}")
        loaded[key] = value
    notes = ""
    if ckpt.get("faireg"):
        notes += (" The checkpoint comes from a FaiReg run: its arousal/valence head predicts per-group "
                  "normalised targets, which a run without FaiReg (or with other groups) must unlearn.")
    if ckpt.get("task") == "emotion" and task in ("av", "both"):
        notes += (f" It was pre-trained with task 'emotion': its arousal/valence head starts untrained "
                  f"(this run's task is {task!r}).")
    if source == target:
        model.load_state_dict({**state, **loaded})
        message = f"initial model from {path}: every layer loaded ({model_name}, emotions {', '.join(target)})."
        if notes and warn:
            log.warning(message + notes)
        return message + notes
    shared = [e for e in target if e in source]
    for key in ("emotion.weight", "emotion.bias"):
        if key in ckpt["state_dict"]:
            head = state[key].clone()
            for e in shared:
                head[target.index(e)] = ckpt["state_dict"][key][source.index(e)]
            loaded[key] = head
    model.load_state_dict({**state, **loaded})
    message = (f"initial model from {path}: emotion classes differ (checkpoint {', '.join(source)}; run "
               f"{', '.join(target)}): loaded every layer but the emotion head, and its rows for the "
               f"{len(shared)} shared classes ({', '.join(shared) or 'none'}).{notes}")
    if warn:
        log.warning(message)
    return message


def check_initial(path: str | Path, model_name: str, emotions: Sequence[str], *, task: str | None = None) -> str:
    """Check up front that ``path`` can initialise ``model_name``; the message of :func:`load_initial`
    (no warning logged: the coordinator logs it when it loads the checkpoint)."""
    return load_initial(build_model(model_name, max(len(emotions), 1)), path, model_name, emotions, task=task,
                        warn=False)
