"""The device's own store of cooperative learning: pseudo-labels, label queue and answers.

Flower keeps a device's ``context.state`` in memory for one run only, so what a device learns
about its unlabelled clips lives in a SQLite file under its data directory
(``<data-dir>/cooperative.db``; simulation: ``<run-dir>/<run-name>/devices/<device>/``),
written through SQLAlchemy, one transaction per change. A device that restarts (or a
labelling session that is interrupted) finds everything it had.

Tables
------
``pseudo_labels``
    One row per pseudo-label ever accepted, with the round it was added and, once the model
    stopped supporting it, the round it was dropped and why: the history of every machine
    label (Zhang et al., "Enhanced semi-supervised learning for multimodal emotion
    recognition", ICASSP 2016, re-evaluate machine labels every iteration). The *active*
    pseudo-labels are the rows not dropped.
``label_queue``
    Clips the device wants its person (or, in simulation, the simulated raters) to label:
    path, duration, the model's top categorical guesses, its arousal/valence guess (label
    scale [-1, 1], tasks ``av`` and ``both``), its uncertainty, the round queued and the
    status ``pending``, ``answered`` or ``dropped`` (with a note, e.g. the file has gone).
``answers``
    One human label per clip: emotion (``""`` when none was given) and arousal/valence
    (both or neither, each in [-1, 1] as in the manifest), who gave it (``person`` or
    ``oracle``), how many rater answers it cost (human effort) and the rater answers
    themselves.
``meta``
    Small JSON values: ``emotions`` (the emotion classes valid as answers) and ``task``
    (``emotion``, ``av`` or ``both``: which answers the run uses), written by the device
    every round (:meth:`client.cooperative.CoopState.after_training`).

Clips are identified by their path as the device's manifest names it.

Schema changes
--------------
A store written by an older version still opens: tables it lacks are created, and columns
added since (nullable only, e.g. ``label_queue.arousal_guess``/``valence_guess``) are added
with ``ALTER TABLE ... ADD COLUMN`` (old rows get NULL) when the store is opened
(:func:`_add_missing_columns`). Columns are never dropped or renamed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import pickle
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, create_engine, event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = ["DeviceStore", "STORE_FILE", "PENDING", "ANSWERED", "DROPPED"]

STORE_FILE = "cooperative.db"
PENDING, ANSWERED, DROPPED = "pending", "answered", "dropped"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class _Base(DeclarativeBase):
    pass


class PseudoLabel(_Base):
    """A machine label of one clip, from the round it was added to the round it was dropped."""

    __tablename__ = "pseudo_labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clip: Mapped[str] = mapped_column(Text, index=True)
    emotion: Mapped[str] = mapped_column(String(40), default="")
    arousal: Mapped[float | None] = mapped_column(Float, nullable=True)
    valence: Mapped[float | None] = mapped_column(Float, nullable=True)
    confidence: Mapped[float] = mapped_column(Float, default=0.0)
    round_added: Mapped[int] = mapped_column(Integer)
    round_dropped: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class QueueItem(_Base):
    """A clip waiting for (or having had) a human label."""

    __tablename__ = "label_queue"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clip: Mapped[str] = mapped_column(Text, unique=True)
    duration: Mapped[float | None] = mapped_column(Float, nullable=True)
    guesses: Mapped[list] = mapped_column(JSON, default=list)
    arousal_guess: Mapped[float | None] = mapped_column(Float, nullable=True)  # added after v1: nullable
    valence_guess: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertainty: Mapped[float] = mapped_column(Float, default=0.0)
    round_queued: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20), default=PENDING, index=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Answer(_Base):
    """The human label of one clip."""

    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clip: Mapped[str] = mapped_column(Text, unique=True)
    emotion: Mapped[str] = mapped_column(String(40), default="")
    arousal: Mapped[float | None] = mapped_column(Float, nullable=True)
    valence: Mapped[float | None] = mapped_column(Float, nullable=True)
    source: Mapped[str] = mapped_column(String(20), default="person")
    n_raters: Mapped[int] = mapped_column(Integer, default=1)
    rater_labels: Mapped[list] = mapped_column(JSON, default=list)
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Meta(_Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


def _sqlite_pragmas(connection, _record) -> None:
    """Write-ahead log with normal sync: a commit survives the process being killed (an
    interrupted labelling session loses no answer) at a fraction of the cost of a full sync."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _add_missing_columns(engine) -> list[str]:
    """Add the model's nullable columns that an older store's tables lack (in place).

    ``create_all`` creates missing tables but never alters existing ones; a column added to a
    model since a store was written is added here with ``ALTER TABLE ... ADD COLUMN`` (SQLite
    fills old rows with NULL). Two processes opening the same old store at once (the device
    and a labelling session) may race: a "duplicate column" error from the loser is ignored.

    Returns
    -------
    list of str
        ``table.column`` of every column added.

    Raises
    ------
    RuntimeError
        If a missing column is not nullable (it would need a default for the old rows: a
        programming error, caught by the tests).
    """
    added = []
    with engine.begin() as conn:
        for table in _Base.metadata.sorted_tables:
            have = {row[1] for row in conn.exec_driver_sql(f'PRAGMA table_info("{table.name}")')}
            for col in table.columns:
                if col.name in have:
                    continue
                if not col.nullable or col.primary_key:
                    raise RuntimeError(f"store column {table.name}.{col.name} is missing and not nullable")
                kind = col.type.compile(dialect=engine.dialect)
                try:
                    conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {kind}')
                except OperationalError as err:  # another process added it first
                    if "duplicate column" not in str(err).lower():
                        raise
                added.append(f"{table.name}.{col.name}")
    return added


