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
import json
import math
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

from sqlalchemy import (JSON, DateTime, Float, Integer, String, Text, create_engine, delete, event, insert, select,
                        update)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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


@functools.cache
def _select_all(table_name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """``SELECT`` of every column of a table, oldest row first, as SQL text for the sqlite3
    connection itself; with the column names and those holding JSON.

    The mirror is loaded with it rather than through SQLAlchemy: SQLAlchemy compiles and
    caches statements per engine, and every store (one per device) has its own engine, so
    each device would pay ~1 ms of compilation per table whenever its process starts."""
    table = _Base.metadata.tables[table_name]
    names = tuple(c.name for c in table.columns)
    key = next(iter(table.primary_key.columns)).name
    sql = f'SELECT {", ".join(chr(34) + n + chr(34) for n in names)} FROM "{table.name}" ORDER BY "{key}"'
    return sql, names, tuple(c.name for c in table.columns if isinstance(c.type, JSON))


def _rows(sqlite, model) -> Iterable[SimpleNamespace]:
    """Every row of ``model``'s table through the sqlite3 connection ``sqlite``, JSON decoded."""
    sql, names, json_columns = _select_all(model.__tablename__)
    for values in sqlite.execute(sql):
        row = dict(zip(names, values))
        for k in json_columns:
            row[k] = None if row[k] is None else json.loads(row[k])
        yield SimpleNamespace(**row)


@functools.cache
def _schema_script() -> str:
    """The ``CREATE TABLE`` / ``CREATE INDEX`` statements of every table (``IF NOT EXISTS``),
    compiled once per process for SQLite: a new store runs them as one script instead of
    ``metadata.create_all`` (which checks and compiles table by table, ~6 ms a store)."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    dialect = sqlite.dialect()
    parts = []
    for table in _Base.metadata.sorted_tables:
        parts.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)).strip() + ";")
        parts += [str(CreateIndex(ix, if_not_exists=True).compile(dialect=dialect)).strip() + ";"
                  for ix in sorted(table.indexes, key=lambda ix: ix.name)]
    return "\n".join(parts)


#: Most stores that hold an open connection at once in one process. Each holds 3 file
#: descriptors (the database, its write-ahead log and shared-memory index); a simulation
#: runs one store per cooperative device, and 1024 descriptors is a common per-process
#: limit. Past the cap the least recently used store lets its connection go and reopens
#: it (and reloads its tables, ~4 ms) when next used.
MAX_OPEN_STORES = 128

_open_lock = threading.Lock()
_open: "OrderedDict[int, weakref.ref]" = OrderedDict()  # id(store) -> store, least recent first


def _note_open(store: "DeviceStore") -> None:
    """Mark ``store`` as the most recently used open store and release the connections of
    the least recently used ones beyond :data:`MAX_OPEN_STORES` (skipping any busy in
    another thread)."""
    key = id(store)
    with _open_lock:
        ref = _open.get(key)
        if ref is not None and ref() is store:
            _open.move_to_end(key)
            return
        _open[key] = weakref.ref(store)  # new, or an id reused after a store was collected unclosed
        _open.move_to_end(key)
        excess = len(_open) - MAX_OPEN_STORES
        if excess <= 0:
            return
        victims = []
        for k, ref in list(_open.items()):
            if len(victims) >= excess or k == key:
                break
            other = ref()
            if other is None:
                del _open[k]
                excess -= 1
            elif other._lock.acquire(blocking=False):
                if other._conn is not None and other._conn.in_transaction():
                    other._lock.release()  # mid-write in this very thread: leave it
                    continue
                del _open[k]
                victims.append(other)
    for other in victims:
        try:
            other._release()
        finally:
            other._lock.release()


def _forget_open(store: "DeviceStore") -> None:
    with _open_lock:
        _open.pop(id(store), None)


def _pseudo_dict(r) -> dict[str, Any]:
    return {"clip": r.clip, "emotion": r.emotion, "arousal": r.arousal, "valence": r.valence,
            "confidence": r.confidence, "round_added": r.round_added, "round_dropped": r.round_dropped,
            "reason": r.reason}


def _queue_dict(r) -> dict[str, Any]:
    av_guess = None if r.arousal_guess is None or r.valence_guess is None else [r.arousal_guess, r.valence_guess]
    return {"clip": r.clip, "duration": r.duration, "guesses": list(r.guesses or []), "av_guess": av_guess,
            "uncertainty": r.uncertainty, "round_queued": r.round_queued, "status": r.status, "note": r.note}


def _answer_dict(r) -> dict[str, Any]:
    return {"clip": r.clip, "emotion": r.emotion, "arousal": r.arousal, "valence": r.valence,
            "source": r.source, "n_raters": r.n_raters, "rater_labels": list(r.rater_labels or []),
            "round": r.round}


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    """A caller's own copy of a mirrored row: its lists copied, and the lists inside them
    (a queue item's ``guesses`` are ``[[label, probability], ...]``)."""
    return {k: [list(x) if isinstance(x, list) else x for x in v] if isinstance(v, list) else v
            for k, v in row.items()}


class DeviceStore:
    """Cooperative-learning state of one device, in ``<data_dir>/cooperative.db``.

    Parameters
    ----------
    data_dir : path
        The device's data directory (created when missing).
    create : bool
        Create the file when missing (False: raise FileNotFoundError instead; used by the
        labelling session, which must not invent an empty queue in a mistyped folder).

    Every method that changes something commits before it returns. Reads are served from a
    mirror of the tables in memory, which this object's own writes keep current; before a read
    or a write it asks SQLite whether *another* connection committed since (``PRAGMA
    data_version``: a labelling session answering queries) and reloads the mirror if so. A
    write takes SQLite's write lock first (``BEGIN IMMEDIATE``), so no other process commits
    between that check and the write. A cooperative step reads the same tables ~10 times a
    round: each read was a query (~1 ms through SQLAlchemy), now a dictionary copy.

    At most :data:`MAX_OPEN_STORES` stores of a process keep their connection open; the
    least recently used beyond that close theirs and reopen it on their next use.
    """

    def __init__(self, data_dir: str | Path, *, create: bool = True) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.path = self.data_dir / STORE_FILE
        fresh = not self.path.exists()
        if fresh:
            if not create:
                raise FileNotFoundError(f"no label queue in {self.data_dir} (no {STORE_FILE})")
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.path.resolve()}",
                                    connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        if fresh:
            raw = self.engine.raw_connection()
            try:
                raw.driver_connection.executescript(_schema_script())
            finally:
                raw.close()
        else:
            _Base.metadata.create_all(self.engine)
            _add_missing_columns(self.engine)  # an older store: add the tables and columns it lacks
        self._lock = threading.RLock()
        self._conn = None  # one connection for every read and write (data_version is per connection)
        self._sqlite = None  # its sqlite3 connection
        self._mirror: dict[str, Any] | None = None
        self._unchecked = 0  # depth of unchecked_reads() blocks
        self._version = None
        with self._lock:  # the connection that set the schema up, now held (and counted)
            self._connection()

    # -- connection, mirror ------------------------------------------------------------
    def _connection(self):
        if self._conn is None:
            self._conn = self.engine.connect()
            self._sqlite = self._conn.connection.driver_connection
            # SQLAlchemy then issues no BEGIN of its own: we say when a transaction starts.
            self._sqlite.isolation_level = None
        _note_open(self)
        return self._conn

    def _release(self) -> None:
        """Close the connection and its file descriptors (caller holds ``self._lock``). The
        mirror goes too: ``data_version`` is per connection, so a new one cannot tell whether
        another process wrote meanwhile; the next use reconnects and reloads."""
        if self._conn is not None:
            self._conn.close()
            self._conn = self._sqlite = None
        self._mirror = self._version = None
        self.engine.dispose()

    def _data_version(self) -> int:
        self._connection()
        return self._sqlite.execute("PRAGMA data_version").fetchone()[0]

    def _load(self, in_transaction: bool) -> None:
        """(Re)read every table into the mirror, in one snapshot."""
        self._connection()
        sqlite = self._sqlite
        if not in_transaction:
            sqlite.execute("BEGIN")
        try:
            pseudo = [_pseudo_dict(r) for r in _rows(sqlite, PseudoLabel)]
            queue = {r.clip: _queue_dict(r) for r in _rows(sqlite, QueueItem)}
            answers = {r.clip: _answer_dict(r) for r in _rows(sqlite, Answer)}
            meta = {r.key: r.value for r in _rows(sqlite, Meta)}
        finally:
            if not in_transaction:
                sqlite.execute("COMMIT")
        self._mirror = {"pseudo": pseudo, "queue": queue, "answers": answers, "meta": meta}

    def _current(self, in_transaction: bool = False) -> dict[str, Any]:
        """The mirror, reloaded first if another connection committed since it was read."""
        version = self._data_version()
        if self._mirror is None or version != self._version:
            self._load(in_transaction)
            self._version = version
        return self._mirror

    @contextlib.contextmanager
    def _writing(self):
        """A write transaction holding SQLite's write lock, with the mirror current; yields
        (connection, mirror). The caller changes both; on an error the mirror is dropped."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.begin():
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    yield conn, self._current(in_transaction=True)
            except BaseException:
                self._mirror = None
                raise

    def _reading(self):
        with self._lock:
            if self._unchecked and self._mirror is not None:
                return self._mirror
            return self._current()

    @contextlib.contextmanager
    def unchecked_reads(self):
        """Within the block, reads are served from the mirror without asking SQLite whether
        another connection committed (a ``PRAGMA`` per read, ~10 a cooperative step); a
        labelling session's answers given meanwhile are seen after the block. Writes always
        ask, under the write lock, so nothing is ever lost or written twice."""
        with self._lock:
            self._unchecked += 1
        try:
            yield self
        finally:
            with self._lock:
                self._unchecked -= 1

    def close(self) -> None:
        """Release the database connection (the file stays)."""
        with self._lock:
            self._release()
        _forget_open(self)

    def __enter__(self) -> "DeviceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``."""
        self.update_meta({key: value})

    def update_meta(self, values: Mapping[str, Any]) -> None:
        """Store several JSON-serialisable values (``{key: value}``) in one transaction."""
        if not values:
            return
        table = Meta.__table__
        with self._writing() as (conn, mirror):
            conn.execute(delete(table).where(table.c.key.in_(list(values))))
            conn.execute(insert(table), [{"key": k, "value": v} for k, v in values.items()])
            mirror["meta"].update(json.loads(json.dumps(dict(values))))

    def get_meta(self, key: str, default: Any = None) -> Any:
        meta = self._reading()["meta"]
        return json.loads(json.dumps(meta[key])) if key in meta else default

    # -- pseudo-labels ----------------------------------------------------------------
    def add_pseudo(self, server_round: int, items: Iterable[dict[str, Any]]) -> int:
        """Accept pseudo-labels: each item has ``clip`` and any of ``emotion``, ``arousal``,
        ``valence``, ``confidence``. A clip with an active pseudo-label keeps the old one.

        Returns
        -------
        int
            Pseudo-labels added.
        """
        items = list(items)
        if not items:
            return 0
        with self._writing() as (conn, mirror):
            active = {r["clip"] for r in mirror["pseudo"] if r["round_dropped"] is None}
            new = []
            for i in items:
                if i["clip"] in active:
                    continue
                active.add(i["clip"])
                new.append({"clip": i["clip"], "emotion": i.get("emotion", ""), "arousal": i.get("arousal"),
                            "valence": i.get("valence"), "confidence": float(i.get("confidence", 0.0)),
                            "round_added": server_round, "round_dropped": None, "reason": ""})
            if new:
                conn.execute(insert(PseudoLabel.__table__), new)
                mirror["pseudo"].extend(new)
            return len(new)

    def drop_pseudo(self, server_round: int, clips: Iterable[str], reason: str = "") -> int:
        """Drop the active pseudo-labels of ``clips`` (kept in the history). Returns how many."""
        clips = set(clips)
        if not clips:
            return 0
        table = PseudoLabel.__table__
        with self._writing() as (conn, mirror):
            hit = [r for r in mirror["pseudo"] if r["round_dropped"] is None and r["clip"] in clips]
            if hit:
                conn.execute(update(table).where(table.c.round_dropped.is_(None), table.c.clip.in_(clips))
                             .values(round_dropped=server_round, reason=reason))
                for r in hit:
                    r["round_dropped"], r["reason"] = server_round, reason
            return len(hit)

    def active_pseudo(self) -> dict[str, dict[str, Any]]:
        """The pseudo-labels in force, ``{clip: {...}}``, oldest first."""
        return {r["clip"]: _copy(r) for r in self._reading()["pseudo"] if r["round_dropped"] is None}

    def pseudo_history(self, clip: str | None = None) -> list[dict[str, Any]]:
        """Every pseudo-label ever accepted (of one clip, or all), oldest first."""
        return [_copy(r) for r in self._reading()["pseudo"] if clip is None or r["clip"] == clip]

    # -- label queue ------------------------------------------------------------------
    def enqueue(self, server_round: int, items: Iterable[dict[str, Any]]) -> int:
        """Queue clips for a human label; each item has ``clip`` and optionally ``duration``,
        ``guesses`` (``[[label, probability], ...]``, best first), ``av_guess`` (the model's
        ``[arousal, valence]`` on the label scale) and ``uncertainty``. A clip queued before
        (whatever its status) is not queued again. Returns how many were queued."""
        items = list(items)
        if not items:
            return 0
        with self._writing() as (conn, mirror):
            new = {}
            for i in items:
                if i["clip"] in mirror["queue"] or i["clip"] in new:
                    continue
                a, v = (None, None) if i.get("av_guess") is None else (float(x) for x in i["av_guess"])
                new[i["clip"]] = {"clip": i["clip"], "duration": i.get("duration"),
                                  "guesses": json.loads(json.dumps(i.get("guesses", []))),
                                  "arousal_guess": a, "valence_guess": v,
                                  "uncertainty": float(i.get("uncertainty", 0.0)), "round_queued": server_round,
                                  "status": PENDING, "note": ""}
            if new:
                conn.execute(insert(QueueItem.__table__), list(new.values()))
                for clip, row in new.items():
                    mirror["queue"][clip] = _queue_dict(SimpleNamespace(**row))
            return len(new)

    def pending(self) -> list[dict[str, Any]]:
        """Queued clips still waiting for a label, in the order they were queued."""
        return [_copy(q) for q in self._reading()["queue"].values() if q["status"] == PENDING]

    def queue(self) -> list[dict[str, Any]]:
        """Every clip ever queued, with its status, in queue order."""
        return [_copy(q) for q in self._reading()["queue"].values()]

    def queued_clips(self) -> set[str]:
        """Clips ever queued (pending, answered or dropped): each clip is asked about once."""
        return set(self._reading()["queue"])

    def drop_queued(self, clip: str, note: str) -> None:
        """Take a pending clip off the queue (e.g. its file has gone), saying why."""
        table = QueueItem.__table__
        with self._writing() as (conn, mirror):
            item = mirror["queue"].get(clip)
            if item is not None and item["status"] == PENDING:
                conn.execute(update(table).where(table.c.clip == clip)
                             .values(status=DROPPED, note=note, updated_at=_now()))
                item["status"], item["note"] = DROPPED, note

    # -- answers ----------------------------------------------------------------------
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
        self.answer_many([{"clip": clip, "emotion": emotion, "arousal": arousal, "valence": valence,
                           "source": source, "n_raters": n_raters, "rater_labels": rater_labels,
                           "server_round": server_round}])

    def answer_many(self, items: Iterable[dict[str, Any]]) -> int:
        """Store several human labels in one transaction (the simulated raters answer a
        round's queue at once); each item has :meth:`answer`'s arguments as keys (``clip``
        required). Returns how many were stored.

        Raises
        ------
        ValueError
            As :meth:`answer`, for any item (then nothing is stored).
        """
        rows = []
        for i in items:
            arousal, valence = i.get("arousal"), i.get("valence")
            _check_av(arousal, valence)
            rows.append({"clip": i["clip"], "emotion": i.get("emotion", ""),
                         "arousal": None if arousal is None else float(arousal),
                         "valence": None if valence is None else float(valence), "source": i.get("source", "person"),
                         "n_raters": int(i.get("n_raters", 1)),
                         "rater_labels": json.loads(json.dumps(list(i.get("rater_labels") or []))),
                         "round": i.get("server_round")})
        if not rows:
            return 0
        answers, queue = Answer.__table__, QueueItem.__table__
        with self._writing() as (conn, mirror):
            for row in rows:
                clip = row["clip"]
                if clip in mirror["answers"]:
                    conn.execute(update(answers).where(answers.c.clip == clip).values(**row))
                else:
                    conn.execute(insert(answers).values(**row))
                item = mirror["queue"].get(clip)
                if item is not None:
                    conn.execute(update(queue).where(queue.c.clip == clip).values(status=ANSWERED, updated_at=_now()))
                    item["status"] = ANSWERED
                mirror["answers"][clip] = row
        return len(rows)

    def answers(self) -> dict[str, dict[str, Any]]:
        """Every human label, ``{clip: {...}}``, oldest first."""
        return {c: _copy(a) for c, a in self._reading()["answers"].items()}

    def effort(self) -> int:
        """Human effort so far: rater answers summed over all answers."""
        return sum(a["n_raters"] for a in self._reading()["answers"].values())
