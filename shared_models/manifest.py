"""The clip manifest: one CSV row per clip, the common currency of corpus readers and devices.

Columns, in order (:data:`MANIFEST_COLUMNS`):

============  ==========================================================================
path          audio file; relative paths in a CSV are relative to the CSV's own folder
speaker       speaker id, e.g. ``emodb-03`` (never empty: partitions are per speaker)
gender        ``female``, ``male`` or empty
emotion       one of :data:`EMOTIONS` or empty (unlabelled clip)
arousal       float in [-1, 1] or empty
valence       float in [-1, 1] or empty
duration      seconds, > 0, or empty
============  ==========================================================================

Only ``path`` and ``speaker`` (:data:`REQUIRED_COLUMNS`) must be present; a missing optional
column is read as empty in every row (a hand-made ``path,speaker,emotion`` file is a manifest;
the corpus readers probe the durations). A column whose name is close to a missing one
(``Emotion``, ``emotions``) is refused rather than kept as an extra column. Any further column
(e.g. ``age``, ``accent``) is kept as it is; it may be declared a protected attribute for
per-group statistics. A clip with neither an emotion nor arousal/valence is allowed: it
belongs to a device's unlabelled pool.

Errors raise :class:`ManifestError` naming the file and, for each bad value (up to
:data:`MAX_REPORTED_PROBLEMS`, then how many more), the line as a spreadsheet or editor shows
it (the header is line 1, the first clip line 2) and the column.
"""

from __future__ import annotations

import difflib
import os
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "MAX_REPORTED_PROBLEMS",
    "EMOTIONS",
    "GENDERS",
    "ManifestError",
    "validate_manifest",
    "read_manifest",
    "write_manifest",
    "label_mask",
]

MANIFEST_COLUMNS = ("path", "speaker", "gender", "emotion", "arousal", "valence", "duration")
REQUIRED_COLUMNS = ("path", "speaker")
"""Columns a manifest cannot do without: the clip, and its speaker (partitions are per speaker)."""
MAX_REPORTED_PROBLEMS = 10
"""Bad values listed in one :class:`ManifestError`; further ones are counted."""
EMOTIONS = ("anger", "boredom", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
GENDERS = ("female", "male", "")

_STR_COLUMNS = ("path", "speaker", "gender", "emotion")
_FLOAT_COLUMNS = ("arousal", "valence", "duration")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file, the line and the column."""


def _as_str(col: pd.Series) -> pd.Series:
    """Text values, stripped; missing ones (None, NaN, pandas' NA and NaT) as ``""``."""
    return col.map(lambda v: "" if pd.api.types.is_scalar(v) and pd.isna(v) else str(v).strip())


def validate_manifest(df: pd.DataFrame, source: str = "<manifest>") -> pd.DataFrame:
    """Check a manifest and return a normalised copy.

    Parameters
    ----------
    df : pandas.DataFrame
        One row per clip with at least the columns :data:`REQUIRED_COLUMNS` (``path``,
        ``speaker``); the other columns of :data:`MANIFEST_COLUMNS` that are missing are taken
        as empty in every row. Row ``i`` (0-based position) is reported as ``line i + 2``, as in
        the CSV file.
    source : str
        Name of the file the frame came from, used in error messages.

    Returns
    -------
    pandas.DataFrame
        A copy with a fresh 0..n-1 index and every column of :data:`MANIFEST_COLUMNS`;
        ``path``, ``speaker``, ``gender``, ``emotion`` as stripped ``str`` with ``""`` for
        missing (``gender`` and ``emotion`` lower-cased); ``arousal``, ``valence``, ``duration``
        (seconds) as float64 with NaN for missing; extra columns unchanged, after the manifest
        columns.

    Raises
    ------
    ManifestError
        ``path`` or ``speaker`` is not a column, or a column's name is close to that of a
        missing manifest column (``Emotion``, ``emotions``: a misspelt column would otherwise
        leave every clip unlabelled). Or, for any row: ``path`` or ``speaker`` is empty,
        ``gender`` is not one of :data:`GENDERS`, ``emotion`` not one of :data:`EMOTIONS`,
        arousal/valence is not a number in [-1, 1], or duration is not a number > 0. All bad
        values are listed, by line then column, each with its line and column, up to
        :data:`MAX_REPORTED_PROBLEMS`, then ``and N more``.
    """
    columns = [str(c) for c in df.columns]
    absent = [c for c in MANIFEST_COLUMNS if c not in columns]
    extra_names = [c for c in columns if c not in MANIFEST_COLUMNS]
    lookalikes = []
    for col in absent:
        near = [c for c in extra_names if c.strip().lower() == col]
        near = near or difflib.get_close_matches(col, extra_names, n=1, cutoff=0.85)
        if near:
            lookalikes.append(f"{near[0]!r} (did you mean {col!r}?)")
    if lookalikes:
        raise ManifestError(
            f"{source}: unknown column(s) {', '.join(lookalikes)}; manifest columns are spelt "
            f"{', '.join(MANIFEST_COLUMNS)} (lower case)"
        )
    missing = [c for c in REQUIRED_COLUMNS if c in absent]
    if missing:
        raise ManifestError(
            f"{source}: missing column(s) {', '.join(missing)}; a manifest needs the columns "
            f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(c for c in MANIFEST_COLUMNS if c not in REQUIRED_COLUMNS)})"
        )
    df = df.reset_index(drop=True)
    if absent:
        df = df.assign(**{c: "" for c in absent})
    out = df.copy()
    problems: list[tuple[int, int, str]] = []  # (row, column order, message)

    def flag(col: str, bad: pd.Series, expected: str, raw: pd.Series) -> None:
        for i in np.flatnonzero(bad.to_numpy()):
            problems.append(
                (int(i), MANIFEST_COLUMNS.index(col), f"line {i + 2}, column {col}: expected {expected}, got {raw.iloc[i]!r}")
            )

    for col in _STR_COLUMNS:
        out[col] = _as_str(out[col])
    out["gender"] = out["gender"].str.lower()
    out["emotion"] = out["emotion"].str.lower()
    for col in ("path", "speaker"):
        flag(col, out[col] == "", "a non-empty value", out[col])
    flag("gender", ~out["gender"].isin(GENDERS), "female, male or empty", out["gender"])
    flag("emotion", ~out["emotion"].isin(EMOTIONS + ("",)), f"one of {', '.join(EMOTIONS)} or empty", out["emotion"])

    for col in _FLOAT_COLUMNS:
        raw = df[col]
        text = _as_str(raw)
        values = pd.to_numeric(text.where(text != "", None), errors="coerce").astype("float64")
        unparsable = values.isna() & (text != "") & (text.str.lower() != "nan")
        if col == "duration":
            flag(col, unparsable | (values <= 0) | np.isinf(values), "a number of seconds > 0 or empty", raw)
        else:
            flag(col, unparsable | (values.abs() > 1), "a number in [-1, 1] or empty", raw)
        out[col] = values

    if problems:
        problems.sort()
        shown = [f"  {msg}" for _, _, msg in problems[:MAX_REPORTED_PROBLEMS]]
        if len(problems) > MAX_REPORTED_PROBLEMS:
            shown.append(f"  and {len(problems) - MAX_REPORTED_PROBLEMS} more")
        raise ManifestError(f"{source}: {len(problems)} bad value(s):\n" + "\n".join(shown))
    extra = [c for c in out.columns if c not in MANIFEST_COLUMNS]
    return out[list(MANIFEST_COLUMNS) + extra]


