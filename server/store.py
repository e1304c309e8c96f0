"""The run store: runs, rounds, per-device and per-group metrics, and checkpoints.

SQLAlchemy 2 ORM over any SQLAlchemy URL; by default a SQLite file
``<run-dir>/fedaffect.db``. The coordinator writes one row per round as soon as the round
ends, so a crash loses at most the round in flight. Checkpoints are files next to the
store; the store keeps their SHA-256 so a corrupt file is detected and the previous one
used (:meth:`RunStore.latest_checkpoint`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = ["RunStore", "default_store_url", "utc_iso", "CONFUSION_KEY", "Run", "Round", "DeviceMetric", "GroupMetric",
           "Checkpoint", "EnrolledDevice"]


#: Key of a round's metrics holding the pooled confusion counts of its evaluation (a C x C
#: list of ints, rows true class, columns predicted, classes in the run's ``emotions`` order).
CONFUSION_KEY = "confusion"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def utc_iso(value: dt.datetime | str | None) -> str:
    """A time as ISO 8601 in UTC to the second, ``2026-11-23T07:04:19Z`` (empty for none).

    Takes what the registry and Flower give: datetimes with a zone (PostgreSQL), without one
    (SQLite keeps none; the store writes UTC) and ISO texts (Flower's ``2026-11-23
    07:04:19Z``). A text that is not a time is returned as it is.
    """
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One federated run (one fold of a cross-validation is one run)."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running, completed, failed
    engine: Mapped[str] = mapped_column(String(40), default="")
    config: Mapped[dict] = mapped_column(JSON)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Round(Base):
    """Aggregated metrics of one round (round 0 = the initial model)."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class DeviceMetric(Base):
    """What one device reported in one round (train or evaluate)."""

    __tablename__ = "device_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    phase: Mapped[str] = mapped_column(String(20))  # train, evaluate
    metrics: Mapped[dict] = mapped_column(JSON)


class GroupMetric(Base):
    """A metric of one protected group (e.g. gender=female) in one round."""

    __tablename__ = "group_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    attribute: Mapped[str] = mapped_column(String(100))
    group: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(50))
    value: Mapped[float] = mapped_column(Float)


#: Between a device's name and its row id in the name of a kept earlier enrolment
#: (``phone-07~3``): never in a device name (:func:`shared_models.security.check_device_name`).
SUPERSEDED_MARK = "~"


class EnrolledDevice(Base):
    """A device enrolled with the coordinator (the fedaffect device registry).

    Flower's SuperLink keeps the registered public keys and node ids; the registry adds
    what fedaffect needs: a human name, the device's protected-group attributes, and when
    it was enrolled and revoked. ``node_id`` is Flower's (uint64, kept as text).

    A revoked name enrolled again keeps its old row, revoked key and time included: names
    are unique in the table, so the old row is renamed ``NAME~ID`` (:attr:`superseded`;
    :attr:`device_name` is still ``NAME``). No column was added for this, so stores written
    before open unchanged.
    """

    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    node_id: Mapped[str] = mapped_column(String(24), index=True)
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(100))
    groups: Mapped[dict] = mapped_column(JSON, default=dict)
    enrolled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def superseded(self) -> bool:
        """True for an earlier enrolment of a name that was enrolled again (always revoked)."""
        return SUPERSEDED_MARK in self.name

    @property
    def device_name(self) -> str:
        """The device's name (an earlier enrolment's row name without its ``~ID``)."""
        return self.name.split(SUPERSEDED_MARK, 1)[0]


class Checkpoint(Base):
    """A saved global model and the SHA-256 of its file."""

    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))


