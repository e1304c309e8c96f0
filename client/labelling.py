"""``fedaffect device label``: the device's person labels the clips its model asked about.

Dynamic active learning (:mod:`client.cooperative`) puts the clips the model is least certain
about into the device's label queue (:class:`client.device_store.DeviceStore`, under the
device's data directory). This session goes through the pending clips one at a time:

* it shows the clip's path, its duration and the model's top guesses, and plays it (``p``)
  when an audio player is installed (``aplay``, ``paplay``, ``ffplay`` or ``play``);
* it takes a label, by name (``anger``), unique prefix (``ang``) or number (``1``); an
  invalid answer is refused and asked again; ``s`` skips a clip (it stays queued), ``?``
  lists the labels, ``q`` (or end of input) quits;
* every answer is stored the moment it is given, so an interrupted session loses nothing;
* a queued clip whose file has gone is dropped from the queue with a warning.

Answered clips join the device's labelled set at its next federated round.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence, TextIO

from shared_models.manifest import EMOTIONS

from .device_store import STORE_FILE, DeviceStore

__all__ = ["label_session", "parse_label", "find_player", "PLAYERS"]

log = logging.getLogger("fedaffect.client.labelling")

#: Audio players tried in order, with the arguments that make them play once and quietly.
PLAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aplay", ("-q",)),
    ("paplay", ()),
    ("ffplay", ("-nodisp", "-autoexit", "-loglevel", "quiet")),
    ("play", ("-q",)),
)


def find_player(which: Callable[[str], str | None] = shutil.which) -> list[str] | None:
    """The command line (without the file) of the first installed player, or None."""
    for name, args in PLAYERS:
        path = which(name)
        if path:
            return [path, *args]
    return None


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names: exact name (any case), unique prefix, or 1-based number.

    Returns None when the answer names no label (or a prefix matches several).
    """
    answer = text.strip().lower()
    if not answer:
        return None
    if answer.isdigit():
        i = int(answer)
        return labels[i - 1] if 1 <= i <= len(labels) else None
    if answer in labels:
        return answer
    matches = [label for label in labels if label.startswith(answer)]
    return matches[0] if len(matches) == 1 else None


def _duration(item: dict) -> float | None:
    if item.get("duration"):
        return float(item["duration"])
    try:
        import soundfile as sf

        return float(sf.info(item["clip"]).duration)
    except Exception:  # noqa: BLE001 - the duration is only shown
        return None


def label_session(data_dir: str | Path, *, stdin: TextIO, stdout: TextIO, play: bool = True,
                  player: Sequence[str] | None = None,
                  run: Callable[..., object] = subprocess.run) -> dict[str, int]:
    """Go through the device's pending queue, asking ``stdin`` for a label per clip.

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

    Returns
    -------
    dict
        ``answered``, ``dropped`` (files gone), ``skipped``, ``left`` (still pending at the
        end) and ``quit`` (1 when the person quit before the end).

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` does not exist.
    """
    data_dir = Path(data_dir).expanduser()
    counts = {"answered": 0, "dropped": 0, "skipped": 0, "left": 0, "quit": 0}

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
        pending = store.pending()
        if not pending:
            say("Nothing to label: the queue is empty.")
            return counts
        if play and player is None:
            player = find_player()
        menu = "  ".join(f"{i} {label}" for i, label in enumerate(labels, 1))
        say(f"{len(pending)} clip(s) to label in {data_dir}")
        say(f"labels: {menu}")
        keys = "p play, s skip, ? labels, q quit" if play and player else "s skip, ? labels, q quit"
        for n, item in enumerate(pending, 1):
            path = Path(item["clip"])
            if not path.exists():
                store.drop_queued(item["clip"], "file not found")
                counts["dropped"] += 1
                log.warning("queued clip %s has gone; dropped from the label queue", path)
                say(f"warning: {path} has gone; dropped from the label queue")
                continue
            duration = _duration(item)
            guesses = ", ".join(f"{g[0]} {100 * float(g[1]):.0f}%" for g in item.get("guesses") or [])
            say()
            say(f"[{n}/{len(pending)}] {path}" + (f"  ({duration:.1f} s)" if duration else ""))
            if guesses:
                say(f"  the model's guesses: {guesses}")
            while True:
                stdout.write(f"  label ({keys}): ")
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
                    continue
                if answer == "p":
                    if play and player:
                        try:
                            run([*player, str(path)], check=False, timeout=120)
                        except (OSError, subprocess.SubprocessError) as err:
                            say(f"  could not play the clip: {err}")
                    else:
                        say("  no audio player available (aplay, paplay, ffplay or play)")
                    continue
                label = parse_label(answer, labels)
                if label is None:
                    say(f"  not a label: {answer!r}; answer with one of: {menu}")
                    continue
                store.answer(item["clip"], label, source="person", n_raters=1)
                counts["answered"] += 1
                say(f"  saved: {label}")
                break
            if counts["quit"]:
                break
        counts["left"] = len(store.pending())
    say(f"answered {counts['answered']}, skipped {counts['skipped']}, dropped {counts['dropped']} (file gone); "
        f"{counts['left']} still queued." + (" Answers join the training set at the device's next round."
                                            if counts["answered"] else ""))
    return counts
