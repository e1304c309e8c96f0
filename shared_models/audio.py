"""Audio input: read any clip soundfile can decode as 16 kHz mono float32, and reject bad clips.

Every clip that enters fedaffect goes through :func:`load_audio`. It reads WAV, FLAC, OGG/Vorbis
and the other formats libsndfile supports with `soundfile`_, averages the channels to mono and
resamples with :func:`resample` (torchaudio's own ``load`` needs torchcodec/FFmpeg, which a
device may lack). A clip that cannot be used raises :class:`ClipError` with a
machine-readable ``reason``; corpus readers count those in a :class:`SkipCounter`, report
them in one warning instead of failing the whole run and can list every one in a CSV
(:meth:`SkipCounter.write_csv`).

.. _soundfile: https://python-soundfile.readthedocs.io
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter
from os import PathLike
from pathlib import Path

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
    "resample",
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
    detail : str
        What exactly is wrong (the decoder's message, the measured RMS or length), or ``""``.
    """

    def __init__(self, path: str | PathLike, reason: str, detail: str = "") -> None:
        if reason not in CLIP_ERROR_REASONS:
            raise ValueError(f"unknown ClipError reason {reason!r}; expected one of {CLIP_ERROR_REASONS}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail
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
        Target rate in Hz; the clip is resampled with :func:`resample`. ``None`` keeps the
        file's own rate (used when only checking).
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
        wav = resample(wav, int(native_rate), int(sample_rate))
    return np.ascontiguousarray(wav, dtype=np.float32)


TORCHAUDIO_MAX_RATIO_TERM = 1000
"""Largest term of the reduced rate ratio (``max(orig, new) / gcd(orig, new)``) that
:func:`resample` leaves to torchaudio; above it, soxr (through audresample) resamples."""


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono waveform from ``orig_rate`` to ``new_rate``.

    Two band-limited resamplers, chosen by the reduced rate ratio ``up / down =
    new_rate / orig_rate`` (divided by their greatest common divisor):

    * ``max(up, down) <= TORCHAUDIO_MAX_RATIO_TERM`` (1000; every common rate: 8, 11.025,
      22.05, 24, 32, 44.1, 48, 96 kHz to 16 kHz): :func:`torchaudio.functional.resample`
      (windowed-sinc polyphase filter, its defaults), as fedaffect always did, so features of
      clips at these rates do not change.
    * larger terms (rates such as TESS's 24414 Hz: 16000/24414 = 8000/12207): torchaudio builds
      one filter phase per output phase of the period (8000 phases of ~12 k taps each), about
      3 s for a 2.5 s clip, ~2 h for TESS's 2800 clips. These go to ``audresample.resample``
      (audEERING's wrapper of the SoX resampler, libsoxr, "high" quality; installed with
      opensmile), an arbitrary-ratio resampler. Measured on one CPU thread, 2.5 s sines at
      24414 Hz to 16 kHz: audresample 1 ms, frequency kept, amplitude within 0.1 % at 0.44, 3
      and 7 kHz, residual 110-130 dB down, a 10 kHz tone (above the new Nyquist) removed to
      -136 dB; :func:`scipy.signal.resample_poly` 29 ms (a ~240 k-tap filter), 3 % amplitude
      loss at 7 kHz, residual ~80 dB down; torchaudio 3 s, 19 % loss at 7 kHz, ~70 dB.

    Parameters
    ----------
    wav : numpy.ndarray
        float32 (or castable) samples, shape ``(samples,)``.
    orig_rate, new_rate : int
        Sample rates in Hz, > 0.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(round(samples * new_rate / orig_rate),)`` (torchaudio rounds up,
        soxr to the nearest: the two can differ by one sample); ``wav`` itself if the rates
        are equal.

    Raises
    ------
    ValueError
        A rate is not a positive integer, or ``wav`` is not one-dimensional.
    """
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be > 0 Hz, got {orig_rate} -> {new_rate}")
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"resample takes a mono waveform of shape (samples,), got shape {wav.shape}")
    if orig_rate == new_rate:
        return wav
    g = math.gcd(orig_rate, new_rate)
    if max(orig_rate, new_rate) // g <= TORCHAUDIO_MAX_RATIO_TERM:
        import torch
        import torchaudio.functional as AF

        return AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), orig_rate, new_rate).numpy()
    import audresample

    return audresample.resample(np.ascontiguousarray(wav), orig_rate, new_rate)[0]


class SkipCounter:
    """Counts clips skipped during a scan, by reason, and reports them in one warning.

    Reasons are free strings: :class:`ClipError` reasons plus reader-specific ones such as
    ``"bad-name"`` (a file that does not follow the corpus's naming convention) or
    ``"missing"`` (a listed file that does not exist). Every skipped clip is kept
    (:attr:`items`), so that all of them can be listed with :meth:`write_csv`.

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
        self.items: list[tuple[str, str, str]] = []  # (path, reason, detail), in the order added

    def add(self, path: str | PathLike, reason: str, detail: str = "") -> None:
        """Record that ``path`` was skipped for ``reason`` (``detail``: what exactly, or ``""``)."""
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(path))
        self.items.append((str(path), reason, detail))

    def update(self, other: "SkipCounter") -> None:
        """Merge the counts, examples and items of another counter into this one."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: self.max_examples - len(shown)])
        self.items.extend(other.items)

    @property
    def total(self) -> int:
        """Number of skipped clips over all reasons."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}``, most frequent first."""
        return dict(self.counts.most_common())

    def summary(self) -> str:
        """Counts per reason, most frequent first, e.g. ``"2 silent, 1 unreadable"``."""
        return ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())

    def message(self, what: str = "clips", of: int | None = None, listed_in: str | PathLike | None = None) -> str:
        """The text :meth:`warn` emits, e.g. ``"skipped 3 of 120 clips (2 silent, 1 unreadable), e.g. a.wav"``.

        With ``listed_in`` (the file :meth:`write_csv` wrote), ``"; all listed in FILE"`` follows.
        """
        first = next(iter(p for r, _ in self.counts.most_common() for p in self.examples[r]), "")
        total = f"{self.total} of {of}" if of is not None else f"{self.total}"
        listed = f"; all listed in {listed_in}" if listed_in is not None else ""
        return f"skipped {total} {what} ({self.summary()}), e.g. {first}{listed}"

    def warn(self, what: str = "clips", of: int | None = None, listed_in: str | PathLike | None = None) -> str | None:
        """Emit one :class:`SkippedClipsWarning` summarising the skips; nothing if none.

        Parameters
        ----------
        what : str
            What was scanned, e.g. ``"emodb clips"``.
        of : int, optional
            Number of clips scanned (the denominator in the message).
        listed_in : path, optional
            The CSV listing every skipped clip (:meth:`write_csv`), named in the message.

        Returns
        -------
        str or None
            The message, or ``None`` when nothing was skipped.
        """
        if not self.total:
            return None
        msg = self.message(what, of, listed_in)
        warnings.warn(msg, SkippedClipsWarning, stacklevel=2)
        return msg

    def write_csv(self, path: str | PathLike) -> Path:
        """Write every skipped clip as CSV with the columns ``path``, ``reason``, ``detail``.

        Parameters
        ----------
        path : str or PathLike
            The CSV file to write (UTF-8, replaced if it exists); parent folders are created.

        Returns
        -------
        pathlib.Path
            ``path``.

        Raises
        ------
        OSError
            The file cannot be written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(("path", "reason", "detail"))
            writer.writerows(self.items)
        return path

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