def default_store_url(run_dir: str | Path) -> str:
    """SQLite URL of the default store in ``run_dir`` (created if missing)."""
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'fedaffect.db'}"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_dumps(value: Any) -> str:
    """JSON columns store NaN and infinities as null: PostgreSQL rejects them, and app.py stores null too."""
    return json.dumps(_finite(value))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RunStore:
    """Read and write runs in a SQLAlchemy database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:///runs/fedaffect.db`` or
        ``postgresql+psycopg://user@host/db``. Tables are created when missing. A plain
        ``postgresql://`` URL uses the psycopg (3) driver.

    Raises
    ------
    ConnectionError
        If the database cannot be reached or opened (the message shows the URL without
        its password).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = make_url(url)
            parsed.get_dialect()  # an unknown scheme (bogus://) fails here, not as an import error later
        except (ArgumentError, NoSuchModuleError) as err:
            raise ConnectionError(f"run store URL {url!r} is not a database URL SQLAlchemy knows "
                                  f"(e.g. sqlite:///runs/fedaffect.db, postgresql://user@host/db): {err}") from None
        if parsed.drivername in ("postgresql", "postgres"):  # plain PostgreSQL URL: use psycopg 3
            parsed = parsed.set(drivername="postgresql+psycopg")
        self._shown = parsed.render_as_string(hide_password=True)  # for messages: no password
        connect_args = {"timeout": 30} if parsed.drivername.startswith("sqlite") else {}
        if parsed.drivername.startswith("postgresql") and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = 10  # an unreachable host fails in seconds, not minutes
        self.engine = create_engine(parsed, connect_args=connect_args, pool_pre_ping=True, json_serializer=_json_dumps)
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as err:
            self.engine.dispose()
            raise ConnectionError(f"cannot open the run store {self._shown}: {err.orig}".strip()) from None

    @property
    def shown_url(self) -> str:
        """The store's URL with the password hidden (for messages and tables)."""
        return self._shown

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- runs -------------------------------------------------------------------------
    def create_run(self, name: str, config: dict[str, Any], engine: str = "") -> Run:
        """Create a run named ``name``.

        Raises
        ------
        ValueError
            If a run of that name exists already.
        """
        with self._session() as s:
            if s.scalar(select(Run).where(Run.name == name)) is not None:
                raise ValueError(f"a run named {name!r} exists already in {self._shown}")
            run = Run(name=name, config=dict(config), engine=engine, summary={})
            s.add(run)
            s.commit()
            return run

    def get_run(self, ref: str | int) -> Run:
        """A run by name or numeric id.

        Raises
        ------
        KeyError
            If there is no such run.
        """
        with self._session() as s:
            run = s.scalar(select(Run).where(Run.name == str(ref)))
            if run is None and str(ref).isdigit() and int(ref) < 2**31:  # ids are 32-bit in PostgreSQL
                run = s.get(Run, int(ref))
            if run is None:
                raise KeyError(f"no run {ref!r} in {self._shown}")
            return run

    def find_run(self, ref: str | int) -> Run | None:
        """A run by name or numeric id, or None where :meth:`get_run` would raise KeyError."""
        try:
            return self.get_run(ref)
        except KeyError:
            return None

    def list_runs(self) -> list[Run]:
        """All runs, oldest first."""
        with self._session() as s:
            return list(s.scalars(select(Run).order_by(Run.id)))

    def finish_run(self, run_id: int, status: str, summary: dict | None = None, error: str = "") -> None:
        """Mark a run ``completed`` or ``failed`` and store its summary or error."""
        with self._session() as s:
            run = s.get(Run, run_id)
            run.status, run.error, run.finished_at = status, error, _now()
            if summary is not None:
                run.summary = summary
            s.commit()

    def fail_unfinished(self, ref: str | int, error: str) -> bool:
        """Mark a run ``failed`` with ``error`` unless it already completed or failed (its
        ServerApp was stopped before it could say so). Returns whether it was marked; a run
        that does not exist is left alone (False)."""
        try:
            run = self.get_run(ref)
        except KeyError:
            return False
        if run.status in ("completed", "failed"):
            return False
        self.finish_run(run.id, "failed", error=error)
        return True

    def reopen_run(self, ref: str | int, config: dict[str, Any]) -> tuple[Run, tuple[int, dict[str, Any]] | None]:
        """Prepare a stored run to be resumed (``fedaffect train --resume RUN``).

        Finds the newest valid checkpoint (:meth:`latest_checkpoint`: a corrupt file is
        skipped for the previous one), deletes the rounds stored after it (they are run
        again, so every stored round matches a model the run continued from), sets the
        run's config to ``config`` and its status back to ``running``.

        Returns
        -------
        (run, checkpoint)
            ``checkpoint`` is ``(round, payload)``, or None when the run has no valid
            checkpoint (it then starts again from round 0; only when it never stored one).
            The rows of the checkpoints after it (corrupt) are deleted with the rounds.

        Raises
        ------
        KeyError
            If there is no such run.
        RuntimeError
            If the run has checkpoints but none can be read (files moved or all corrupt):
            its stored rounds are kept and the run is not resumed.
        """
        run = self.get_run(ref)
        checkpoint = self.latest_checkpoint(run.id)
        last = checkpoint[0] if checkpoint else -1
        with self._session() as s:
            if checkpoint is None:
                paths = list(s.scalars(select(Checkpoint.path).where(Checkpoint.run_id == run.id)))
                if paths:  # moved or unreadable files are no reason to throw stored rounds away
                    raise RuntimeError(f"run {run.name}: none of its {len(paths)} checkpoints can be read "
                                       f"({', '.join(paths)}); refusing to discard its stored rounds")
            for table in (Round, DeviceMetric, GroupMetric, Checkpoint):
                for row in s.scalars(select(table).where(table.run_id == run.id, table.round > last)):
                    s.delete(row)
            row = s.get(Run, run.id)
            row.status, row.error, row.finished_at, row.config = "running", "", None, dict(config)
            s.commit()
        return self.get_run(run.id), checkpoint

    # -- rounds -----------------------------------------------------------------------
    def add_round(
        self,
        run_id: int,
        server_round: int,
        metrics: dict[str, Any],
        devices: Iterable[dict[str, Any]] = (),
        groups: Iterable[tuple[str, str, str, float]] = (),
    ) -> None:
        """Store one round in one transaction.

        Parameters
        ----------
        run_id, server_round : int
        metrics : dict
            Aggregated metrics of the round (JSON-serialisable).
        devices : iterable of dict
            Each with ``device``, ``role``, ``phase`` and ``metrics``.
        groups : iterable of (attribute, group, metric, value)
        """
        with self._session() as s:
            s.add(Round(run_id=run_id, round=server_round, metrics=metrics))
            s.add_all(DeviceMetric(run_id=run_id, round=server_round, **d) for d in devices)
            s.add_all(
                GroupMetric(run_id=run_id, round=server_round, attribute=a, group=g, metric=m, value=v)
                for a, g, m, v in groups
            )
            s.commit()

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """Aggregated metrics of every stored round, ``[{"round": r, **metrics}]``."""
        with self._session() as s:
            rows = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round))
            return [{"round": r.round, **r.metrics} for r in rows]

    def device_metrics(self, run_id: int) -> list[dict[str, Any]]:
        """Per-device rows, ``[{"round", "device", "role", "phase", **metrics}]``."""
        with self._session() as s:
            rows = s.scalars(
                select(DeviceMetric).where(DeviceMetric.run_id == run_id).order_by(DeviceMetric.id)
            )
            return [
                {"round": r.round, "device": r.device, "role": r.role, "phase": r.phase, **r.metrics}
                for r in rows
            ]

    def group_metrics(self, run_id: int) -> list[dict[str, Any]]:
        """Per-group rows, ``[{"round", "attribute", "group", "metric", "value"}]``."""
        with self._session() as s:
            rows = s.scalars(select(GroupMetric).where(GroupMetric.run_id == run_id).order_by(GroupMetric.id))
            return [
                {"round": r.round, "attribute": r.attribute, "group": r.group, "metric": r.metric, "value": r.value}
                for r in rows
            ]

    # -- device registry ----------------------------------------------------------------
    def enrol_device(self, name: str, node_id: int | str, public_key: str, fingerprint: str,
                     groups: dict[str, str] | None = None, *, force: bool = False) -> EnrolledDevice:
        """Record an enrolled device.

        A revoked device's name can be enrolled again (with a new key); the old row is kept
        as an earlier enrolment (:attr:`EnrolledDevice.superseded`), so the revoked key and
        when it was revoked stay known.

        Parameters
        ----------
        force : bool
            Enrol a public key that was revoked before (it may have leaked).

        Raises
        ------
        ValueError
            If an active device has that name or that public key already, or (without
            ``force``) the key was revoked.
        """
        with self._session() as s:
            for row in self._enrolment_rows(s, name, public_key, force=force):
                if row.name == name:  # revoked: kept under another name, which frees this one
                    row.name = f"{name}{SUPERSEDED_MARK}{row.id}"
            s.flush()
            device = EnrolledDevice(name=name, node_id=str(node_id), public_key=public_key,
                                    fingerprint=fingerprint, groups=dict(groups or {}))
            s.add(device)
            s.commit()
            return device

    def check_enrolable(self, name: str, public_key: str, *, force: bool = False) -> None:
        """Refuse a name or key an active device holds, or a revoked key unless ``force``
        (before anything is registered).

        Raises
        ------
        ValueError
            If an active device has that name or that public key already, or (without
            ``force``) the key was revoked.
        """
        with self._session() as s:
            self._enrolment_rows(s, name, public_key, force=force)

    @staticmethod
    def _enrolment_rows(s: Session, name: str, public_key: str, *, force: bool = False) -> list[EnrolledDevice]:
        """Revoked rows with this name or key; raises ValueError for an active one, and for a
        revoked key unless ``force``."""
        rows = list(s.scalars(select(EnrolledDevice).where(
            (EnrolledDevice.name == name) | (EnrolledDevice.public_key == public_key)).order_by(EnrolledDevice.id)))
        for row in rows:
            if row.revoked_at is None:
                what = "name" if row.name == name else "public key"
                raise ValueError(f"a device with this {what} is enrolled already: {row.name!r}")
        revoked = [row for row in rows if row.public_key == public_key]
        if revoked and not force:
            row = revoked[-1]
            raise ValueError(
                f"this public key ({row.fingerprint}) was revoked on {utc_iso(row.revoked_at).replace('T', ' ')} "
                f"(device {row.device_name!r}): a revoked key may be in other hands. Enrol a new key (on the "
                "device: move keys/ away and run `fedaffect device init`), or pass --force if you know this "
                "key is safe")
        return rows

    def revoke_device(self, name: str) -> EnrolledDevice:
        """Mark a device revoked (it stays listed, with the time).

        Raises
        ------
        KeyError
            If no active device has that name.
        """
        with self._session() as s:
            row = s.scalar(select(EnrolledDevice).where(EnrolledDevice.name == name,
                                                        EnrolledDevice.revoked_at.is_(None)))
            if row is None:
                raise KeyError(f"no enrolled device named {name!r}")
            row.revoked_at = _now()
            s.commit()
            return row

    def enrolled_devices(self, include_revoked: bool = True, include_superseded: bool = False) -> list[EnrolledDevice]:
        """Enrolled devices, oldest first: one row a name (its latest enrolment), and with
        ``include_superseded`` the earlier, revoked enrolments of names enrolled again."""
        with self._session() as s:
            query = select(EnrolledDevice).order_by(EnrolledDevice.id)
            if not include_revoked:
                query = query.where(EnrolledDevice.revoked_at.is_(None))
            return [row for row in s.scalars(query) if include_superseded or not row.superseded]

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, run_id: int, server_round: int, payload: dict[str, Any], folder: Path, keep: int = 3) -> Path:
        """Save a checkpoint file atomically, record its hash, keep the newest ``keep``.

        Parameters
        ----------
        payload : dict
            What to save with :func:`torch.save` (model state dict, round, config...).
        folder : Path
            Directory of the run's checkpoints.
        """
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"round-{server_round:04d}.pt"
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        with self._session() as s:
            for row in s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id,
                                                          Checkpoint.round == server_round)):
                s.delete(row)  # a round run again (resumed run): its file was just replaced
            s.add(Checkpoint(run_id=run_id, round=server_round, path=str(path), sha256=digest))
            old = list(
                s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round.desc()))
            )[keep:]
            for row in old:
                Path(row.path).unlink(missing_ok=True)
                s.delete(row)
            s.commit()
        return path

    def latest_checkpoint(self, run_id: int) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint whose file exists and matches its hash.

        Returns
        -------
        (round, payload) or None
            None when no valid checkpoint exists. Corrupt files are skipped.
        """
        with self._session() as s:
            rows = list(
                s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round.desc()))
            )
        for row in rows:
            path = Path(row.path)
            if path.exists() and _sha256(path) == row.sha256:
                return row.round, torch.load(path, weights_only=True)  # tensors and plain values only
        return None
