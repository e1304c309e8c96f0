"""Corpus readers: turn a corpus folder into a fedaffect manifest (one ``<corpus>_prepare`` each).

Each reader follows the SpeechBrain recipe style: ``<name>_prepare(source, out, **kw)`` scans
``source``, parses speaker, gender and labels from the corpus's published naming convention,
probes every clip's duration and checks it with :func:`shared_models.audio.load_audio`, and
writes the manifest (:mod:`shared_models.manifest`) to ``out``. Unreadable, empty, silent and
too-short clips, listed files that do not exist (``missing``), files that do not follow the
naming convention or name a speaker, text or combination the corpus does not have
(``bad-name``) and second copies of a clip already listed (``duplicate``: some downloads hold
the corpus twice) are skipped, counted in :class:`~shared_models.audio.SkipCounter`, listed one
per line with their reason in ``<out>.skipped.csv`` next to the manifest (``emodb.csv`` ->
``emodb.skipped.csv``; columns ``path``, ``reason``, ``detail``) and summarised in one
:class:`~shared_models.audio.SkippedClipsWarning`; the run goes on. The output is checked to
be writable before any clip is scanned. macOS zip metadata (``._*`` files, ``__MACOSX/``) is
ignored.

==========  ====================================================================================
name        source and convention
==========  ====================================================================================
emodb       Berlin EmoDB (Burkhardt et al. 2005), ``wav/03a01Fa.wav``: speaker 03, text a01
            (a01 a02 a04 a05 a07 b01 b02 b03 b09 b10), emotion letter (W anger, L boredom,
            E disgust, A fear, F happiness, T sadness, N neutral), version a, b, c ...
            Speakers 03 10 11 12 15 male, 08 09 13 14 16 female; others are ``bad-name``.
ravdess     RAVDESS (Livingstone & Russo 2018), ``Actor_01/03-01-05-01-02-01-01.wav``:
            modality-channel-emotion-intensity-statement-repetition-actor; modality 03
            (audio-only) only; channel 01 speech, 02 song (speech only unless ``include_song``);
            emotion 01 neutral, 02 calm (kept as ``calm``), 03 happiness, 04 sadness, 05 anger,
            06 fear, 07 disgust, 08 surprise; actors 01-24, odd male, even female. Names
            RAVDESS does not have (strong neutral, sung disgust or surprise, actor 25+) are
            ``bad-name``.
crema-d     CREMA-D (Cao et al. 2014), ``AudioWAV/1001_DFA_ANG_XX.wav``: actor 1001-1091,
            sentence (12 codes), emotion (ANG anger, DIS disgust, FEA fear, HAP happiness,
            NEU neutral, SAD sadness), level (LO MD HI for sentence IEO only, XX); gender from
            ``VideoDemographics.csv`` (under the source or next to it).
tess        Toronto Emotional Speech Set (Dupuis & Pichora-Fuller 2010),
            ``OAF_angry/OAF_back_angry.wav``: speaker OAF (older) or YAF (younger), both female;
            emotion angry (anger), disgust, fear, happy (happiness), neutral, sad (sadness),
            pleasant_surprise(d) or ps (surprise), in any case.
csv         a user's own manifest (``source`` is the CSV file), validated and re-checked.
hedgewars   Debian ``hedgewars-data`` voice packs, ``<Pack>/<Phrase>.ogg``; see
            :func:`hedgewars_prepare`, :data:`PHRASE_EMOTIONS`, :data:`PACK_GENDER`.
synth       an expressive corpus generated with espeak-ng; see :func:`synth_prepare`.
==========  ====================================================================================

Arousal and valence are left empty for corpora that do not annotate them (all but hedgewars,
synth and user CSVs); in particular RAVDESS's intensity and CREMA-D's level are not turned into
arousal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import soundfile as sf

from shared_models.audio import SAMPLE_RATE, ClipError, SkipCounter, load_audio, probe_duration
from shared_models.manifest import EMOTIONS, MANIFEST_COLUMNS, read_manifest, write_manifest

__all__ = [
    "PrepareResult",
    "Record",
    "CORPORA",
    "prepare",
    "skipped_csv_path",
    "emodb_prepare",
    "ravdess_prepare",
    "cremad_prepare",
    "tess_prepare",
    "csv_prepare",
    "hedgewars_prepare",
    "synth_prepare",
    "HEDGEWARS_VOICES",
    "PHRASE_EMOTIONS",
    "EXCLUDED_PHRASES",
    "EFFORT_PREFIXES",
    "NON_ENGLISH_PACKS",
    "PACK_GENDER",
    "PACK_F0_SPLIT_HZ",
    "PACK_MEDIAN_F0",
    "median_f0",
    "SYNTH_VOICES",
    "SYNTH_PROSODY",
    "SYNTH_JITTER",
    "SYNTH_SENTENCES",
]

#: Audio files the readers take: what soundfile reads (libsndfile >= 1.1 reads MP3 too), in
#: order of preference. When a corpus holds the same recording in two formats (the CREMA-D
#: repository's ``AudioWAV/`` and ``AudioMP3/``), the copy with the earlier suffix is kept.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass
class PrepareResult:
    """What a reader produced.

    Attributes
    ----------
    manifest : Path
        The manifest CSV written.
    n_clips : int
        Clips in the manifest.
    skipped : SkipCounter
        Clips left out, by reason.
    n_speakers : int
        Distinct speakers in the manifest.
    skipped_csv : Path or None
        The CSV listing every skipped clip with its reason (``<out>.skipped.csv``, see
        :func:`skipped_csv_path`); None when nothing was skipped.
    """

    manifest: Path
    n_clips: int
    skipped: SkipCounter = field(default_factory=SkipCounter)
    n_speakers: int = 0
    skipped_csv: Path | None = None


class _Skip(NamedTuple):
    """A reader's verdict on a file it leaves out and counts: the reason and what exactly."""

    reason: str
    detail: str = ""


class Record(NamedTuple):
    """One clip found by a reader, before its audio is checked."""

    path: str
    speaker: str
    gender: str = ""
    emotion: str = ""
    arousal: float | None = None
    valence: float | None = None
    extra: Mapping[str, str] | None = None


# --------------------------------------------------------------------------- shared helpers


def _source_dir(source: str | PathLike, what: str) -> Path:
    source = Path(source).expanduser().resolve()  # manifests store absolute paths
    if not source.is_dir():
        raise FileNotFoundError(f"{what}: source folder not found: {source}")
    return source