def read_manifest(path: str | PathLike) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path : str or PathLike
        The CSV file. Relative clip paths in it are resolved against its folder, so a corpus
        folder with its manifest can be moved as a whole.

    Returns
    -------
    pandas.DataFrame
        The normalised frame of :func:`validate_manifest`, with absolute clip paths.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ManifestError
        The file is empty, not CSV, or fails validation (:func:`validate_manifest`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest not found: {path} (make one with `fedaffect data prepare CORPUS --out {path}`)"
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable CSV manifest ({err})") from err
    if "path" in df.columns:
        root = path.resolve().parent

        def resolve(p: str) -> str:
            p = os.path.expanduser(p.strip())
            return p if not p or os.path.isabs(p) else os.path.normpath(root / p)

        df["path"] = df["path"].map(resolve)
    return validate_manifest(df, source=str(path))


def write_manifest(df: pd.DataFrame, path: str | PathLike) -> Path:
    """Validate a manifest and write it as CSV.

    Parameters
    ----------
    df : pandas.DataFrame
        Manifest frame (see :func:`validate_manifest`).
    path : str or PathLike
        Output CSV; parent folders are created. Clip paths are written as given.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ManifestError
        ``df`` fails validation (nothing is written).
    """
    path = Path(path)
    clean = validate_manifest(df, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    clean.to_csv(path, index=False, na_rep="", float_format="%.6g")
    return path


def label_mask(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Which clips carry which labels.

    Parameters
    ----------
    df : pandas.DataFrame
        A validated manifest (missing labels are ``""`` / NaN).

    Returns
    -------
    dict
        ``"emotion"``: bool array, shape ``(n_clips,)``, True where the emotion is known;
        ``"av"``: True where both arousal and valence are known.
    """
    emotion = df["emotion"].fillna("").astype(str).str.strip().ne("").to_numpy()
    av = (
        pd.to_numeric(df["arousal"].replace("", np.nan), errors="coerce").notna()
        & pd.to_numeric(df["valence"].replace("", np.nan), errors="coerce").notna()
    ).to_numpy()
    return {"emotion": emotion, "av": av}
