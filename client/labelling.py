"""``fedaffect device label``: the device's person labels the clips its model asked about.

Dynamic active learning (:mod:`client.cooperative`) puts the clips the model is least certain
about into the device's label queue (:class:`client.device_store.DeviceStore`, under the
device's data directory). This session goes through the pending clips one at a time:

* it shows the clip's path, its duration and the model's top guesses (unless ``guesses`` is
  off: a shown guess anchors the person's answer, so a study that wants unprompted labels
  hides them), and plays it (``p``) when an audio player is installed (``aplay``,
  ``paplay``, ``ffplay`` or ``play``);
* it takes the answers the run's task uses (:func:`parse_answer`; the device records its
  task in the store every round, a store without one is taken as ``emotion``):

  - a categorical label (tasks ``emotion`` and ``both``), by name (``anger``), a common
    adjective (``angry``, ``happy``: :data:`ALIASES`), unique prefix (``ang``) or number
    (``1``);
  - arousal and valence (tasks ``av`` and ``both``) as ``a=0.6 v=-0.2`` (or
    ``arousal=0.6 valence=-0.2``), each a number in [-1, 1], the scale of the manifest
    (:mod:`shared_models.manifest`): -1 calm / negative, +1 excited / positive;
  - or both at once, ``happy a=0.6 v=0.2`` (task ``both``; task ``av`` also keeps an added
    label, which it does not train on);

  an invalid answer is refused with a message naming what is wrong and asked again; ``s``
  skips a clip (it stays queued), ``?`` lists the labels, ``q`` (or end of input) quits;
* every answer is stored the moment it is given, so an interrupted session loses nothing;
* a queued clip whose file has gone is dropped from the queue with a warning; one whose
  folder has gone, or a queue none of whose files can be found in folders that are missing
  or empty (a drive not mounted), is kept and reported, unless ``drop_missing``.

Answered clips join the device's labelled set at its next federated round, with their
arousal/valence where given (:meth:`client.cooperative.CoopState.training_data`).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from shared_models.manifest import EMOTIONS

from .device_store import STORE_FILE, DeviceStore

__all__ = ["label_session", "parse_label", "parse_answer", "LabelAnswer", "AnswerError", "ALIASES",
           "find_player", "PLAYERS"]

log = logging.getLogger("fedaffect.client.labelling")

#: Audio players tried in order, with the arguments that make them play once and quietly.
PLAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aplay", ("-q",)),
    ("paplay", ()),
    ("ffplay", ("-nodisp", "-autoexit", "-loglevel", "quiet")),
    ("play", ("-q",)),
)


#: Adjectives people type for the emotion classes of :data:`shared_models.manifest.EMOTIONS`
#: (used only when the class is one of the device's labels).
ALIASES: dict[str, str] = {
    "angry": "anger", "bored": "boredom", "disgusted": "disgust", "afraid": "fear", "scared": "fear",
    "fearful": "fear", "happy": "happiness", "glad": "happiness", "sad": "sadness", "surprised": "surprise",
}

#: Tasks whose answers carry a categorical label / arousal and valence.
_EMOTION_TASKS, _AV_TASKS = ("emotion", "both"), ("av", "both")
_AV_KEYS = {"a": "arousal", "arousal": "arousal", "v": "valence", "valence": "valence"}
_AV_EXAMPLE = "a=0.6 v=-0.2"


class AnswerError(ValueError):
    """An answer the session cannot store; the message says what is wrong."""


@dataclass(frozen=True)
class LabelAnswer:
    """One parsed answer.

    Attributes
    ----------
    emotion : str
        The categorical label, ``""`` when none was given.
    arousal, valence : float or None
        In [-1, 1] (the manifest's scale); both given or both None.
    """

    emotion: str = ""
    arousal: float | None = None
    valence: float | None = None

    def __str__(self) -> str:
        parts = [self.emotion] if self.emotion else []
        if self.arousal is not None:
            parts.append(f"arousal {self.arousal:+.2f}, valence {self.valence:+.2f}")
        return ", ".join(parts)


def find_player(which: Callable[[str], str | None] = shutil.which, clip: str | Path | None = None) -> list[str] | None:
    """The command line (without the file) of the first installed player, or None.

    ``aplay`` is skipped for a ``clip`` that is not a WAV file: it plays any other format
    (FLAC, Ogg, MP3) as raw 8-bit samples, i.e. loud noise.
    """
    wav = clip is None or Path(clip).suffix.lower() == ".wav"
    for name, args in PLAYERS:
        if name == "aplay" and not wav:
            continue
        path = which(name)
        if path:
            return [path, *args]
    return None


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names: exact name (any case), an adjective of :data:`ALIASES`
    (``happy`` for ``happiness``), unique prefix, or 1-based number.

    Returns None when the answer names no label (or a prefix matches several).
    """
    answer = text.strip().lower()
    if not answer:
        return None
    if answer.isdecimal() and answer.isascii():  # "²" is a digit to isdigit, not to int
        i = int(answer)
        return labels[i - 1] if 1 <= i <= len(labels) else None
    if answer in labels:
        return answer
    if ALIASES.get(answer) in labels:
        return ALIASES[answer]
    matches = [label for label in labels if label.startswith(answer)]
    return matches[0] if len(matches) == 1 else None


def _av_value(name: str, text: str) -> float:
    """One arousal or valence value: a finite number in [-1, 1]."""
    if not text:
        raise AnswerError(f"{name} needs a number in [-1, 1] after '=', e.g. {_AV_EXAMPLE}")
    try:
        value = float(text)
    except ValueError:
        hint = f"; write decimals with a point ({text.replace(',', '.')})" if "," in text else ""
        raise AnswerError(f"{name} {text!r} is not a number{hint}") from None
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise AnswerError(f"{name} {text} is outside [-1, 1] (-1 low, 0 neutral, +1 high)")
    return value


def parse_answer(text: str, labels: Sequence[str], task: str = "emotion") -> LabelAnswer:
    """Parse one answer of the labelling session for a run of task ``task``.

    An answer is whitespace-separated parts: at most one categorical label (as
    :func:`parse_label` reads it) and ``a=<number>``/``v=<number>`` (also ``arousal=``,
    ``valence=``, ``:`` for ``=``, spaces around it allowed) for arousal and valence, in any
    order, e.g. ``happy``, ``a=0.6 v=0.2`` or ``happy a=0.6 v=0.2``. Arousal and valence are
    numbers in [-1, 1], the manifest's scale (:mod:`shared_models.manifest`).

    What the task needs:

    ``emotion``
        a label; arousal/valence are refused (the run does not learn them);
    ``av``
        both arousal and valence; a label may be added (stored, not trained on);
    ``both``
        a label, or both arousal and valence, or all three.

    Parameters
    ----------
    text : str
        What the person typed.
    labels : sequence of str
        The emotion classes valid as answers (lower case), in menu order.
    task : {"emotion", "av", "both"}

    Returns
    -------
    LabelAnswer

    Raises
    ------
    AnswerError
        Naming what is wrong: an unknown label (the message starts ``not a label: '...'``),
        two labels, a value that is not a number or outside [-1, 1], arousal or valence
        given twice or alone, or an answer the task cannot use.
    """
    if task not in ("emotion", "av", "both"):
        raise ValueError(f"unknown task {task!r}; known: emotion, av, both")
    # "a = 0.6" -> "a=0.6"; "a= v=0" stays two parts (a space before a letter ends a part)
    clean = re.sub(r"([=:])\s+(?=[^a-z\s])", r"\1", re.sub(r"\s+([=:])", r"\1", text.strip().lower()))
    parts = [p.strip(",;") for p in clean.split()]
    words, av = [], {}
    for part in filter(None, parts):
        key, sep, value = part.partition("=") if "=" in part else part.partition(":")
        if not sep:
            words.append(part)
            continue
        if key not in _AV_KEYS:
            raise AnswerError(f"{part!r}: only a= (arousal) and v= (valence) take a value, e.g. {_AV_EXAMPLE}")
        name = _AV_KEYS[key]
        if name in av:
            raise AnswerError(f"{name} given twice")
        av[name] = _av_value(name, value)
    if len(words) > 1:
        hint = f"; give arousal and valence as {_AV_EXAMPLE}" if task in _AV_TASKS else ""
        raise AnswerError(f"one label per clip, got {', '.join(repr(w) for w in words)}{hint}")
    emotion = ""
    if words:
        emotion = parse_label(words[0], labels) or ""
        if not emotion:
            raise AnswerError(f"not a label: {words[0]!r}")
    if av and task not in _AV_TASKS:
        raise AnswerError("this run learns emotion categories only: answer with a label, without a= or v=")
    if len(av) == 1:
        missing = ({"arousal", "valence"} - set(av)).pop()
        raise AnswerError(f"{missing} is missing: give arousal and valence together, e.g. {_AV_EXAMPLE}")
    if task == "emotion" and not emotion:
        raise AnswerError("not a label: ''")
    if task == "av" and not av:
        raise AnswerError(f"this run learns arousal and valence: give both, e.g. {_AV_EXAMPLE}")
    if task == "both" and not emotion and not av:
        raise AnswerError(f"give a label, or arousal and valence ({_AV_EXAMPLE}), or both")
    return LabelAnswer(emotion, av.get("arousal"), av.get("valence"))


def _duration(item: dict) -> float | None:
    if item.get("duration"):
        return float(item["duration"])
    try:
        import soundfile as sf

        return float(sf.info(item["clip"]).duration)
    except Exception:  # noqa: BLE001 - the duration is only shown
        return None


def _unmounted(folder: Path) -> bool:
    """Whether ``folder`` looks like a drive that is not mounted: missing, or an empty mount point."""
    try:
        return not folder.is_dir() or not any(folder.iterdir())
    except OSError:
        return True


def label_session(data_dir: str | Path, *, stdin: TextIO, stdout: TextIO, play: bool = True,
                  player: Sequence[str] | None = None,
                  run: Callable[..., object] = subprocess.run, drop_missing: bool = False,
                  guesses: bool = True) -> dict[str, int]:
    """Go through the device's pending queue, asking ``stdin`` for an answer per clip.

    The answers taken depend on the run's task, read from the store's meta ``task``
    (``emotion`` when absent): see :func:`parse_answer`.

    Parameters
    ----------
    data_dir : path
        The device's data directory (its ``cooperative.db`` holds the queue).
    stdin, stdout : text streams
        Where answers come from and prompts go.
    play : bool
        Offer ``p`` to play a clip when a player is available.
    player : sequence of str, optional
        Player command line (without the file); default :func:`find_player`.
    run : callable
        Runs the player (``subprocess.run``; replaceable in tests).
    drop_missing : bool
        Drop every queued clip whose file cannot be found, even when its folder is missing
        (recordings deleted with their folder, not a drive that is not mounted).
    guesses : bool
        Show the model's guesses for each clip. Off, the person labels unprompted: shown
        guesses anchor annotators' answers towards the model's (the labels then confirm the
        model's mistakes instead of correcting them).

    Returns
    -------
    dict
        ``answered``, ``dropped`` (files gone), ``unreachable`` (kept in the queue: the clip's
        folder is missing, or every queued clip is, as when the drive holding the
        recordings is not mounted), ``skipped``, ``left`` (still pending at the end) and
        ``quit`` (1 when the person quit before the end).

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` does not exist.
    """
    data_dir = Path(data_dir).expanduser()
    counts = {"answered": 0, "dropped": 0, "unreachable": 0, "skipped": 0, "left": 0, "quit": 0}

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    if not (data_dir / STORE_FILE).exists():
        say(f"No label queue in {data_dir} yet: the device queues clips during federated rounds "
            "in mode 'active' or 'cooperative'.")
        return counts
    with DeviceStore(data_dir, create=False) as store:
        labels = [str(e) for e in (store.get_meta("emotions") or EMOTIONS)]
        task = str(store.get_meta("task") or "emotion")  # a store from before the task was recorded
        if task not in ("emotion", "av", "both"):
            say(f"warning: the store names an unknown task {task!r}; taking labels and arousal/valence")
            task = "both"
        pending = store.pending()
        if not pending:
            say("Nothing to label: the queue is empty.")
            return counts
        gone = [not Path(item["clip"]).exists() for item in pending]
        if (not drop_missing and len(pending) > 1 and all(gone)
                and all(_unmounted(Path(item["clip"]).parent) for item in pending)):
            # Every file at once, in folders that are missing or empty: a drive that is not
            # mounted, not clips deleted one by one.
            counts["left"] = counts["unreachable"] = len(pending)
            say(f"None of the {len(pending)} queued clips can be found (e.g. {pending[0]['clip']}): is the "
                "drive or folder holding the recordings mounted? The queue is kept as it is "
                "(--drop-missing drops them).")
            return counts
        chosen = player  # None: the installed player that can play each clip (find_player)
        if play and player is None:
            player = find_player()
        menu = "  ".join(f"{i} {label}" for i, label in enumerate(labels, 1))
        scale = ""
        if task in _AV_TASKS:
            scale = (f"arousal and valence: numbers in [-1, 1] (-1 calm / negative, +1 excited / positive) as "
                     f"{_AV_EXAMPLE}" + ("; a label, arousal/valence, or both" if task == "both" else
                                         " (required); a label may be added"))
        say(f"{len(pending)} clip(s) to label in {data_dir}")
        say(f"labels: {menu}")
        if scale:
            say(scale)
        keys = "p play, s skip, ? labels, q quit" if play and player else "s skip, ? labels, q quit"
        prompt = {"emotion": "label", "av": "arousal and valence", "both": "label and/or arousal, valence"}[task]
        for n, item in enumerate(pending, 1):
            path = Path(item["clip"])
            if not drop_missing and not path.exists() and not path.parent.is_dir():  # unmounted, not deleted
                counts["unreachable"] += 1
                log.warning("queued clip %s: its folder %s is missing; kept in the label queue", path, path.parent)
                say(f"warning: {path} cannot be reached (its folder {path.parent} is missing); kept in the queue "
                    "(--drop-missing drops it)")
                continue
            if not path.exists():
                store.drop_queued(item["clip"], "file not found")
                counts["dropped"] += 1
                log.warning("queued clip %s has gone; dropped from the label queue", path)
                say(f"warning: {path} has gone; dropped from the label queue")
                continue
            duration = _duration(item)
            shown = ", ".join(f"{g[0]} {100 * float(g[1]):.0f}%" for g in item.get("guesses") or []) if guesses else ""
            av_guess = item.get("av_guess") if guesses and task in _AV_TASKS else None
            say()
            say(f"[{n}/{len(pending)}] {path}" + (f"  ({duration:.1f} s)" if duration else ""))
            if shown and task in _EMOTION_TASKS:
                say(f"  the model's guesses: {shown}")
            if av_guess:
                say(f"  the model's guess: arousal {av_guess[0]:+.2f}, valence {av_guess[1]:+.2f}")
            while True:
                stdout.write(f"  {prompt} ({keys}): ")
                stdout.flush()
                line = stdin.readline()
                if not line:  # end of input: as good as quitting
                    answer = "q"
                    say()
                else:
                    answer = line.strip().lower()
                if answer == "q":
                    counts["quit"] = 1
                    break
                if answer == "s":
                    counts["skipped"] += 1
                    break
                if answer == "?":
                    say(f"  labels: {menu}")
                    if scale:
                        say(f"  {scale}")
                    continue
                if answer == "p":
                    cmd = chosen or find_player(clip=path)
                    if play and cmd:
                        try:
                            run([*cmd, str(path)], check=False, timeout=120)
                        except (OSError, subprocess.SubprocessError) as err:
                            say(f"  could not play the clip: {err}")
                    else:
                        say("  no audio player available (aplay, paplay, ffplay or play)")
                    continue
                try:
                    parsed = parse_answer(answer, labels, task)
                except AnswerError as err:  # say what is wrong and ask again
                    say(f"  {err}" + (f"; answer with one of: {menu}" if str(err).startswith("not a label") else ""))
                    continue
                store.answer(item["clip"], parsed.emotion, arousal=parsed.arousal, valence=parsed.valence,
                             source="person", n_raters=1)
                counts["answered"] += 1
                say(f"  saved: {parsed}")
                break
            if counts["quit"]:
                break
        counts["left"] = len(store.pending())
    say(f"answered {counts['answered']}, skipped {counts['skipped']}, dropped {counts['dropped']} (file gone)"
        + (f", {counts['unreachable']} unreachable (kept)" if counts["unreachable"] else "") + "; "
        f"{counts['left']} still queued." + (" Answers join the training set at the device's next round."
                                            if counts["answered"] else ""))
    return counts