def _check_av(arousal: float | None, valence: float | None) -> None:
    """Arousal and valence: both None, or both finite numbers in [-1, 1] (the manifest's scale)."""
    if (arousal is None) != (valence is None):
        raise ValueError(f"arousal and valence go together: got arousal={arousal!r}, valence={valence!r}")
    for name, v in (("arousal", arousal), ("valence", valence)):
        if v is not None and not (math.isfinite(float(v)) and -1.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be a number in [-1, 1], got {v!r}")


def _columns(model):
    """``SELECT`` of every column of ``model``'s table: plain rows (attribute access by column
    name), several times faster to read than ORM objects."""
    return select(*model.__table__.c)


def _pseudo_dict(r: PseudoLabel) -> dict[str, Any]:
    return {"clip": r.clip, "emotion": r.emotion, "arousal": r.arousal, "valence": r.valence,
            "confidence": r.confidence, "round_added": r.round_added, "round_dropped": r.round_dropped,
            "reason": r.reason}


def _queue_dict(r: QueueItem) -> dict[str, Any]:
    av_guess = None if r.arousal_guess is None or r.valence_guess is None else [r.arousal_guess, r.valence_guess]
    return {"clip": r.clip, "duration": r.duration, "guesses": list(r.guesses or []), "av_guess": av_guess,
            "uncertainty": r.uncertainty, "round_queued": r.round_queued, "status": r.status, "note": r.note}


def _answer_dict(r: Answer) -> dict[str, Any]:
    return {"clip": r.clip, "emotion": r.emotion, "arousal": r.arousal, "valence": r.valence,
            "source": r.source, "n_raters": r.n_raters, "rater_labels": list(r.rater_labels or []),
            "round": r.round}


def _read(*tables: str):
    """A read of the store's ``tables``, served from :meth:`DeviceStore.cached`'s snapshot
    while one is open. The snapshot keeps the result pickled, so every caller gets its own
    copy (callers may change what they get; a pickle round trip is ~10x cheaper than
    ``copy.deepcopy`` for these rows)."""

    def decorate(method):
        @functools.wraps(method)
        def read(self, *args, **kwargs):
            if self._cache is None:
                return method(self, *args, **kwargs)
            key = (method.__name__, args, tuple(sorted(kwargs.items())))
            if key not in self._cache:
                self._cache[key] = (frozenset(tables), pickle.dumps(method(self, *args, **kwargs), -1))
            return pickle.loads(self._cache[key][1])

        return read

    return decorate


def _write(*tables: str):
    """A change to the store's ``tables``: drops the snapshot's reads of those tables (reads
    of other tables stay valid: a new pseudo-label does not change the answers)."""

    def decorate(method):
        @functools.wraps(method)
        def write(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                if self._cache:
                    for key in [k for k, (read, _) in self._cache.items() if read & set(tables)]:
                        del self._cache[key]

        return write

    return decorate


class DeviceStore:
    """Cooperative-learning state of one device, in ``<data_dir>/cooperative.db``.

    Parameters
    ----------
    data_dir : path
        The device's data directory (created when missing).
    create : bool
        Create the file when missing (False: raise FileNotFoundError instead; used by the
        labelling session, which must not invent an empty queue in a mistyped folder).

    Every method that changes something commits before it returns.
    """

    def __init__(self, data_dir: str | Path, *, create: bool = True) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.path = self.data_dir / STORE_FILE
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no label queue in {self.data_dir} (no {STORE_FILE})")
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.path.resolve()}", connect_args={"timeout": 30})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        _Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)  # an older store: add the columns it lacks
        self._cache: dict | None = None

    @contextlib.contextmanager
    def cached(self):
        """Within the block, repeated reads are answered from memory until this store object
        changes the table they read (its own writes drop those reads: a new pseudo-label
        drops ``active_pseudo``, not ``answers``). Changes made meanwhile by *another* process
        (a labelling session) are seen after the block. Used by a device's cooperative step,
        which reads the same tables several times a round."""
        outer = self._cache
        self._cache = {} if outer is None else outer
        try:
            yield self
        finally:
            self._cache = outer

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        """Release the database connections (the file stays)."""
        self.engine.dispose()

    def __enter__(self) -> "DeviceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------
    @_write("meta")
    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``."""
        with self._session() as s:
            s.merge(Meta(key=key, value=value))
            s.commit()

    @_read("meta")
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._session() as s:
            row = s.get(Meta, key)
            return default if row is None else row.value

    # -- pseudo-labels ----------------------------------------------------------------
    @_write("pseudo")
    def add_pseudo(self, server_round: int, items: Iterable[dict[str, Any]]) -> int:
        """Accept pseudo-labels: each item has ``clip`` and any of ``emotion``, ``arousal``,
        ``valence``, ``confidence``. A clip with an active pseudo-label keeps the old one.

        Returns
        -------
        int
            Pseudo-labels added.
        """
        items = list(items)
        with self._session() as s:
            active = set(s.scalars(select(PseudoLabel.clip).where(PseudoLabel.round_dropped.is_(None))))
            new = [PseudoLabel(round_added=server_round, **{k: v for k, v in i.items() if k in
                                                            ("clip", "emotion", "arousal", "valence", "confidence")})
                   for i in items if i["clip"] not in active]
            s.add_all(new)
            s.commit()
            return len(new)

    @_write("pseudo")
    def drop_pseudo(self, server_round: int, clips: Iterable[str], reason: str = "") -> int:
        """Drop the active pseudo-labels of ``clips`` (kept in the history). Returns how many."""
        clips = set(clips)
        if not clips:
            return 0
        with self._session() as s:
            rows = s.scalars(select(PseudoLabel).where(PseudoLabel.round_dropped.is_(None), PseudoLabel.clip.in_(clips)))
            n = 0
            for row in rows:
                row.round_dropped, row.reason, n = server_round, reason, n + 1
            s.commit()
            return n

    @_read("pseudo")
    def active_pseudo(self) -> dict[str, dict[str, Any]]:
        """The pseudo-labels in force, ``{clip: {...}}``."""
        with self._session() as s:
            rows = s.execute(_columns(PseudoLabel).where(PseudoLabel.round_dropped.is_(None)).order_by(PseudoLabel.id))
            return {r.clip: _pseudo_dict(r) for r in rows}

    @_read("pseudo")
    def pseudo_history(self, clip: str | None = None) -> list[dict[str, Any]]:
        """Every pseudo-label ever accepted (of one clip, or all), oldest first."""
        with self._session() as s:
            q = _columns(PseudoLabel).order_by(PseudoLabel.id)
            if clip is not None:
                q = q.where(PseudoLabel.clip == clip)
            return [_pseudo_dict(r) for r in s.execute(q)]

    # -- label queue ------------------------------------------------------------------
    @_write("queue")
    def enqueue(self, server_round: int, items: Iterable[dict[str, Any]]) -> int:
        """Queue clips for a human label; each item has ``clip`` and optionally ``duration``,
        ``guesses`` (``[[label, probability], ...]``, best first), ``av_guess`` (the model's
        ``[arousal, valence]`` on the label scale) and ``uncertainty``. A clip queued before
        (whatever its status) is not queued again. Returns how many were queued."""
        items = list(items)
        with self._session() as s:
            known = set(s.scalars(select(QueueItem.clip)))
            new = []
            for i in items:
                if i["clip"] in known:
                    continue
                a, v = (None, None) if i.get("av_guess") is None else (float(x) for x in i["av_guess"])
                new.append(QueueItem(clip=i["clip"], duration=i.get("duration"), guesses=i.get("guesses", []),
                                     arousal_guess=a, valence_guess=v,
                                     uncertainty=float(i.get("uncertainty", 0.0)), round_queued=server_round))
            s.add_all(new)
            s.commit()
            return len(new)

    @_read("queue")
    def pending(self) -> list[dict[str, Any]]:
        """Queued clips still waiting for a label, in the order they were queued."""
        with self._session() as s:
            rows = s.execute(_columns(QueueItem).where(QueueItem.status == PENDING).order_by(QueueItem.id))
            return [_queue_dict(r) for r in rows]

    @_read("queue")
    def queue(self) -> list[dict[str, Any]]:
        """Every clip ever queued, with its status, in queue order."""
        with self._session() as s:
            return [_queue_dict(r) for r in s.execute(_columns(QueueItem).order_by(QueueItem.id))]

    @_read("queue")
    def queued_clips(self) -> set[str]:
        """Clips ever queued (pending, answered or dropped): each clip is asked about once."""
        with self._session() as s:
            return set(s.scalars(select(QueueItem.clip)))

    @_write("queue")
    def drop_queued(self, clip: str, note: str) -> None:
        """Take a pending clip off the queue (e.g. its file has gone), saying why."""
        with self._session() as s:
            row = s.scalar(select(QueueItem).where(QueueItem.clip == clip))
            if row is not None and row.status == PENDING:
                row.status, row.note, row.updated_at = DROPPED, note, _now()
                s.commit()

    # -- answers ----------------------------------------------------------------------
    @_write("answers", "queue")
    def answer(self, clip: str, emotion: str = "", *, arousal: float | None = None, valence: float | None = None,
               source: str = "person", n_raters: int = 1, rater_labels: list | None = None,
               server_round: int | None = None) -> None:
        """Store the human label of ``clip`` and mark its queue entry answered, in one
        transaction (an interrupted labelling session loses no answer already given).

        ``emotion`` is ``""`` when only arousal/valence were given; ``arousal`` and
        ``valence`` go together (both or neither), each in [-1, 1].

        Raises
        ------
        ValueError
            For only one of arousal/valence, or a value outside [-1, 1] (nothing is stored).
        """
        _check_av(arousal, valence)
        arousal = None if arousal is None else float(arousal)
        valence = None if valence is None else float(valence)
        with self._session() as s:
            row = s.scalar(select(Answer).where(Answer.clip == clip))
            if row is None:
                row = Answer(clip=clip)
                s.add(row)
            row.emotion, row.arousal, row.valence, row.source = emotion, arousal, valence, source
            row.n_raters, row.rater_labels, row.round = int(n_raters), list(rater_labels or []), server_round
            item = s.scalar(select(QueueItem).where(QueueItem.clip == clip))
            if item is not None:
                item.status, item.updated_at = ANSWERED, _now()
            s.commit()

    @_read("answers")
    def answers(self) -> dict[str, dict[str, Any]]:
        """Every human label, ``{clip: {...}}``."""
        with self._session() as s:
            return {r.clip: _answer_dict(r) for r in s.execute(_columns(Answer).order_by(Answer.id))}

    def effort(self) -> int:
        """Human effort so far: rater answers summed over all answers."""
        return sum(a["n_raters"] for a in self.answers().values())
