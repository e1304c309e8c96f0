"""Audio input: read any clip soundfile can decode as 16 kHz mono float32, and reject bad clips.

Every clip that enters fedaffect goes through :func:`load_audio`. It reads WAV, FLAC, OGG/Vorbis
and the other formats libsndfile supports with `soundfile`_, averages the channels to mono and
resamples with :func:`torchaudio.functional.resample` (torchaudio's own ``load`` needs
torchcodec/FFmpeg, which a device may lack). A clip that cannot be used raises
:class:`ClipError` with a machine-readable ``reason``; corpus readers count those in a
:class:`SkipCounter` and report them in one warning instead of failing the whole run.

.. _soundfile: https://python-soundfile.readthedocs.io
"""

from __future__ import annotations

import warnings
from collections import Counter
from os import PathLike

import numpy as np
import soundfile as sf

__all__ = [
    "SAMPLE_RATE",
    "MIN_SECONDS",
    "CLIP_ERROR_REASONS",
    "ClipError",
    "SkippedClipsWarning",
    "SkipCounter",
    "load_audio",
    "probe_duration",
]

SAMPLE_RATE = 16_000
"""Sample rate (Hz) of every waveform fedaffect works with."""

MIN_SECONDS = 0.3
"""Shortest usable clip (seconds); shorter clips carry too little prosody to label."""

CLIP_ERROR_REASONS = ("unreadable", "empty", "silent", "too-short")


class ClipError(ValueError):
    """A clip cannot be used.

    Attributes
    ----------
    path : str
        The clip's path.
    reason : str
        One of ``"unreadable"`` (soundfile cannot decode it, or it holds non-finite samples),
        ``"empty"`` (zero samples), ``"silent"`` (RMS below the threshold) and ``"too-short"``.
    """

    def __init__(self, path: str | PathLike, reason: str, detail: str = "") -> None:
        if reason not in CLIP_ERROR_REASONS:
            raise ValueError(f"unknown ClipError reason {reason!r}; expected one of {CLIP_ERROR_REASONS}")
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))


class SkippedClipsWarning(UserWarning):
    """Some clips were skipped; emitted once per scan by :meth:`SkipCounter.warn`."""


def probe_duration(path: str | PathLike) -> float:
    """Duration of an audio file from its header, without decoding it.

    Parameters
    ----------
    path : str or PathLike
        Any file libsndfile can open (WAV, FLAC, OGG, ...).

    Returns
    -------
    float
        Duration in seconds (``frames / samplerate``).

    Raises
    ------
    ClipError
        ``reason="unreadable"`` if soundfile cannot open the file (missing, corrupt, unknown format).
    """
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError
        raise ClipError(path, "unreadable", str(err)) from err
    return info.frames / info.samplerate if info.samplerate else 0.0


def load_audio(
    path: str | PathLike,
    *,
    sample_rate: int | None = SAMPLE_RATE,
    min_seconds: float = MIN_SECONDS,
    silence_rms: float = 1e-4,
) -> np.ndarray:
    """Read a clip as a mono float32 waveform at ``sample_rate``.

    Parameters
    ----------
    path : str or PathLike
        Audio file in any format soundfile reads (WAV, FLAC, OGG/Vorbis, ...).
    sample_rate : int or None, default 16000
        Target rate in Hz; the clip is resampled with :func:`torchaudio.functional.resample`
        (windowed-sinc interpolation). ``None`` keeps the file's own rate (used when only checking).
    min_seconds : float, default 0.3
        Clips shorter than this (seconds) are refused.
    silence_rms : float, default 1e-4
        Clips whose RMS over the whole clip (full scale = 1.0) is below this are refused.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(samples,)``, channels averaged to mono, values in [-1, 1] for PCM input.

    Raises
    ------
    ClipError
        ``"unreadable"``, ``"empty"``, ``"too-short"`` or ``"silent"`` (checked in that order).
    """
    try:
        data, native_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise ClipError(path, "unreadable", str(err)) from err
    if data.size == 0:
        raise ClipError(path, "empty")
    wav = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(wav).all():
        raise ClipError(path, "unreadable", "non-finite samples")
    seconds = wav.shape[0] / native_rate
    if seconds < min_seconds:
        raise ClipError(path, "too-short", f"{seconds:.3f} s < {min_seconds} s")
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms < silence_rms:
        raise ClipError(path, "silent", f"RMS {rms:.2e} < {silence_rms:.0e}")
    if sample_rate is not None and native_rate != sample_rate:
        import torch
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(wav), int(native_rate), int(sample_rate)).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


class SkipCounter:
    """Counts clips skipped during a scan, by reason, and reports them in one warning.

    Reasons are free strings: :class:`ClipError` reasons plus reader-specific ones such as
    ``"bad-name"`` (a file that does not follow the corpus's naming convention).

    Examples
    --------
    >>> skipped = SkipCounter()
    >>> skipped.add("a.wav", "silent")
    >>> skipped.as_dict()
    {'silent': 1}
    """

    max_examples = 3

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, path: str | PathLike, reason: str) -> None:
        """Record that ``path`` was skipped for ``reason``."""
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(path))

    def update(self, other: "SkipCounter") -> None:
        """Merge the counts and examples of another counter into this one."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: self.max_examples - len(shown)])

    @property
    def total(self) -> int:
        """Number of skipped clips over all reasons."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}``, most frequent first."""
        return dict(self.counts.most_common())

    def message(self, what: str = "clips", of: int | None = None) -> str:
        """The text :meth:`warn` emits, e.g. ``"skipped 3 of 120 clips (2 silent, 1 unreadable), e.g. a.wav"``."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        first = next(iter(p for r, _ in self.counts.most_common() for p in self.examples[r]), "")
        total = f"{self.total} of {of}" if of is not None else f"{self.total}"
        return f"skipped {total} {what} ({reasons}), e.g. {first}"

    def warn(self, what: str = "clips", of: int | None = None) -> str | None:
        """Emit one :class:`SkippedClipsWarning` summarising the skips; nothing if none.

        Parameters
        ----------
        what : str
            What was scanned, e.g. ``"emodb clips"``.
        of : int, optional
            Number of clips scanned (the denominator in the message).

        Returns
        -------
        str or None
            The message, or ``None`` when nothing was skipped.
        """
        if not self.total:
            return None
        msg = self.message(what, of)
        warnings.warn(msg, SkippedClipsWarning, stacklevel=2)
        return msg

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
