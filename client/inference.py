"""On-device inference: what a trained affect model hears in a device's clips.

``fedaffect predict CKPT CLIP... [--data-dir DIR | --reference MANIFEST]`` loads a checkpoint
(of a federated run, ``runs/<run>/checkpoints/round-NNNN.pt``, or of ``fedaffect pretrain``),
computes each clip's features with the model's front-end, standardises them the way a device
does in training, with *the device's own* statistics (:class:`shared_models.features.Standardiser`
fitted on the clips of its manifest), and reports per clip the emotion probabilities, the top
classes, and arousal and valence in [-1, 1]. Nothing leaves the device.

Scale: arousal and valence are always reported on the label scale. A run trained with FaiReg
(``faireg = "on"``) trains on normalised targets; its checkpoints keep the run's FaiReg
parameters (``faireg``) and the predictions are mapped back with them as the devices do in
evaluation (:meth:`shared_models.fairness.FaiRegParams.denormalise`: the pooled statistics,
or the reference group's with ``faireg-reference``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from client.transfer import load_checkpoint
from shared_models.audio import ClipError, load_audio
from shared_models.fairness import FaiRegParams
from shared_models.features import Standardiser, extract_features
from shared_models.manifest import read_manifest
from shared_models.models import build_model, for_inference, frontend_for
from shared_models.training import LocalData, adapt_batch_norm, predict

__all__ = ["MIN_REFERENCE_CLIPS", "Prediction", "predict_clips", "reference_clips"]

#: Fewest clips whose statistics can standardise features (per-feature mean and std).
MIN_REFERENCE_CLIPS = 5


@dataclass
class Prediction:
    """What the model says about one clip (or why it could not).

    Attributes
    ----------
    path : str
    emotion : str or None
        The most probable class; None for a skipped clip.
    probabilities : dict of str -> float
        Softmax probability per emotion class (sums to 1).
    arousal, valence : float
        In [-1, 1] (NaN for a skipped clip).
    skipped : str or None
        Why the clip was skipped (``missing``, ``unreadable``, ``empty``, ``too-short``, ``silent``).
    """

    path: str
    emotion: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    arousal: float = float("nan")
    valence: float = float("nan")
    skipped: str | None = None

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable classes with their probabilities, most probable first."""
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "emotion": self.emotion, "probabilities": self.probabilities,
                "arousal": None if np.isnan(self.arousal) else self.arousal,
                "valence": None if np.isnan(self.valence) else self.valence, "skipped": self.skipped}


def reference_clips(data_dir: str | Path | None = None, manifest: str | Path | None = None) -> list[str]:
    """The clips whose statistics standardise a device's features: every row of
    ``DATA_DIR/manifest.csv`` or of ``manifest`` (labelled or not).

    Raises
    ------
    ValueError
        If both or neither source is given.
    FileNotFoundError, shared_models.manifest.ManifestError
        For a missing or invalid manifest.
    """
    if (data_dir is None) == (manifest is None):
        raise ValueError("give the device's data directory or a reference manifest, not both")
    path = Path(data_dir).expanduser() / "manifest.csv" if data_dir is not None else Path(manifest).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return read_manifest(path)["path"].astype(str).tolist()


def predict_clips(checkpoint: str | Path, clips: Sequence[str | Path], *, reference: Sequence[str | Path] | None = None,
                  cache_dir: str | Path | None = ".cache/fedaffect", progress: bool = False) -> list[Prediction]:
    """Emotion probabilities and arousal/valence of ``clips`` under a checkpoint's model.

    Parameters
    ----------
    checkpoint : path
        A fedaffect checkpoint (``model``, ``emotions``, ``state_dict``).
    clips : sequence of path
        Audio files in any format soundfile reads; resampled to 16 kHz mono.
    reference : sequence of path, optional
        The device's clips whose features give the standardisation statistics
        (:func:`reference_clips`) and, unless the checkpoint's run had ``bn-adapt = 0``, the
        model's batch-norm statistics (AdaBN, :func:`shared_models.training.adapt_batch_norm`,
        as the run's devices evaluated the model). Default: ``clips`` themselves, which needs at least
        :data:`MIN_REFERENCE_CLIPS` readable ones.
    cache_dir : path or None
        Feature cache (None: no cache).

    Returns
    -------
    list of Prediction
        One per clip, in order; unreadable, empty, too short or silent clips come back with
        ``skipped`` set, never an exception. Only the heads the checkpoint's task trained
        answer: arousal/valence are NaN for an ``emotion`` checkpoint, the emotion None and
        the probabilities empty for an ``av`` one.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing or foreign checkpoint, or too few reference clips for statistics.
    """
    ckpt = load_checkpoint(checkpoint)
    emotions = list(ckpt["emotions"])
    model = build_model(ckpt["model"], max(len(emotions), 1))
    model.load_state_dict(ckpt["state_dict"])
    frontend = frontend_for(ckpt["model"])
    paths = [str(Path(c).expanduser()) for c in clips]
    feats, _ = extract_features(paths, frontend, cache_dir, progress=progress, description="clips")
    usable = [f for f in feats if f is not None]
    if reference is None:
        ref_feats, source = usable, "the clips given"
    else:
        ref_feats = [f for f in extract_features([str(r) for r in reference], frontend, cache_dir, progress=progress,
                                                 description="reference clips")[0] if f is not None]
        source = "the reference clips"
    if len(ref_feats) < MIN_REFERENCE_CLIPS:
        raise ValueError(f"features are standardised with the device's own statistics, and {source} give only "
                         f"{len(ref_feats)} readable clip(s) (at least {MIN_REFERENCE_CLIPS} needed): pass the "
                         "device's data directory (--data-dir) or a manifest of its clips (--reference)")
    scaler = Standardiser.for_frontend(frontend).fit(ref_feats)
    clips_data = _unlabelled([scaler.transform(f) for f in usable])
    if int(dict(ckpt.get("config") or {}).get("bn-adapt", 1)):  # as the run's devices evaluated it
        ref_data = clips_data if reference is None else _unlabelled([scaler.transform(f) for f in ref_feats])
        model = adapt_batch_norm(model, ref_data)
    model = for_inference(model)  # batch norms folded into the convolutions
    probs, av = predict(model, clips_data)
    if ckpt.get("faireg"):  # a FaiReg run: the model's arousal/valence are normalised targets
        av = FaiRegParams.from_json(str(ckpt["faireg"])).denormalise(av)
    # The heads the checkpoint's run trained (pretrain: "task"; a run: its config's): the
    # other head still holds its random initialisation and says nothing.
    task = str(ckpt.get("task") or dict(ckpt.get("config") or {}).get("task") or "both")
    out, row = [], 0
    for path, f in zip(paths, feats):
        if f is None:
            out.append(Prediction(path, skipped=_skip_reason(path)))
            continue
        p = {e: float(v) for e, v in zip(emotions, probs[row])} if task != "av" else {}
        a, v = (float(av[row, 0]), float(av[row, 1])) if task != "emotion" else (float("nan"), float("nan"))
        out.append(Prediction(path, max(p, key=p.get) if p else None, p, a, v))
        row += 1
    return out


def _unlabelled(x: list) -> LocalData:
    """Standardised features of clips without labels."""
    return LocalData(x=x, emotion=np.full(len(x), -1), av=np.full((len(x), 2), np.nan))


def _skip_reason(path: str) -> str:
    if not Path(path).exists():
        return "missing"
    try:
        load_audio(path)
    except ClipError as err:
        return err.reason
    except OSError:
        return "missing"
    return "skipped"