def _audio_files(folder: Path, suffixes: Sequence[str] = AUDIO_SUFFIXES, recursive: bool = True) -> list[Path]:
    """Audio files under ``folder``: the preferred format first (:data:`AUDIO_SUFFIXES`), then by path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    rank = {s: i for i, s in enumerate(AUDIO_SUFFIXES)}
    return sorted((p for p in found if p.suffix.lower() in suffixes and p.is_file()),
                  key=lambda p: (rank.get(p.suffix.lower(), len(rank)), str(p)))


def _progress(items: Iterable, description: str, total: int | None = None) -> Iterable:
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    return track(items, description, total=total, console=console, transient=True, disable=not console.is_terminal)


def skipped_csv_path(out: str | PathLike) -> Path:
    """Where a reader lists the clips it skipped: next to the manifest ``out``.

    Parameters
    ----------
    out : str or PathLike
        The output manifest, e.g. ``emodb.csv``.

    Returns
    -------
    pathlib.Path
        ``emodb.csv`` -> ``emodb.skipped.csv`` (``manifest`` -> ``manifest.skipped.csv``).
    """
    out = Path(out).expanduser()
    return out.with_name(f"{out.stem if out.suffix.lower() == '.csv' else out.name}.skipped.csv")


def _check_writable(out: str | PathLike, what: str) -> None:
    """Raise OSError, before any clip is scanned, if the manifest ``out`` cannot be written.

    Creates ``out``'s missing parent folders (as writing would) and creates and removes a probe
    file next to it: permission bits say nothing for root or on read-only and pseudo file systems
    (``/proc``).
    """
    out = Path(out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"{what}: the output manifest {out} is a folder; give a file, e.g. {out / 'manifest.csv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
        if out.exists():
            with open(out, "a"):
                pass
    except OSError as err:
        raise OSError(
            f"{what}: cannot write the output manifest {out} ({err.strerror or err}); choose another --out"
        ) from err


def _write_records(
    records: Sequence[Record],
    out: str | PathLike,
    what: str,
    skipped: SkipCounter | None = None,
    keys: Sequence[object] | None = None,
) -> PrepareResult:
    """Probe and check every record's clip, skip bad ones, write the manifest.

    ``skipped`` may already hold files skipped while scanning (e.g. ``bad-name``); they count
    in the one warning emitted here and are listed with the others in ``<out>.skipped.csv``
    (:func:`skipped_csv_path`; a stale one is removed when nothing is skipped). ``keys`` (one
    per record) identify the recording: a record whose key already has a usable clip in the
    manifest is skipped as ``duplicate`` (a second copy of the corpus in the source folder), so
    the first usable copy wins. A record whose file does not exist is ``missing``. Raises
    OSError if ``out`` cannot be written (checked before any clip) and ValueError if no clip
    is usable.
    """
    _check_writable(out, what)
    skipped = skipped if skipped is not None else SkipCounter()
    n_seen = len(records) + skipped.total
    rows, taken = [], set()
    for i, rec in enumerate(_progress(records, f"checking {what} clips")):
        if keys is not None and keys[i] in taken:
            skipped.add(rec.path, "duplicate", "another copy of this recording is listed")
            continue
        if not os.path.exists(rec.path):  # not "unreadable": nothing to read (moved, renamed, a typo)
            skipped.add(rec.path, "missing", "no such file" if not os.path.lexists(rec.path) else "broken link")
            continue
        try:
            duration = probe_duration(rec.path)
            load_audio(rec.path, sample_rate=None)  # checks only: no resampling
        except ClipError as err:
            skipped.add(err.path, err.reason, err.detail)
            continue
        row = dict(rec._asdict(), duration=duration)
        row.update(row.pop("extra") or {})
        rows.append(row)
        if keys is not None:
            taken.add(keys[i])
    listed = skipped_csv_path(out)
    if skipped.total:
        skipped.write_csv(listed)
        skipped.warn(f"{what} clips", of=n_seen, listed_in=listed)
    else:
        listed.unlink(missing_ok=True)  # from an earlier run: it would describe another scan
        listed = None
    if not rows:
        raise ValueError(f"{what}: no usable clips found ({n_seen} files looked at, skipped {skipped.summary() or 'none'}"
                         + (f"; each listed with its reason in {listed})" if listed else ")"))
    df = pd.DataFrame(rows)
    df = df[list(MANIFEST_COLUMNS) + [c for c in df.columns if c not in MANIFEST_COLUMNS]]
    path = write_manifest(df, out)
    return PrepareResult(path, len(df), skipped, int(df["speaker"].nunique()), listed)


def _is_macos_metadata(path: Path) -> bool:
    """AppleDouble files (``._03a01Fa.wav``) and ``__MACOSX/`` folders that zips made on macOS carry."""
    return path.name.startswith("._") or "__MACOSX" in path.parts


def _prepare_named(
    source: str | PathLike,
    out: str | PathLike,
    what: str,
    example: str,
    parse: Callable[[Path], tuple[object, Record] | _Skip | None],
    suffixes: Sequence[str] = AUDIO_SUFFIXES,
) -> PrepareResult:
    """Scan ``source`` for files named by a corpus convention.

    ``parse(path)`` returns ``(key, record)`` (``key`` names the recording, so that a second
    copy of the same clip elsewhere under ``source`` is skipped as ``duplicate``), ``None`` to
    leave the file out on purpose, or a :class:`_Skip` (``bad-name`` and why) to count it.
    macOS zip metadata (``._*``, ``__MACOSX/``) is not looked at. Raises OSError if ``out``
    cannot be written, before anything is scanned.
    """
    root = _source_dir(source, what)
    _check_writable(out, what)
    files = [p for p in _audio_files(root, suffixes) if not _is_macos_metadata(p)]
    if not files:
        raise ValueError(f"{what}: no audio files ({', '.join(suffixes)}) like {example} under {source}")
    skipped, records, keys = SkipCounter(), [], []
    for path in files:
        parsed = parse(path)
        if isinstance(parsed, _Skip):
            skipped.add(path, parsed.reason, parsed.detail)
        elif parsed is not None:
            keys.append(parsed[0])
            records.append(parsed[1])
    return _write_records(records, out, what, skipped, keys)


# --------------------------------------------------------------------------- EmoDB

_EMODB_NAME = re.compile(r"(\d\d)([a-z]\d\d)([WLEAFTN])([a-z])")
_EMODB_EMOTIONS = dict(W="anger", L="boredom", E="disgust", A="fear", F="happiness", T="sadness", N="neutral")
_EMODB_GENDER = {**dict.fromkeys(("03", "10", "11", "12", "15"), "male"),
                 **dict.fromkeys(("08", "09", "13", "14", "16"), "female")}
_EMODB_TEXTS = ("a01", "a02", "a04", "a05", "a07", "b01", "b02", "b03", "b09", "b10")


def emodb_prepare(source: str | PathLike, out: str | PathLike) -> PrepareResult:
    """Berlin Database of Emotional Speech (Burkhardt et al., Interspeech 2005).

    Parameters
    ----------
    source : path
        The corpus folder; audio files (``.wav``, or any format of :data:`AUDIO_SUFFIXES`) are
        searched recursively (normally ``wav/``; the archive's ``lablaut/``, ``labsilb/`` and
        ``silb/`` hold no audio and are not read).
        ``03a01Fa.wav``: speaker ``03``, text ``a01``, emotion letter, version ``a`` (``b``,
        ``c``, ... for further takes). Letters: W anger, L boredom, E disgust, A fear,
        F happiness, T sadness, N neutral. A speaker other than EmoDB's ten (03 08 09 10 11 12
        13 14 15 16) or a text other than its ten (a01 a02 a04 a05 a07 b01 b02 b03 b09 b10)
        is not an EmoDB name: skipped as ``bad-name``.
    out : path
        Manifest CSV to write.

    Returns
    -------
    PrepareResult
        Speakers ``emodb-03`` ... ``emodb-16`` (10: 03 10 11 12 15 male, 08 09 13 14 16
        female), seven emotions, no arousal/valence.

    Raises
    ------
    FileNotFoundError
        ``source`` is not a folder.
    OSError
        ``out`` cannot be written (checked before any clip is scanned).
    ValueError
        No EmoDB-named clip is usable.
    """

    def parse(path: Path) -> tuple[str, Record] | _Skip:
        m = _EMODB_NAME.fullmatch(path.stem)
        if not m:
            return _Skip("bad-name", "not named like 03a01Fa (speaker, text, emotion letter, version)")
        speaker, text, letter, _version = m.groups()
        if speaker not in _EMODB_GENDER:
            return _Skip("bad-name", f"speaker {speaker} is not an EmoDB speaker ({' '.join(sorted(_EMODB_GENDER))})")
        if text not in _EMODB_TEXTS:
            return _Skip("bad-name", f"text {text} is not an EmoDB text ({' '.join(_EMODB_TEXTS)})")
        return path.stem, Record(str(path), f"emodb-{speaker}", _EMODB_GENDER[speaker], _EMODB_EMOTIONS[letter])

    return _prepare_named(source, out, "emodb", "wav/03a01Fa.wav", parse)


# --------------------------------------------------------------------------- RAVDESS

_RAVDESS_NAME = re.compile(r"(0[1-3])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)")
_RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happiness", "04": "sadness",
                     "05": "anger", "06": "fear", "07": "disgust", "08": "surprise"}


def ravdess_prepare(source: str | PathLike, out: str | PathLike, *, include_song: bool = False) -> PrepareResult:
    """Ryerson Audio-Visual Database of Emotional Speech and Song (Livingstone & Russo 2018).

    Parameters
    ----------
    source : path
        The corpus folder (``Actor_01/`` ... ``Actor_24/``, at any depth, e.g.
        ``Audio_Speech_Actors_01-24/Actor_01/``); audio files (``.wav``, ``.flac``, ``.ogg``,
        ``.mp3``) searched recursively.
        ``03-01-06-01-02-01-12.wav``: modality, vocal channel, emotion, intensity, statement,
        repetition, actor. Only modality 03 (audio-only) is read: the ``.mp4`` videos (01
        full-AV, 02 video-only) are not audio, and a ``.wav`` with modality 01 or 02 (sound
        taken from a video, the same take as its 03 file) is skipped as ``video-modality``.
        Emotions: 01 neutral, 02 calm (kept as ``calm``, a class of its own), 03 happiness,
        04 sadness, 05 anger, 06 fear, 07 disgust, 08 surprise. Intensity is kept in an extra
        column ``intensity`` (``normal``/``strong``), e.g. to keep only strong clips or to
        declare it a group; arousal and valence are left empty. Names RAVDESS does not have
        are skipped as ``bad-name``: a strong (02) neutral (01), a sung (02) disgust (07) or
        surprise (08), an actor outside 01-24.
    out : path
        Manifest CSV to write.
    include_song : bool, default False
        Also take sung clips (vocal channel 02); by default speech (01) only.

    Returns
    -------
    PrepareResult
        Speakers ``ravdess-01`` ... ``ravdess-24`` (odd actors male, even female), eight
        emotions. A clip found twice under ``source`` (the Kaggle copy holds ``Actor_XX/`` and
        ``audio_speech_actors_01-24/Actor_XX/``) is listed once.

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        As :func:`emodb_prepare`.
    """

    def parse(path: Path) -> tuple[str, Record] | _Skip | None:
        m = _RAVDESS_NAME.fullmatch(path.stem)
        if not m:
            return _Skip("bad-name", "not named like 03-01-05-01-02-01-01 (modality-channel-emotion-"
                                     "intensity-statement-repetition-actor)")
        modality, channel, emotion, intensity, _statement, _rep, actor = m.groups()
        if not 1 <= int(actor) <= 24:
            return _Skip("bad-name", f"actor {actor} is not a RAVDESS actor (01-24)")
        if emotion == "01" and intensity == "02":
            return _Skip("bad-name", "RAVDESS has no strong (02) neutral (01)")
        if channel == "02" and emotion in ("07", "08"):
            return _Skip("bad-name", f"RAVDESS song has no {_RAVDESS_EMOTIONS[emotion]} ({emotion})")
        if modality != "03":
            return _Skip("video-modality", "modality 01/02: sound of a video, the same take as its 03 file")
        if channel == "02" and not include_song:
            return None
        gender = "male" if int(actor) % 2 else "female"
        return path.stem, Record(str(path), f"ravdess-{actor}", gender, _RAVDESS_EMOTIONS[emotion],
                                 extra={"intensity": "normal" if intensity == "01" else "strong"})

    return _prepare_named(source, out, "ravdess", "Actor_01/03-01-05-01-02-01-01.wav", parse)


# --------------------------------------------------------------------------- CREMA-D

#: CREMA-D's emotion level (the file name's last field): only sentence IEO was spoken at three
#: levels; the others are ``XX``.
_CREMAD_LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified",
                  "X": "unspecified"}  # the distributed 1040_ITH_SAD_X.wav
_CREMAD_NAME = re.compile(r"(\d{4})_([A-Z]{3})_(ANG|DIS|FEA|HAP|NEU|SAD)_([A-Z]{1,2})", re.IGNORECASE)
_CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
_CREMAD_EMOTIONS = dict(ANG="anger", DIS="disgust", FEA="fear", HAP="happiness", NEU="neutral", SAD="sadness")


def _cremad_genders(source: Path) -> dict[str, str]:
    tables = sorted(source.rglob("VideoDemographics.csv")) or sorted(source.parent.glob("VideoDemographics.csv"))
    if not tables:
        return {}
    demo = pd.read_csv(tables[0], dtype=str, keep_default_na=False, encoding="utf-8-sig")  # tolerates a BOM
    demo.columns = demo.columns.str.strip()
    if not {"ActorID", "Sex"} <= set(demo.columns):
        raise ValueError(f"{tables[0]}: expected columns ActorID and Sex, found {', '.join(demo.columns)}")
    sexes = demo["Sex"].str.strip().str.lower()
    return {a.strip(): s for a, s in zip(demo["ActorID"], sexes) if s in ("female", "male")}


def cremad_prepare(source: str | PathLike, out: str | PathLike) -> PrepareResult:
    """Crowd-sourced Emotional Multimodal Actors Dataset (Cao et al., IEEE TAC 2014).

    Parameters
    ----------
    source : path
        The corpus folder (the repository, or its ``AudioWAV/`` or ``AudioMP3/``); audio files
        searched recursively. A clip in both ``AudioWAV/`` and ``AudioMP3/`` is listed once, as
        its WAV file; a copy holding only ``AudioMP3/`` is read as MP3. Videos are not read.
        ``1001_DFA_ANG_XX.wav``: actor (1001-1091), sentence (IEO TIE IOM IWW TAI MTI IWL ITH
        DFA ITS TSI WSI), emotion (ANG anger, DIS disgust, FEA fear, HAP happiness, NEU
        neutral, SAD sadness), level (LO MD HI XX: extra column ``level``,
        ``low``/``medium``/``high``/``unspecified``; the distributed ``1040_ITH_SAD_X.wav``
        reads as XX). Another actor, sentence or level, or a level LO/MD/HI on a sentence other
        than IEO (the only one spoken at set levels) is skipped as ``bad-name``. Gender is read
        from the first ``VideoDemographics.csv`` found under ``source``, or else next to it (in
        its parent folder): columns ``ActorID``, ``Sex`` = Male/Female; without it gender is
        left empty. The real ``1076_MTI_SAD_XX.wav`` holds no audio and is skipped as ``empty``.
    out : path
        Manifest CSV to write.

    Returns
    -------
    PrepareResult
        Speakers ``crema-d-1001`` ... ``crema-d-1091``, six emotions, no arousal/valence.

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        As :func:`emodb_prepare`; ValueError also if the demographics CSV lacks its columns.
    """
    source = _source_dir(source, "crema-d")
    genders = _cremad_genders(source)

    def parse(path: Path) -> tuple[str, Record] | _Skip:
        m = _CREMAD_NAME.fullmatch(path.stem)
        if not m:
            return _Skip("bad-name", "not named like 1001_DFA_ANG_XX (actor_sentence_emotion_level)")
        actor, sentence, emotion, level = m.groups()
        sentence, level = sentence.upper(), level.upper()
        if not 1001 <= int(actor) <= 1091:
            return _Skip("bad-name", f"actor {actor} is not a CREMA-D actor (1001-1091)")
        if sentence not in _CREMAD_SENTENCES:
            return _Skip("bad-name", f"sentence {sentence} is not a CREMA-D sentence ({' '.join(_CREMAD_SENTENCES)})")
        if level not in _CREMAD_LEVELS:
            return _Skip("bad-name", f"level {level} is not a CREMA-D level (LO MD HI XX)")
        if level in ("LO", "MD", "HI") and sentence != "IEO":
            return _Skip("bad-name", f"level {level} on sentence {sentence}: only IEO was spoken at set levels")
        record = Record(str(path), f"crema-d-{actor}", genders.get(actor, ""), _CREMAD_EMOTIONS[emotion.upper()],
                        extra={"level": _CREMAD_LEVELS[level]})
        return path.stem.upper(), record

    return _prepare_named(source, out, "crema-d", "AudioWAV/1001_DFA_ANG_XX.wav", parse)


# --------------------------------------------------------------------------- TESS

_TESS_NAME = re.compile(r"(OAF|YAF|OA|YA)_([A-Za-z]+)_([A-Za-z_]+)", re.IGNORECASE)
_TESS_EMOTIONS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness",
                  "neutral": "neutral", "sad": "sadness", "ps": "surprise",
                  "pleasant_surprise": "surprise", "pleasant_surprised": "surprise"}


def _tess_emotion(label: str) -> str | None:
    """``angry``, ``Fear``, ``neutral_neutral`` (a doubled suffix) ... -> emotion; None if unknown."""
    label = label.lower()
    for name, emotion in _TESS_EMOTIONS.items():
        if re.fullmatch(rf"{name}(?:_{name})*", label):
            return emotion
    return None


def tess_prepare(source: str | PathLike, out: str | PathLike) -> PrepareResult:
    """Toronto Emotional Speech Set (Dupuis & Pichora-Fuller 2010).

    Parameters
    ----------
    source : path
        The corpus folder (``OAF_angry/OAF_back_angry.wav``, ...); audio files searched recursively
        (the Kaggle copy nests ``TESS Toronto emotional speech set data/`` twice).
        ``YAF_bath_ps.wav``: speaker, word, emotion. Emotions, in any case: angry -> anger,
        disgust, fear, happy -> happiness, neutral, sad -> sadness, and ``ps``,
        ``pleasant_surprise``, ``pleasant_surprised`` -> surprise. The quirks of the
        distributed copies are read too: ``OA_``/``YA_`` prefixes (as OAF/YAF), an upper-case
        or doubled extension (``.WAV``, ``.wav.wav``), a doubled emotion suffix
        (``_neutral_neutral``). Labels come from the file name, so folder names may differ in
        case or wording (``OAF_Fear/``, ``YAF_pleasant_surprised/``). A clip (speaker, word,
        emotion) found twice under ``source`` is listed once.
    out : path
        Manifest CSV to write.

    Returns
    -------
    PrepareResult
        Speakers ``tess-oaf`` and ``tess-yaf`` (both female), seven emotions, and an extra
        column ``age_group`` (``older``/``younger``).

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        As :func:`emodb_prepare`.
    """

    def parse(path: Path) -> tuple[tuple[str, str, str], Record] | _Skip:
        stem = path.name
        while Path(stem).suffix.lower() in AUDIO_SUFFIXES:  # OAF_back_sad.wav.wav
            stem = Path(stem).stem
        m = _TESS_NAME.fullmatch(stem)
        if not m:
            return _Skip("bad-name", "not named like OAF_back_angry (speaker OAF/YAF, word, emotion)")
        emotion = _tess_emotion(m.group(3))
        if emotion is None:
            return _Skip("bad-name", f"emotion {m.group(3)!r} is not a TESS emotion (angry disgust fear happy "
                                     "neutral sad ps/pleasant_surprise)")
        speaker = m.group(1).upper()[:2] + "F"
        age = "older" if speaker == "OAF" else "younger"
        record = Record(str(path), f"tess-{speaker.lower()}", "female", emotion, extra={"age_group": age})
        return (speaker, m.group(2).lower(), emotion), record

    return _prepare_named(source, out, "tess", "OAF_angry/OAF_back_angry.wav", parse)


# --------------------------------------------------------------------------- user CSV


def csv_prepare(source: str | PathLike, out: str | PathLike) -> PrepareResult:
    """A user's own manifest: validate it, check its clips, write a clean copy.

    Parameters
    ----------
    source : path
        A manifest CSV (:mod:`shared_models.manifest`); relative clip paths are relative to it.
        Only the columns ``path`` and ``speaker`` are required; a missing ``gender``,
        ``emotion``, ``arousal``, ``valence`` or ``duration`` column is taken as empty, and
        durations are probed from the files in any case.
    out : path
        Manifest CSV to write (absolute paths, probed durations, extra columns kept).

    Returns
    -------
    PrepareResult
        A row whose file does not exist is skipped as ``missing`` (not ``unreadable``).

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist.
    shared_models.manifest.ManifestError
        A column is missing or misspelt, or rows are invalid; the message names each bad
        value's line and column.
    OSError
        ``out`` cannot be written (checked before any clip is read).
    ValueError
        No clip is usable.
    """
    return _write_records(_manifest_records(read_manifest(source)), out, "csv")


def _manifest_records(df: pd.DataFrame) -> list[Record]:
    extra_cols = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    nan_to_none = lambda v: None if pd.isna(v) else float(v)  # noqa: E731
    return [
        Record(r["path"], r["speaker"], r["gender"], r["emotion"], nan_to_none(r["arousal"]),
               nan_to_none(r["valence"]), {c: r[c] for c in extra_cols})
        for r in df.to_dict("records")
    ]


# --------------------------------------------------------------------------- Hedgewars

HEDGEWARS_VOICES = Path("/usr/share/games/hedgewars/Data/Sounds/voices")
"""Where Debian's ``hedgewars-data`` installs the voice packs (one folder per pack = speaker)."""

