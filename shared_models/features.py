"""Feature front-ends, the on-disk feature cache, per-device standardisation and batching.

A front-end turns a mono 16 kHz waveform (read by :func:`shared_models.audio.load_audio`) into
what a model eats:

- ``egemaps``: the 88 eGeMAPSv02 functionals of openSMILE (Eyben et al., "The Geneva Minimalistic
  Acoustic Parameter Set (GeMAPS) for Voice Research and Affective Computing", IEEE Trans.
  Affective Computing 7(2), 2016), one vector per clip;
- ``logmel``: a log-Mel spectrogram (torchaudio), one 64-dimensional frame every 10 ms;
- ``wave``: the waveform itself, for end-to-end models (Tzirakis et al., ICASSP 2018).

Features are computed once per clip and cached as ``.npy`` files keyed by the clip (absolute
path, size, modification time) and by the front-end's name and settings, so changing a setting
never reads stale features. Standardisation is per device: each device fits a
:class:`Standardiser` on its own clips ("a device knows its own statistics").
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .audio import SAMPLE_RATE, ClipError, SkipCounter, load_audio

__all__ = [
    "FrontEnd",
    "EgemapsFrontEnd",
    "LogMelFrontEnd",
    "WaveFrontEnd",
    "FRONTENDS",
    "get_frontend",
    "FeatureCache",
    "extract_features",
    "Standardiser",
    "collate",
]

# Bump when a front-end's computation changes, so that cached features are recomputed.
# 2: rates whose ratio to 16 kHz torchaudio handles slowly (TESS's 24414 Hz) are resampled
# by soxr (shared_models.audio.resample); a cache cannot tell which clips those are.
_CACHE_VERSION = 2


def _crop_centre(wave: np.ndarray, max_samples: int) -> np.ndarray:
    """The centre ``max_samples`` samples of ``wave`` (unchanged when shorter)."""
    if wave.shape[0] <= max_samples:
        return wave
    start = (wave.shape[0] - max_samples) // 2
    return wave[start : start + max_samples]


class FrontEnd:
    """Base class of feature front-ends.

    Attributes
    ----------
    name : str
        Registry name (``"egemaps"``, ``"logmel"``, ``"wave"``).
    sequence : bool
        True when the output has a variable-length time axis: ``(frames, dims)`` or
        ``(samples,)``; False for one fixed vector per clip.
    dims : int or None
        Size of the feature axis; None for a waveform (no feature axis).

    Calling a front-end on a waveform of shape (samples,), float32, 16 kHz returns a float32
    array. Subclasses implement :meth:`__call__` and :meth:`settings`.
    """

    name: str = ""
    sequence: bool = False
    dims: int | None = None

    def settings(self) -> dict:
        """Everything that changes the output, as a JSON-serialisable dict."""
        return {}

    @property
    def key(self) -> str:
        """Short stable identifier of name and settings, e.g. ``"logmel-3f2a9c01b7"``; used in
        cache paths."""
        blob = json.dumps({"v": _CACHE_VERSION, "name": self.name, **self.settings()}, sort_keys=True)
        return f"{self.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class EgemapsFrontEnd(FrontEnd):
    """eGeMAPSv02 functionals of openSMILE (Eyben et al. 2016): 25 low-level descriptors
    summarised into 88 functionals per clip.

    Returns
    -------
    np.ndarray, shape (88,), float32
        Non-finite values (openSMILE can give them on degenerate clips) are replaced by 0.
    """

    name, sequence, dims = "egemaps", False, 88

    def __init__(self) -> None:
        self._smile = None

    def settings(self) -> dict:
        return {"feature_set": "eGeMAPSv02", "feature_level": "Functionals"}

    def __getstate__(self) -> dict:  # the openSMILE handle is rebuilt after pickling
        return {**self.__dict__, "_smile": None}

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        if self._smile is None:
            import opensmile

            self._smile = opensmile.Smile(
                feature_set=opensmile.FeatureSet.eGeMAPSv02,
                feature_level=opensmile.FeatureLevel.Functionals,
            )
        out = self._smile.process_signal(np.asarray(wave, dtype=np.float32), SAMPLE_RATE)
        return np.nan_to_num(out.to_numpy(dtype=np.float32)[0], nan=0.0, posinf=0.0, neginf=0.0)


class LogMelFrontEnd(FrontEnd):
    """Log-Mel spectrogram (torchaudio ``MelSpectrogram``, power 2), ``log(mel + 1e-6)``.

    Parameters
    ----------
    n_mels : int
        Number of Mel bands (feature dimension).
    win_ms, hop_ms : float
        Window and hop length in milliseconds (25 ms / 10 ms: 400 / 160 samples at 16 kHz).
    n_fft : int
        FFT size in samples.
    max_seconds : float
        Longer clips are cropped to their centre ``max_seconds`` seconds before analysis.

    Returns
    -------
    np.ndarray, shape (frames, n_mels), float32
        ``frames = 1 + samples // hop`` (centred frames).
    """

    name, sequence = "logmel", True

    def __init__(self, n_mels: int = 64, win_ms: float = 25.0, hop_ms: float = 10.0,
                 n_fft: int = 512, max_seconds: float = 6.0) -> None:
        self.n_mels, self.win_ms, self.hop_ms, self.n_fft, self.max_seconds = (
            int(n_mels), float(win_ms), float(hop_ms), int(n_fft), float(max_seconds))
        self.dims = self.n_mels
        self._mel = None

    def settings(self) -> dict:
        return {"n_mels": self.n_mels, "win_ms": self.win_ms, "hop_ms": self.hop_ms,
                "n_fft": self.n_fft, "max_seconds": self.max_seconds}

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        if self._mel is None:
            import torchaudio

            self._mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=SAMPLE_RATE, n_fft=self.n_fft, n_mels=self.n_mels,
                win_length=round(self.win_ms * SAMPLE_RATE / 1000),
                hop_length=round(self.hop_ms * SAMPLE_RATE / 1000), power=2.0)
        wave = _crop_centre(np.asarray(wave, dtype=np.float32), round(self.max_seconds * SAMPLE_RATE))
        with torch.no_grad():
            mel = self._mel(torch.from_numpy(np.ascontiguousarray(wave)))
        return torch.log(mel + 1e-6).T.contiguous().numpy().astype(np.float32)


class WaveFrontEnd(FrontEnd):
    """The raw waveform for end-to-end models, centre-cropped to ``max_seconds`` seconds.

    Amplitude is left as recorded; per-device standardisation handles the scale.

    Returns
    -------
    np.ndarray, shape (samples,), float32, 16 kHz
    """

    name, sequence, dims = "wave", True, None

    def __init__(self, max_seconds: float = 4.0) -> None:
        self.max_seconds = float(max_seconds)

    def settings(self) -> dict:
        return {"max_seconds": self.max_seconds}

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        wave = _crop_centre(np.asarray(wave, dtype=np.float32), round(self.max_seconds * SAMPLE_RATE))
        return np.array(wave, dtype=np.float32, copy=True)


FRONTENDS: dict[str, type[FrontEnd]] = {
    cls.name: cls for cls in (EgemapsFrontEnd, LogMelFrontEnd, WaveFrontEnd)
}


def get_frontend(name: str, **kwargs) -> FrontEnd:
    """Build the front-end registered as ``name`` with keyword settings.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known names.
    """
    try:
        cls = FRONTENDS[name]
    except KeyError:
        raise ValueError(f"unknown front-end {name!r}; known: {', '.join(FRONTENDS)}") from None
    return cls(**kwargs)


class FeatureCache:
    """Features on disk, one ``.npy`` per clip and front-end.

    Files live at ``root / frontend.key / <sha1>.npy``, where the sha1 covers the clip's absolute
    path, size in bytes, modification time (ns) and ``frontend.key``: an edited clip or a changed
    setting gets a new file. Writes are atomic (temporary file + ``os.replace``), so parallel
    simulated devices can share one cache.

    Parameters
    ----------
    root : str or Path
        Cache directory (created on first write). A cache that cannot be written (full,
        read-only, a file in the way) warns once and the features are returned uncached.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._write_failed = False

    def path_for(self, clip_path: str | os.PathLike, frontend: FrontEnd) -> Path:
        """Cache file of ``clip_path`` under ``frontend``. Raises OSError if the clip is missing."""
        path = os.path.abspath(clip_path)
        st = os.stat(path)
        blob = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{frontend.key}"
        return self.root / frontend.key / f"{hashlib.sha1(blob.encode()).hexdigest()}.npy"

    def load_or_compute(self, clip_path: str | os.PathLike, frontend: FrontEnd) -> np.ndarray:
        """Cached features of one clip, computing and storing them on a miss.

        Raises
        ------
        ClipError
            The clip is unreadable, empty, silent or too short (from ``load_audio``); nothing is
            cached then.
        """
        try:
            target = self.path_for(clip_path, frontend)
        except OSError:  # missing clip: let load_audio raise the ClipError
            return frontend(load_audio(clip_path))
        if target.exists():
            try:
                return np.load(target)
            except (OSError, ValueError, EOFError):
                pass  # damaged cache file: recompute
        features = frontend(load_audio(clip_path))
        tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.save(fh, features)
            os.replace(tmp, target)
        except OSError as err:  # a full or read-only cache costs time, never the clip
            if not self._write_failed:
                warnings.warn(f"feature cache {self.root} cannot be written ({err}); features are not cached",
                              RuntimeWarning, stacklevel=2)
                self._write_failed = True
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
        return features