PHRASE_EMOTIONS: dict[str, tuple[str, float, float]] = {
    # phrase: (emotion, arousal, valence). Our reading of what the words express in the game;
    # arousal/valence on [-1, 1] placed after Russell's circumplex (1980) for the category,
    # nudged by how strongly the phrase is worded.
    # happiness: triumph, praise, laughter
    "Amazing": ("happiness", 0.6, 0.7), "Brilliant": ("happiness", 0.6, 0.7),
    "Excellent": ("happiness", 0.5, 0.7), "Flawless": ("happiness", 0.6, 0.8),
    "Victory": ("happiness", 0.7, 0.8), "Laugh": ("happiness", 0.6, 0.7),
    "Enemydown": ("happiness", 0.5, 0.5), "Firstblood": ("happiness", 0.6, 0.5),
    # anger: threats, insults, protests, frustrated curses
    "Illgetyou": ("anger", 0.7, -0.6), "Revenge": ("anger", 0.7, -0.6),
    "Gonnagetyou": ("anger", 0.7, -0.6), "Justyouwait": ("anger", 0.6, -0.6),
    "Youllregretthat": ("anger", 0.7, -0.6), "Stupid": ("anger", 0.6, -0.5),
    "Traitor": ("anger", 0.7, -0.7), "Coward": ("anger", 0.6, -0.6),
    "Nutter": ("anger", 0.5, -0.4), "Comeonthen": ("anger", 0.6, -0.3),
    "Cutitout": ("anger", 0.6, -0.5), "Leavemealone": ("anger", 0.6, -0.6),
    "Sameteam": ("anger", 0.5, -0.4), "Bugger": ("anger", 0.4, -0.5), "Drat": ("anger", 0.3, -0.4),
    # fear: alarms and warnings
    "Incoming": ("fear", 0.8, -0.6), "Takecover": ("fear", 0.8, -0.6), "Runaway": ("fear", 0.8, -0.7),
    "Hurry": ("fear", 0.7, -0.4), "Watchit": ("fear", 0.6, -0.4), "Uh-oh": ("fear", 0.4, -0.5),
    # sadness: despair and disappointment
    "Nooo": ("sadness", 0.2, -0.8), "Ohdear": ("sadness", -0.3, -0.5), "Missed": ("sadness", -0.2, -0.4),
    # surprise
    "Whatthe": ("surprise", 0.6, -0.2), "Oops": ("surprise", 0.3, -0.3),
    # boredom
    "Boring": ("boredom", -0.7, -0.3),
    # neutral: greetings, acknowledgements, musing
    "Hello": ("neutral", 0.1, 0.2), "Byebye": ("neutral", 0.0, 0.0), "Solong": ("neutral", 0.0, 0.0),
    "Yessir": ("neutral", 0.1, 0.1), "Hmm": ("neutral", -0.2, 0.0),
}
"""Phrase -> (emotion, arousal, valence) for the Hedgewars speech phrases (ours, a documented choice)."""

EXCLUDED_PHRASES = ("Fire", "Grenade", "Kamikaze", "Melon", "Flyaway", "Reinforcements", "Watchthis", "Thisoneismine")
"""Speech phrases left out: weapon and crate call-outs and boasts with no clear emotion category."""

EFFORT_PREFIXES = ("Ow", "Ouch", "Ooff", "Jump", "Firepunch", "Poison")
"""Non-speech effort sounds (pain, jumps, punches, coughs), always left out."""

NON_ENGLISH_PACKS = ("Default_es", "Default_pl", "Default_ru", "Default_uk", "Russian_pl")
"""Packs in Spanish, Polish, Russian, Ukrainian and Polish (per Hedgewars' changelog);
``Russian`` is English with a Russian accent. Kept unless ``exclude_non_english=True``."""

PACK_F0_SPLIT_HZ = 320.0
PACK_MEDIAN_F0 = {  # Hz, median_f0() over each pack's speech clips (Debian hedgewars-data 1.0.2)
    "British": 333.3, "Classic": 296.3, "Default": 307.7, "Default_es": 347.8, "Default_pl": 363.6,
    "Default_ru": 355.6, "Default_uk": 313.7, "HillBilly": 280.7, "Mobster": 275.9, "Pirate": 307.7,
    "Robot": 231.9, "Russian": 372.1, "Russian_pl": 222.2, "Singer": 390.2, "Surfer": 307.7,
}
PACK_GENDER = {pack: "female" if f0 > PACK_F0_SPLIT_HZ else "male" for pack, f0 in PACK_MEDIAN_F0.items()}
"""A GUESS, not a judgment by listening: gender group per pack from the median F0 (Hz) of its
speech clips (:func:`median_f0`, YIN, values in ``PACK_MEDIAN_F0``). The voices are pitched-up
cartoon voices, so the usual adult split (~165 Hz) puts every pack in one group; we split at
``PACK_F0_SPLIT_HZ`` = 320 Hz, the widest gap near the middle (314 -> 333 Hz), giving 8 "male"
and 5 "female" among the 13 default packs. YIN on such voices is fragile (a few packs move by
10-20% with the clip selection), so read the groups as lower/higher voices. Packs not listed
(a newer hedgewars-data) get the same rule applied at preparation time."""