def extract_features(
    paths: Sequence[str | os.PathLike],
    frontend: FrontEnd,
    cache_dir: str | os.PathLike | None,
    *,
    progress: bool = True,
    description: str = "features",
    workers: int | None = None,
) -> tuple[list[np.ndarray | None], SkipCounter]:
    """Features of many clips, through the cache (no cache when ``cache_dir`` is None).

    Bad clips (missing, unreadable, empty, silent, too short) are skipped and counted by reason, and one
    warning summarising them is emitted at the end. A transient Rich progress bar is shown on
    stderr when ``progress`` is true and stderr is a terminal.

    With a cache and more than ``PARALLEL_MIN_CLIPS`` clips not cached yet, the missing ones
    are computed by ``workers`` processes (default: all cores) that fill the cache first.

    Returns
    -------
    features : list of (np.ndarray or None)
        One entry per path, in order; None where the clip was skipped.
    skipped : SkipCounter
        The skipped clips and their reasons.
    """
    from rich.console import Console
    from rich.progress import Progress

    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    skipped = SkipCounter()
    out: list[np.ndarray | None] = []
    console = Console(stderr=True)
    with Progress(console=console, transient=True,
                  disable=not (progress and console.is_terminal)) as bar:
        if cache is not None:
            _fill_cache_in_parallel(cache, paths, frontend, workers, bar, description)
        for path in bar.track(paths, description=description):
            try:
                out.append(cache.load_or_compute(path, frontend) if cache is not None
                           else frontend(load_audio(path)))
            except (ClipError, OSError) as err:  # OSError: the file vanished or cannot be opened
                # a file that is not there was moved or deleted, not damaged: say so apart
                reason = "missing" if not os.path.exists(path) else getattr(err, "reason", "unreadable")
                skipped.add(path, reason)
                out.append(None)
    skipped.warn(f"clips ({description})", of=len(paths))
    return out, skipped