def _yin(wav: np.ndarray, sr: int, fmin: float, fmax: float, threshold: float) -> np.ndarray:
    n, hop, tmin, tmax = int(0.04 * sr), int(0.01 * sr), int(sr / fmax), int(sr / fmin)
    if len(wav) < n + tmax + 1:
        return np.empty(0)
    frames = np.lib.stride_tricks.sliding_window_view(wav.astype(np.float64), n + tmax)[::hop]
    rms = np.sqrt(np.mean(frames[:, :n] ** 2, axis=1))
    frames = frames[rms > rms.max() * 10 ** (-30 / 20)]  # energy gate: within 30 dB of the loudest frame
    diff = np.stack([np.sum((frames[:, :n] - frames[:, t:t + n]) ** 2, axis=1) for t in range(1, tmax + 1)], 1)
    cmnd = diff * np.arange(1, tmax + 1) / np.maximum(np.cumsum(diff, axis=1), 1e-12)
    f0 = []
    for row in cmnd:
        below = np.flatnonzero(row[tmin - 1:] < threshold)
        if below.size:
            t = below[0] + tmin - 1
            while t + 1 < len(row) and row[t + 1] < row[t]:
                t += 1
            f0.append(sr / (t + 1))
    return np.asarray(f0)


def median_f0(files: Iterable[str | PathLike], *, fmin: float = 60.0, fmax: float = 500.0, threshold: float = 0.15) -> float:
    """Median fundamental frequency over the voiced frames of several clips.

    YIN (de Cheveigné & Kawahara, JASA 2002): cumulative-mean-normalised difference function,
    absolute threshold, 40 ms frames every 10 ms at 16 kHz; frames more than 30 dB below the
    loudest frame of their clip are ignored. Unusable clips are ignored.

    Parameters
    ----------
    files : iterable of paths
        Audio clips (any format :func:`~shared_models.audio.load_audio` reads).
    fmin, fmax : float
        Search range in Hz.
    threshold : float
        YIN's absolute threshold on the normalised difference.

    Returns
    -------
    float
        Median F0 in Hz; NaN if no frame is voiced.
    """
    f0 = []
    for path in files:
        try:
            f0.append(_yin(load_audio(path), SAMPLE_RATE, fmin, fmax, threshold))
        except ClipError:
            continue
    f0 = np.concatenate(f0) if f0 else np.empty(0)
    return float(np.median(f0)) if f0.size else float("nan")


def hedgewars_prepare(
    source: str | PathLike | None = None,
    out: str | PathLike = "hedgewars.csv",
    *,
    exclude_packs: Sequence[str] = ("Robot", "Singer"),
    exclude_non_english: bool = False,
) -> PrepareResult:
    """Hedgewars voice packs as an acted-emotion corpus (one pack = one speaker).

    Each ``<Pack>/<Phrase>.ogg`` is labelled from :data:`PHRASE_EMOTIONS` (emotion, arousal,
    valence); effort sounds (:data:`EFFORT_PREFIXES`) and :data:`EXCLUDED_PHRASES` are left
    out, phrases in neither table are skipped as ``unmapped-phrase``. Gender is
    :data:`PACK_GENDER`, a documented guess. The manifest gets an extra column ``phrase``.

    Parameters
    ----------
    source : path or None
        The ``voices`` folder (or a hedgewars root containing ``Data/Sounds/voices``); ``None``
        means :data:`HEDGEWARS_VOICES`.
    out : path
        Manifest CSV to write.
    exclude_packs : sequence of str, default ("Robot", "Singer")
        Packs to leave out: Robot is heavily processed, Singer is sung.
    exclude_non_english : bool, default False
        Also leave out :data:`NON_ENGLISH_PACKS`.

    Returns
    -------
    PrepareResult
        With Debian hedgewars-data 1.0.2 and the defaults: 13 speakers ``hw-<Pack>``, 7 emotions.

    Raises
    ------
    FileNotFoundError
        The voices folder is missing (install ``hedgewars-data``).
    OSError
        ``out`` cannot be written (checked before any clip is scanned).
    ValueError
        No usable clip.
    """
    root = Path(source).expanduser().resolve() if source is not None else HEDGEWARS_VOICES
    if (root / "Data" / "Sounds" / "voices").is_dir():
        root = root / "Data" / "Sounds" / "voices"
    if not root.is_dir():
        raise FileNotFoundError(f"hedgewars: voices folder not found: {root} (apt-get install hedgewars-data)")
    _check_writable(out, "hedgewars")
    left_out = set(exclude_packs) | (set(NON_ENGLISH_PACKS) if exclude_non_english else set())
    phrases = {p.lower(): (p, label) for p, label in PHRASE_EMOTIONS.items()}
    excluded = {p.lower() for p in EXCLUDED_PHRASES}
    effort = tuple(p.lower() for p in EFFORT_PREFIXES)
    skipped, records = SkipCounter(), []
    for pack_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in left_out):
        files = _audio_files(pack_dir, recursive=False)
        speech = [f for f in files if not f.stem.lower().startswith(effort) and f.stem.lower() not in excluded]
        if not speech:
            continue
        gender = PACK_GENDER.get(pack_dir.name)
        if gender is None:
            f0 = median_f0(speech)
            gender = "" if np.isnan(f0) else "female" if f0 > PACK_F0_SPLIT_HZ else "male"
        for path in speech:
            if path.stem.lower() not in phrases:
                skipped.add(path, "unmapped-phrase")
                continue
            phrase, (emotion, arousal, valence) = phrases[path.stem.lower()]
            records.append(Record(str(path), f"hw-{pack_dir.name}", gender, emotion, arousal, valence, {"phrase": phrase}))
    return _write_records(records, out, "hedgewars", skipped)