#: Fewest uncached clips for which extraction is spread over processes.
PARALLEL_MIN_CLIPS = 64


def _cache_one(root: str, path: str, frontend: FrontEnd) -> None:
    try:
        FeatureCache(root).load_or_compute(path, frontend)
    except (ClipError, OSError):
        pass  # counted by the caller when it reads the cache


def _fill_cache_in_parallel(cache: "FeatureCache", paths, frontend: FrontEnd, workers: int | None,
                            bar, description: str) -> None:
    """Compute uncached clips in worker processes ('spawn': safe with torch's threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from itertools import repeat

    def cached(p) -> bool:
        try:
            return cache.path_for(p, frontend).exists()
        except OSError:
            return True  # missing file: nothing to compute, reported later
    missing = [str(p) for p in paths if not cached(p)]
    n = min(workers or os.cpu_count() or 1, len(missing))
    if n < 2 or len(missing) < PARALLEL_MIN_CLIPS:
        return
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = pool.map(_cache_one, repeat(str(cache.root)), missing, repeat(frontend), chunksize=8)
        for _ in bar.track(jobs, total=len(missing), description=f"{description} ({n} processes)"):
            pass


class Standardiser:
    """Per-device feature standardisation: ``(x - mean) / std``.

    Statistics are per feature dimension over all frames of all clips (the last axis of
    ``(dims,)`` vectors or ``(frames, dims)`` sequences), or one global scalar mean and std when
    ``scalar`` is true (waveforms). The std is floored at ``1e-5``.

    Parameters
    ----------
    scalar : bool
        Use one scalar mean/std over all values (for waveforms of shape (samples,)).
    """

    def __init__(self, scalar: bool = False) -> None:
        self.scalar = bool(scalar)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @classmethod
    def for_frontend(cls, frontend: FrontEnd) -> "Standardiser":
        """A scalar standardiser for front-ends without a feature axis (``wave``), else per
        dimension."""
        return cls(scalar=frontend.dims is None)

    def fit(self, features: Sequence[np.ndarray]) -> "Standardiser":
        """Fit on a list of per-clip arrays; returns self. Raises ValueError when empty."""
        if len(features) == 0:
            raise ValueError("cannot fit a Standardiser on no features")
        count, total, squares = 0, 0.0, 0.0
        for f in features:
            f = np.asarray(f, dtype=np.float64)
            f = f.reshape(-1) if self.scalar else f.reshape(-1, f.shape[-1])
            count += f.shape[0]
            total = total + f.sum(axis=0)
            squares = squares + (f * f).sum(axis=0)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.maximum(std, 1e-5).astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise one clip's features (same shape, float32). Raises RuntimeError if unfitted."""
        if self.mean is None:
            raise RuntimeError("Standardiser is not fitted")
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def state_dict(self) -> dict:
        """``{"scalar": bool, "mean": array or None, "std": array or None}``."""
        return {"scalar": self.scalar, "mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scalar = bool(state["scalar"])
        self.mean = None if state["mean"] is None else np.asarray(state["mean"], dtype=np.float32)
        self.std = None if state["std"] is None else np.asarray(state["std"], dtype=np.float32)


def collate(features: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-clip features into a zero-padded batch.

    Parameters
    ----------
    features : list of np.ndarray
        Either 1-D arrays (fixed vectors (D,) or waveforms (samples,)) or 2-D sequences
        (frames, D) with a common D.

    Returns
    -------
    x : torch.Tensor, float32
        (B, D) / (B, T) for 1-D inputs, (B, T, D) for sequences; zero-padded at the end to the
        longest item.
    lengths : torch.Tensor, shape (B,), int64
        Valid frames / samples (for fixed vectors: D) of each item.
    """
    if len(features) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.int64)
    first = features[0]
    if all(f.shape == first.shape for f in features):  # nothing to pad: one copy, not one per clip
        return torch.from_numpy(np.stack(features).astype(np.float32, copy=False)), lengths
    x = torch.zeros((len(features), int(lengths.max()), *first.shape[1:]), dtype=torch.float32)
    for i, f in enumerate(features):
        x[i, : f.shape[0]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
    return x, lengths