# --------------------------------------------------------------------------- synthetic corpus (espeak-ng)


class _Prosody(NamedTuple):
    pitch: float  # espeak-ng -p, 0..99 (default 50)
    rate: float  # -s, words per minute (default 175)
    amplitude: float  # -a, 0..200 (default 100)
    range: float  # SSML <prosody range="N%">, 100 = voice default
    gap: int  # -g, extra pause between words in units of 10 ms
    arousal: float
    valence: float


SYNTH_PROSODY: dict[str, _Prosody] = {
    # Base prosody per emotion after the acoustic profiles reviewed by Scherer (2003) and
    # Juslin & Laukka (2003): high arousal = higher, wider pitch, faster, louder; sadness and
    # boredom low, slow, flat. Arousal/valence are the category's circumplex position.
    "anger": _Prosody(48, 200, 170, 160, 0, 0.8, -0.6),
    "happiness": _Prosody(68, 190, 130, 175, 0, 0.6, 0.7),
    "fear": _Prosody(76, 215, 110, 125, 0, 0.7, -0.7),
    "sadness": _Prosody(32, 125, 70, 45, 4, -0.6, -0.6),
    "boredom": _Prosody(38, 140, 85, 25, 2, -0.7, -0.3),
    "neutral": _Prosody(50, 170, 100, 100, 0, 0.0, 0.0),
    "calm": _Prosody(44, 150, 85, 70, 1, -0.4, 0.4),
    "disgust": _Prosody(40, 140, 115, 120, 2, 0.2, -0.6),
    "surprise": _Prosody(80, 185, 135, 200, 0, 0.7, 0.2),
}
"""Emotion -> base espeak-ng prosody and (arousal, valence) for :func:`synth_prepare`."""

SYNTH_JITTER = _Prosody(8, 18, 25, 30, 0, 0.0, 0.0)
"""Standard deviation of the per-utterance Gaussian jitter added to each prosody parameter."""

SYNTH_VOICES: dict[str, str] = {
    # the variants espeak-ng ships with a declared gender, less the whispered, robotic and
    # breathy ones; ordered so that the first 14, 20, 26 and 32 speakers are half female
    "m1": "male", "f1": "female", "m2": "male", "f2": "female", "m3": "male", "f3": "female",
    "m4": "male", "f4": "female", "m5": "male", "f5": "female", "m6": "male", "m7": "male",
    "Alicia": "female", "Andrea": "female", "Andy": "male", "Annie": "female", "Denis": "male", "anika": "female",
    "Diogo": "male", "aunty": "female", "Henrique": "male", "belinda": "female", "Lee": "male", "grandma": "female",
    "Marco": "male", "linda": "female", "antonio": "male", "steph": "female", "michel": "male", "steph2": "female",
    "miguel": "male", "steph3": "female", "sandro": "male", "travis": "male", "victor": "male", "croak": "male",
}
"""espeak-ng voice variants (``en+m1``, ``en+Andrea`` ...) -> gender, in the order
:func:`synth_prepare` takes them: the first 10 alternate male/female, 32 speakers are 16 + 16."""

SYNTH_SENTENCES = (
    "The cloth is lying on the table.", "We will go there at seven o'clock.",
    "The bag is standing next to the door.", "Tomorrow the shop opens at nine.",
    "She put the paper in the drawer.", "The train leaves from platform four.",
    "He will bring the keys back in the evening.", "The window faces the garden.",
    "They painted the fence last week.", "The meeting is in the second room.",
    "I have read the letter twice.", "The car is parked behind the house.",
    "Our neighbours bought a new lamp.", "The box contains twelve cups.",
    "It is going to rain this afternoon.", "The report is on the desk upstairs.",
    "You can take the bus at the corner.", "The children went out at noon.",
    "He wrote the numbers on the board.", "The coffee is in the blue jar.",
)
"""Short sentences of neutral content, so that only prosody carries the emotion."""

_SYNTH_VERSION = 1


def _noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    return np.fft.irfft(spectrum / np.sqrt(np.maximum(np.arange(spectrum.size), 1)), n)  # 1/f power


def _synth_clip(task: tuple, *, espeak: str, tmp: Path, source: Path, seed: int, snr_db: tuple[float, float]) -> Record:
    import torch
    import torchaudio.functional as AF

    speaker_i, voice, emotion, k = task
    rng = np.random.default_rng([seed, speaker_i, EMOTIONS.index(emotion), k])
    z = rng.standard_normal(4)
    base, sd = SYNTH_PROSODY[emotion], SYNTH_JITTER
    pitch = int(np.clip(round(base.pitch + sd.pitch * z[0]), 0, 99))
    rate = int(np.clip(round(base.rate + sd.rate * z[1]), 80, 400))
    amplitude = int(np.clip(round(base.amplitude + sd.amplitude * z[2]), 10, 200))
    prange = int(np.clip(round(base.range + sd.range * z[3]), 5, 300))
    text = SYNTH_SENTENCES[rng.integers(len(SYNTH_SENTENCES))]
    # label jitter follows the prosody jitter: livelier delivery -> higher arousal
    arousal = float(np.clip(base.arousal + 0.06 * z[:3].sum() / np.sqrt(3) + 0.04 * rng.standard_normal(), -1, 1))
    valence = float(np.clip(base.valence + 0.04 * z[3] + 0.04 * rng.standard_normal(), -1, 1))
    raw = tmp / f"{speaker_i}-{emotion}-{k}.wav"
    cmd = [espeak, "-m", "-v", f"en+{voice}", "-p", str(pitch), "-s", str(rate), "-a", str(amplitude),
           "-g", str(base.gap), "-w", str(raw), f'<speak><prosody range="{prange}%">{text}</prosody></speak>']
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {done.stderr.strip()}")
    wav, sr = sf.read(raw, dtype="float32")
    wav = AF.resample(torch.from_numpy(wav), sr, SAMPLE_RATE).numpy().astype(np.float64)
    noise = _noise(rng, wav.size, rng.choice(["white", "pink"]))
    snr = rng.uniform(*snr_db)
    wav = wav + noise * np.sqrt(np.mean(wav**2) / (np.mean(noise**2) * 10 ** (snr / 10)))
    wav *= 10 ** (rng.uniform(-6, 6) / 20)  # random recording level
    wav *= min(1.0, 0.99 / np.abs(wav).max())
    speaker = f"synth-{voice.lower()}"
    rel = Path(speaker) / f"{emotion}-{k:03d}.wav"
    (source / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(source / rel, wav.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return Record(rel.as_posix(), speaker, SYNTH_VOICES[voice], emotion, round(arousal, 3), round(valence, 3))


def synth_prepare(
    source: str | PathLike,
    out: str | PathLike,
    *,
    n_speakers: int = 8,
    clips_per_emotion: int = 12,
    emotions: Sequence[str] = ("anger", "happiness", "sadness", "neutral", "fear", "boredom"),
    seed: int = 0,
    noise_snr_db: tuple[float, float] = (10, 30),
) -> PrepareResult:
    """Generate an expressive synthetic corpus with espeak-ng and write its manifest.

    Each speaker is an espeak-ng voice variant speaking English (:data:`SYNTH_VOICES`, genders
    alternating for the first 10, so 8 speakers = 4 male + 4 female; 32 = 16 + 16). Each clip speaks one of
    :data:`SYNTH_SENTENCES` with its emotion's base prosody (:data:`SYNTH_PROSODY`: pitch,
    rate, amplitude, SSML pitch range, word gap) plus seeded Gaussian jitter
    (:data:`SYNTH_JITTER`) large enough for the classes to overlap; white or pink noise is
    added at a random SNR and the level is changed by a random gain in [-6, +6] dB. Clips are
    16 kHz mono 16-bit WAV under ``source/synth-<voice>/<emotion>-NNN.wav``; ``source`` also
    holds ``labels.csv`` and ``synth.json`` (the settings). A later call with the same settings
    reuses the finished corpus; other settings regenerate it. Deterministic for a seed.

    Parameters
    ----------
    source : path
        Folder to generate the corpus into (created).
    out : path
        Manifest CSV to write (absolute paths).
    n_speakers : int, default 8
        1 to ``len(SYNTH_VOICES)`` (36).
    clips_per_emotion : int, default 12
        Clips per speaker and emotion.
    emotions : sequence of str
        Subset of :data:`SYNTH_PROSODY`'s keys.
    seed : int, default 0
    noise_snr_db : (float, float), default (10, 30)
        Range of the uniform random SNR in dB.

    Returns
    -------
    PrepareResult
        ``n_speakers * len(emotions) * clips_per_emotion`` clips (576 by default), with
        emotion, arousal and valence on every clip.

    Raises
    ------
    RuntimeError
        espeak-ng is not installed, or fails.
    OSError
        ``out`` cannot be written (checked before anything is generated).
    ValueError
        A setting is out of range.
    """
    if not 1 <= n_speakers <= len(SYNTH_VOICES):
        raise ValueError(f"synth: n_speakers must be in 1..{len(SYNTH_VOICES)}, got {n_speakers}")
    if clips_per_emotion < 1:
        raise ValueError(f"synth: clips_per_emotion must be >= 1, got {clips_per_emotion}")
    unknown = [e for e in emotions if e not in SYNTH_PROSODY]
    if unknown or not emotions:
        raise ValueError(f"synth: emotions must be among {', '.join(SYNTH_PROSODY)}, got {list(emotions)}")
    lo, hi = map(float, noise_snr_db)
    if lo > hi:
        raise ValueError(f"synth: noise_snr_db must be (low, high), got {noise_snr_db}")
    source = Path(source).expanduser().resolve()
    _check_writable(out, "synth")
    settings = dict(version=_SYNTH_VERSION, n_speakers=n_speakers, clips_per_emotion=clips_per_emotion,
                    emotions=list(emotions), seed=seed, noise_snr_db=[lo, hi])
    settings_file, labels_file = source / "synth.json", source / "labels.csv"
    if settings_file.is_file() and labels_file.is_file():
        old = json.loads(settings_file.read_text())
        previous = read_manifest(labels_file)
        if old == settings and all(os.path.isfile(p) for p in previous["path"]):
            return _write_records(_manifest_records(previous), out, "synth")
        settings_file.unlink()
        for p in previous["path"]:
            Path(p).unlink(missing_ok=True)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("synth: espeak-ng not found on PATH; install it with `apt-get install espeak-ng`")
    voices = list(SYNTH_VOICES)
    tasks = [(i, voices[i], e, k) for i in range(n_speakers) for e in emotions for k in range(clips_per_emotion)]
    source.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedaffect-synth-") as tmp, ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        def one(task: tuple) -> Record:
            return _synth_clip(task, espeak=espeak, tmp=Path(tmp), source=source, seed=seed, snr_db=(lo, hi))

        records = list(_progress(pool.map(one, tasks), "generating synth clips", total=len(tasks)))
    labels = pd.DataFrame([r._asdict() for r in records]).drop(columns="extra").assign(duration=np.nan)
    write_manifest(labels, labels_file)  # relative paths: the corpus folder can be moved
    settings_file.write_text(json.dumps(settings, indent=2))
    return _write_records(_manifest_records(read_manifest(labels_file)), out, "synth")


# --------------------------------------------------------------------------- registry

CORPORA: dict[str, Callable[..., PrepareResult]] = {
    "emodb": emodb_prepare,
    "ravdess": ravdess_prepare,
    "crema-d": cremad_prepare,
    "tess": tess_prepare,
    "csv": csv_prepare,
    "hedgewars": hedgewars_prepare,
    "synth": synth_prepare,
}
"""Corpus name -> reader, as used by ``fedaffect data prepare NAME``."""


def prepare(name: str, source: str | PathLike | None = None, out: str | PathLike | None = None, **kw) -> PrepareResult:
    """Run the reader registered as ``name`` (see :data:`CORPORA`): ``CORPORA[name](source, out, **kw)``.

    ``source`` may be omitted for ``hedgewars`` (Debian's install location is used).

    Raises
    ------
    ValueError
        ``name`` is not a known corpus (the message lists them), ``out`` is missing, or ``source``
        is missing for a corpus that needs it; and what the reader raises (FileNotFoundError,
        OSError for an ``out`` that cannot be written, ValueError, ManifestError).
    """
    reader = CORPORA.get(str(name).lower())
    if reader is None:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    if out is None:
        raise ValueError(f"{name}: the output manifest path (out) is required")
    if source is None and reader is not hedgewars_prepare:
        raise ValueError(f"{name}: a source is required")
    return reader(source, out, **kw)
