"""The coordinator of a real federation: state directory, SuperLink, enrolment, runs.

Built on Flower's Deployment Engine; fedaffect adds the state directory, certificates,
the device registry and run submission. What ``fedaffect server ...`` and ``fedaffect
train`` do:

``init``
    create the state directory: a certificate authority and a TLS server certificate for
    the coordinator's host names (:mod:`shared_models.security`), ``server.toml``
    (:class:`ServerConfig`), the run store and the ``flwr`` CLI's connection to the
    SuperLink;
``start``
    run ``flower-superlink`` in the foreground with TLS, SuperNode authentication,
    ``--disable-runtime-dependency-installation``, its SQLite state
    (``superlink.db``: nodes and Flower runs) and a rotating log file in the state
    directory; SIGTERM/SIGINT stop it and everything it started;
``enrol`` / ``unenrol`` / ``devices``
    register a device's P-384 public key with the SuperLink (``flwr supernode register``)
    and record its name and group attributes in the registry (the run store's
    ``devices`` table); revoke it (``flwr supernode unregister``); list devices with their
    online status from the SuperLink;
``train``
    submit the Flower app (``server.app:app`` + ``client.app:app``) to the SuperLink with
    a run config, stream the run's progress, and return the run's real status (Flower's
    and the store's: ``flwr run`` exits 0 on failed runs); ``resume=RUN`` continues a
    stored run from its last valid checkpoint.

State directory layout::

    server.toml              coordinator config (ServerConfig)
    certs/ca.crt ca.key      the federation's CA (ca.crt goes to every device)
    certs/server.crt .key    the SuperLink's TLS certificate
    superlink.db             Flower's SuperLink state (nodes, runs)
    logs/superlink.log       SuperLink log (Flower's, rotated daily, 14 kept)
    logs/superlink.out       its console output, rotated at 10 MiB, 5 kept (LogPump)
    flower/config.toml       FLWR_HOME of the flwr CLI: connection "fedaffect"
    runs/                    default run store (fedaffect.db), checkpoints, run logs, reports
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import difflib
import logging
import socket
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w
from sqlalchemy.engine import make_url

from shared_models.config import ConfigError, RunConfig, resumed_values
from shared_models.security import (
    CertificateError, check_certificate, check_device_name, fingerprint, make_ca, make_server_certificate,
    read_device_public_key, write_certificate, write_private, write_private_key,
)
from server.store import Run, RunStore, utc_iso
from shared_models.processes import BIN, TAIL_LINES, flower_environment, run_foreground
from server.superlink import flwr_cli, follow_run, json_from, stage_app, wait_healthy, write_flower_config

__all__ = [
    "ServerConfig", "StatePaths", "DEFAULT_EMOTIONS", "init_server", "superlink_command", "start_server",
    "enrol_device", "unenrol_device", "list_devices", "train", "TrainResult", "RESUME_KEYS", "stored_run",
]

log = logging.getLogger("fedaffect.deployment")

#: Name of the SuperLink connection in the state directory's Flower config.
CONNECTION = "fedaffect"

#: Default classes of the categorical head in a real federation (EmoDB's seven): devices
#: map their labels onto these; other labels count as unlabelled.
DEFAULT_EMOTIONS = "anger,boredom,disgust,fear,happiness,neutral,sadness"


@dataclass(frozen=True)
class StatePaths:
    """Where everything of a coordinator lives, under ``root`` (the state directory)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "server.toml"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.certs / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.certs / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.certs / "server.key"

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def flower_home(self) -> Path:
        return self.root / "flower"

    @property
    def runs(self) -> Path:
        return self.root / "runs"


@dataclass
class ServerConfig:
    """The coordinator's ``server.toml``.

    Attributes
    ----------
    host : str
        Address the SuperLink listens on (``0.0.0.0``: every interface).
    port : int
        The SuperLink's one HTTPS port (Fleet, Control and Runtime APIs; default 8000).
    names : list of str
        Host names and IP addresses devices reach the coordinator by; each is in the
        server certificate.
    store_url : str
        SQLAlchemy URL of the run store (empty: SQLite in ``runs/fedaffect.db``;
        PostgreSQL: ``postgresql://user:pass@host/db``).
    emotions : str
        Comma-separated classes of the categorical head.
    run_defaults : dict
        Run-config defaults for ``fedaffect train`` (e.g. ``{"round-timeout": 300}``).
    """

    host: str = "0.0.0.0"
    port: int = 8000
    names: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])
    store_url: str = ""
    emotions: str = DEFAULT_EMOTIONS
    run_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "ServerConfig":
        """Read ``server.toml``.

        Raises
        ------
        FileNotFoundError
            If the state directory was never initialised.
        ConfigError
            For an unknown key (named) or a bad run default.
        """
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `fedaffect server init --state-dir {path.parent}` first")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: {err}") from None
        known = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, known, n=1)
            hint = (" (a run-config key: put it under [run-defaults])" if key.replace("_", "-") in RunConfig.keys()
                    else f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(sorted(known))}")
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        cfg = cls(**{known[k]: v for k, v in data.items()})
        cfg.check()
        if not isinstance(cfg.run_defaults, dict):
            raise ConfigError(f"{path}: 'run-defaults' must be a table ([run-defaults] with key = value lines)")
        try:  # names a bad run default now, not at train time
            RunConfig.from_mapping(cfg.run_defaults)
        except ConfigError as err:
            raise ConfigError(f"{path} [run-defaults]: {err}") from None
        return cfg

    def check(self) -> None:
        """Raise ConfigError for a port outside 1-65535 (named), before any file is written
        or a SuperLink refuses it at start-up."""
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"key 'port' = {self.port!r}: must be a TCP port, 1-65535")

    def save(self, path: Path) -> None:
        """Write ``server.toml``, readable by its owner only (its store URL may hold a password)."""
        data = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        write_private(path, tomli_w.dumps(data).encode())

    def url(self, paths: StatePaths) -> str:
        """The run store's URL: ``store_url``, or SQLite in the state directory's ``runs/``."""
        return self.store_url or f"sqlite:///{(paths.runs / 'fedaffect.db').resolve()}"

    def store(self, paths: StatePaths) -> RunStore:
        """The run store (created when missing)."""
        paths.runs.mkdir(parents=True, exist_ok=True)
        return RunStore(self.url(paths))

    def address(self) -> str:
        """``host:port`` the coordinator's own ``flwr`` CLI connects to: ``localhost``
        (always in the certificate) when the SuperLink listens on every interface."""
        host = "localhost" if self.host in ("0.0.0.0", "::", "127.0.0.1") else self.host
        return f"{host}:{self.port}"


def _default_names() -> list[str]:
    names = ["localhost", "127.0.0.1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    return names


def _with_local(names: list[str]) -> list[str]:
    """``names`` then localhost and 127.0.0.1 (the coordinator's own CLI connects locally)."""
    return list(dict.fromkeys([*names, "localhost", "127.0.0.1"]))


def init_server(state_dir: Path, *, names: list[str] | None = None, host: str | None = None, port: int | None = None,
                store_url: str = "", emotions: str = DEFAULT_EMOTIONS, renew: bool = False,
                cert_days: int = 825) -> StatePaths:
    """Create (or renew the server certificate of) a coordinator's state directory.

    Parameters
    ----------
    state_dir : Path
    names : list of str, optional
        Host names / IP addresses devices use, for the server certificate (default: this
        machine's host names); localhost and 127.0.0.1 are always added.
    host, port : str, int, optional
        Listening address of the SuperLink (default ``0.0.0.0:8000``; with ``renew``, the
        config's unless given).
    store_url : str
        Run store URL (empty: SQLite in the state directory).
    emotions : str
        Classes of the categorical head.
    renew : bool
        Keep the CA, config and registry; make a new server certificate (new names or
        expiry); ``host``, ``port`` and ``store_url`` replace the config's when given.
        Devices keep working: they trust the CA, not the certificate.
    cert_days : int
        Validity of the server certificate in days.

    Returns
    -------
    StatePaths

    Raises
    ------
    FileExistsError
        If ``state_dir`` holds a coordinator already and ``renew`` is False (re-running
        init would lock out every enrolled device).
    ConfigError
        For a port outside 1-65535.
    ConnectionError
        If ``store_url`` names a database that cannot be reached or a URL SQLAlchemy does not
        know; nothing is written then.
    """
    paths = StatePaths(Path(state_dir).expanduser().resolve())
    if paths.config.exists() and not renew:
        raise FileExistsError(f"{paths.root} holds a coordinator already; use --renew to make a new server "
                              "certificate (the CA and the enrolled devices are kept)")
    if renew:
        cfg = ServerConfig.load(paths.config)
        cfg.names = _with_local(names) if names else cfg.names
        cfg.host = host or cfg.host
        cfg.port = cfg.port if port is None else port
        cfg.store_url = store_url or cfg.store_url
    else:
        cfg = ServerConfig(host=host or "0.0.0.0", port=8000 if port is None else port,
                           names=_with_local(names or _default_names()), store_url=store_url, emotions=emotions)
    cfg.check()
    if store_url:  # an unreachable or mistyped database fails before anything is written
        RunStore(store_url)
    if renew:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    else:
        if not paths.root.exists():  # a folder the operator made keeps the mode they gave it
            paths.root.mkdir(parents=True, mode=0o750)
            paths.root.chmod(0o750)  # mkdir's mode is masked by the umask
        for folder in (paths.certs, paths.logs, paths.runs):
            folder.mkdir(parents=True, exist_ok=True)
        ca, ca_key = make_ca()
        write_certificate(paths.ca_cert, ca)
        write_private_key(paths.ca_key, ca_key)
    cert, key = make_server_certificate(ca, ca_key, cfg.names, days=cert_days)
    write_certificate(paths.server_cert, cert)
    write_private_key(paths.server_key, key)
    cfg.save(paths.config)
    write_flower_config(paths.flower_home, CONNECTION, cfg.address(), paths.ca_cert)
    cfg.store(paths)  # creates the run store's tables (and fails now if PostgreSQL is unreachable)
    return paths


def _load(state_dir: Path) -> tuple[StatePaths, ServerConfig]:
    paths = StatePaths(Path(state_dir).expanduser().resolve())
    return paths, ServerConfig.load(paths.config)


def superlink_command(state_dir: Path) -> list[str]:
    """The ``flower-superlink`` command line of a coordinator (TLS, SuperNode auth on)."""
    paths, cfg = _load(state_dir)
    return [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(paths.ca_cert),
        "--ssl-certfile", str(paths.server_cert),
        "--ssl-keyfile", str(paths.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(paths.superlink_db),
        "--host", cfg.host, "--port", str(cfg.port),
        "--log-file", str(paths.logs / "superlink.log"),
        "--log-rotation-interval-hours", "24", "--log-rotation-backup-count", "14",
    ]


def _check_certificates(paths: StatePaths, cfg: ServerConfig) -> list[str]:
    warnings = check_certificate(paths.ca_cert, must_be_ca=True)
    warnings += check_certificate(paths.server_cert, ca_path=paths.ca_cert, host=cfg.names[0])
    return warnings


def start_server(state_dir: Path, *, ready: Callable[[str], None] | None = None,
                 echo: Callable[[str], None] | None = None) -> int:
    """Run the coordinator's SuperLink in the foreground until it exits or is signalled.

    Checks the certificates first (expired, not signed by the CA: refused with the
    reason), then starts ``flower-superlink`` (:func:`superlink_command`) in its own
    session, waits for it to be healthy, and forwards SIGTERM/SIGINT to it and everything
    it started (SuperExec, ServerApp processes). The run store and Flower's state are on
    disk, so a stopped (or killed) coordinator loses no stored round.

    Parameters
    ----------
    state_dir : Path
    ready : callable, optional
        Called with the SuperLink's address once it is healthy.
    echo : callable, optional
        Receives every SuperLink log line (console output).

    Returns
    -------
    int
        0 after a clean stop by signal, else the SuperLink's exit code.

    Raises
    ------
    CertificateError
        For a bad or missing certificate or key.
    RuntimeError
        If the SuperLink does not start, or its port is taken (another coordinator).
    """
    paths, cfg = _load(state_dir)
    for needed in (paths.ca_cert, paths.server_cert, paths.server_key):
        if not needed.is_file():  # a broken state dir: restarting would not help (exit code 2)
            raise CertificateError(f"{needed} is missing: `fedaffect server init --state-dir {paths.root} --renew` "
                                   "makes a new server certificate and key")
    for warning in _check_certificates(paths, cfg):
        log.warning(warning)
    with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart: old connections in TIME_WAIT
        try:  # the health check below would otherwise be answered by the SuperLink already there
            probe.bind((cfg.host, cfg.port))
        except OSError as err:
            raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port} ({err.strerror}): is a coordinator already "
                               f"running (`fedaffect server start --state-dir {paths.root}`)?") from None

    def healthy(proc: subprocess.Popen, tail: collections.deque) -> None:
        wait_healthy(proc, f"https://{cfg.address()}/health", tail, cafile=paths.ca_cert)
        if ready:
            ready(cfg.address())

    env = flower_environment(paths.flower_home)
    # The ServerApp runs under the SuperLink and inherits this: the run store's URL (and its
    # password) need not travel in run configs, which Flower keeps in superlink.db.
    env["FEDAFFECT_STORE_URL"] = cfg.url(paths)
    return run_foreground(superlink_command(paths.root), env=env, cwd=paths.root,
                          log_path=paths.logs / "superlink.out", ready=healthy, echo=echo)


def _flwr(paths: StatePaths, args: list[str], timeout: float = 60) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` against the coordinator's SuperLink; its JSON."""
    env = flower_environment(paths.flower_home)
    res = flwr_cli([*args, "--format", "json"], env, paths.flower_home, timeout=timeout)
    try:
        data = json_from(res.stdout)
    except ValueError:
        data = {}
    if not data.get("success", False):
        message = data.get("error-message") or (res.stdout + res.stderr).strip()[-500:] or f"exit code {res.returncode}"
        if "Connection refused" in message or "UNAVAILABLE" in message or "connect" in message.lower():
            message += " (is `fedaffect server start` running?)"
        raise RuntimeError(f"flwr {' '.join(args[:2])}: {message}")
    return data


def _parse_groups(groups: dict[str, str] | list[str] | None) -> dict[str, str]:
    if groups is None:
        return {}
    if isinstance(groups, dict):
        return {str(k): str(v) for k, v in groups.items()}
    out = {}
    for item in groups:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"group {item!r} must be attribute=value, e.g. gender=female")
        out[key.strip()] = value.strip()
    return out


def enrol_device(state_dir: Path, name: str, public_key: Path,
                 groups: dict[str, str] | list[str] | None = None, *, force: bool = False) -> dict[str, Any]:
    """Enrol a device: register its public key with the SuperLink and record it.

    Parameters
    ----------
    state_dir : Path
    name : str
        Unique device name (letters, digits, ``-_.``).
    public_key : Path
        The device's ``.pub`` file (EC P-384, OpenSSH; from ``fedaffect device init``).
    groups : dict or list of "attr=value", optional
        The device's protected-group attributes (e.g. ``gender=female``); clips of the
        device whose manifest lacks an attribute take this value.
    force : bool
        Enrol a key that was revoked before (refused otherwise: it may have leaked).

    Returns
    -------
    dict
        ``name``, ``node-id``, ``fingerprint``, ``groups``, and ``replaces``: the revoked
        enrolment of this name that the registry keeps as an earlier one (``fingerprint``,
        ``revoked-at``), or None.

    Raises
    ------
    CertificateError
        For a key that is not an EC P-384 OpenSSH public key.
    ValueError
        For a bad name or group, a name or key enrolled already, or a revoked key without
        ``force``.
    RuntimeError
        If the SuperLink refuses the key or cannot be reached.
    """
    check_device_name(name)
    paths, cfg = _load(state_dir)
    key_line = read_device_public_key(public_key)
    attrs = _parse_groups(groups)
    store = cfg.store(paths)
    store.check_enrolable(name, key_line, force=force)  # before the SuperLink registers the key
    replaced = [r for r in store.enrolled_devices() if r.name == name]  # revoked: an active one was refused
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "device.pub"
        key_file.write_text(key_line + "\n")
        data = _flwr(paths, ["supernode", "register", str(key_file), CONNECTION, "--name", name])
    node_id = str(data["node-id"])
    store.enrol_device(name, node_id, key_line, fingerprint(key_line), attrs, force=force)
    return {"name": name, "node-id": node_id, "fingerprint": fingerprint(key_line), "groups": attrs,
            "replaces": {"fingerprint": replaced[0].fingerprint, "revoked-at": utc_iso(replaced[0].revoked_at)}
            if replaced else None}


def unenrol_device(state_dir: Path, name: str) -> dict[str, Any]:
    """Revoke a device: unregister it from the SuperLink (it is refused from now on) and
    mark it revoked in the registry.

    Raises
    ------
    KeyError
        If no active device has that name.
    RuntimeError
        If the SuperLink cannot be reached (the registry is then left unchanged).
    """
    paths, cfg = _load(state_dir)
    store = cfg.store(paths)
    rows = [r for r in store.enrolled_devices(include_revoked=False) if r.name == name]
    if not rows:
        raise KeyError(f"no enrolled device named {name!r}")
    _flwr(paths, ["supernode", "unregister", rows[0].node_id, CONNECTION])
    row = store.revoke_device(name)
    return {"name": row.name, "node-id": row.node_id, "revoked-at": utc_iso(row.revoked_at)}


def list_devices(state_dir: Path, *, include_superseded: bool = False) -> list[dict[str, Any]]:
    """Enrolled devices with their status from the SuperLink.

    Parameters
    ----------
    state_dir : Path
    include_superseded : bool
        Also list the earlier, revoked enrolments of names enrolled again.

    Returns
    -------
    list of dict
        ``name``, ``node-id``, ``groups``, ``fingerprint``, ``enrolled-at``, ``revoked-at``,
        ``status`` (``online``, ``offline``, ``registered``: never connected, ``revoked``, or
        ``unknown`` when the SuperLink cannot be reached), ``last-seen`` (when it last came
        online, or empty). Times are ISO 8601 in UTC to the second (``2026-11-23T07:04:19Z``).
    """
    paths, cfg = _load(state_dir)
    store = cfg.store(paths)
    try:
        nodes = {str(n["node-id"]): n for n in _flwr(paths, ["supernode", "list", CONNECTION]).get("nodes", [])}
        reachable = True
    except RuntimeError as err:
        log.warning("%s", err)
        nodes, reachable = {}, False
    out = []
    for row in store.enrolled_devices(include_superseded=include_superseded):
        node = nodes.get(row.node_id, {})
        if row.revoked_at is not None:
            status = "revoked"
        elif not reachable:
            status = "unknown"
        else:
            status = str(node.get("status", "unregistered"))
        seen = node.get("online-at") or ""
        out.append({
            "name": row.device_name, "node-id": row.node_id, "groups": row.groups, "fingerprint": row.fingerprint,
            "enrolled-at": utc_iso(row.enrolled_at), "revoked-at": utc_iso(row.revoked_at),
            "status": status, "last-seen": "" if seen == "N/A" else utc_iso(str(seen)),
        })
    return out


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    Attributes
    ----------
    run : str
        The fedaffect run's name (in the run store).
    flower_run_id : int
    flower_status : str
        Flower's final status (``finished:completed`` when all went well).
    store_status : str
        The run store's status (``completed``, ``failed``, ``running`` if the ServerApp
        died before it could say).
    error : str
        Last line of the stored error, if any.
    seconds : float
    """

    run: str
    flower_run_id: int
    flower_status: str
    store_status: str
    error: str
    seconds: float

    @property
    def ok(self) -> bool:
        """True when both Flower and the run store say the run completed."""
        return self.flower_status == "finished:completed" and self.store_status == "completed"


#: Run-config keys a resumed run may change (``fedaffect train --resume RUN``): how long the
#: coordinator waits, for how many devices, and how many rounds it trains in all. Every other
#: key stays as stored: the run's rounds and checkpoint were trained with them.
RESUME_KEYS = ("num-server-rounds", "round-timeout", "min-devices", "min-train-devices")

#: Keys ``train`` always sets itself (the run's folder and store are the coordinator's, its
#: devices hold the clips): given or not, they are not the run's to choose.
_COORDINATOR_KEYS = ("run-dir", "store-url", "manifest")


def _resumed_values(previous: Run, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run config of a resumed run: :func:`shared_models.config.resumed_values` with the
    :data:`RESUME_KEYS` (the coordinator's own keys ignored).

    Raises
    ------
    ConfigError
        Naming every other key of ``overrides`` whose value differs from the stored one.
    """
    return resumed_values(previous.config, previous.name, overrides, RESUME_KEYS, ignored=_COORDINATOR_KEYS,
                          command="train", how=" (--rounds, --min-devices, --set)")


def stored_run(state_dir: Path, name: str) -> Run | None:
    """The run ``name`` in a coordinator's run store, or None when it was never stored."""
    paths, cfg = _load(state_dir)
    return cfg.store(paths).find_run(name)


def _drop_unused_folder(folder: Path, store: RunStore, name: str) -> None:
    """Remove a run folder ``train`` made for a run that never reached the store (not
    submitted, or stopped before its ServerApp stored it), unless its log says something:
    then it stays, as the only trace of what happened."""
    try:
        if store.find_run(name) is not None:
            return
    except Exception:  # noqa: BLE001 - a store that cannot say: keep the folder, raise what happened
        return
    log_file = folder / "flower.log"
    if log_file.is_file() and log_file.stat().st_size == 0:
        log_file.unlink()
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass


def train(state_dir: Path, overrides: dict[str, Any] | None = None, *, resume: str = "",
          timeout_s: float = 24 * 3600, on_line: Callable[[str], None] | None = None) -> TrainResult:
    """Submit a federated run to the coordinator's SuperLink and follow it to the end.

    Parameters
    ----------
    state_dir : Path
        An initialised coordinator whose SuperLink is running.
    overrides : dict, optional
        Run-config keys (``model``, ``num-server-rounds``, ``strategy``...) over the
        config's ``run-defaults``.
    resume : str, optional
        Name of a stored run to continue from its last valid checkpoint (same run name,
        same stored config; a new Flower run). Only the :data:`RESUME_KEYS` of
        ``overrides`` (rounds, timeouts, device minimums) change it; the config's
        ``run-defaults`` are for new runs.
    timeout_s : float
        Seconds the run may take.
    on_line : callable, optional
        Receives the run's log lines (progress).

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        For a bad run-config key or value (named); with ``resume``, for keys other than
        :data:`RESUME_KEYS` that would change the stored config (named, with both values);
        for a new run whose name is stored already.
    KeyError
        If ``resume`` names no stored run.
    RuntimeError
        If the app cannot be submitted (SuperLink not running).

    Notes
    -----
    A run folder made for a run that never reached the store (the app not submitted, or
    stopped before the ServerApp stored it) is removed again, unless its ``flower.log`` holds
    what the run said: see :func:`stored_run` for whether there is a run to resume.
    """
    paths, cfg = _load(state_dir)
    store = cfg.store(paths)
    named = {RunConfig.check_key(k): v for k, v in (overrides or {}).items()}
    if named.get("resume"):
        raise ConfigError("config key 'resume': continue a run with `fedaffect train --resume RUN`, not with the key")
    if resume:
        previous = store.get_run(resume)
        values = _resumed_values(previous, named)
        name = previous.name
    else:
        defaults = {RunConfig.check_key(k): v for k, v in cfg.run_defaults.items()}
        values = {"emotions": cfg.emotions, **defaults, **named}
        name = values.get("run-name") or f"train-{dt.datetime.now():%Y%m%d-%H%M%S}"
        if store.find_run(name) is not None:
            # the ServerApp would refuse it after submission, and a stop would mark the stored run failed
            raise ConfigError(f"a run named {name!r} is stored already: continue it with --resume {name}, or give "
                              "the new run another --run-name")
    # A URL with a password stays out of the run config (Flower stores run configs): the
    # ServerApp gets it from FEDAFFECT_STORE_URL, set by `server start`.
    url = "" if make_url(store.url).password else store.url
    values.update({"run-name": name, "run-dir": str(paths.runs), "store-url": url, "manifest": ""})
    run_cfg = RunConfig.from_mapping(values)
    run_folder = paths.runs / name
    made_folder = not run_folder.exists()
    run_folder.mkdir(parents=True, exist_ok=True)
    log_path = run_folder / "flower.log"
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    env = flower_environment(paths.flower_home)
    try:
        with tempfile.TemporaryDirectory(prefix="fedaffect-app-", ignore_cleanup_errors=True) as tmp_name:
            tmp = Path(tmp_name)
            # not "fedaffect": flwr takes a folder named like the connection for an app
            app_dir = stage_app(tmp / "app")
            run_config = tmp / "run-config.toml"
            run_config.write_text(tomli_w.dumps(run_cfg.to_mapping()))
            try:
                result = follow_run(app_dir, CONNECTION, run_config, env, tmp, log_path=log_path, tail=tail,
                                    timeout_s=timeout_s, on_line=on_line)
            except BaseException as err:  # follow_run stopped the Flower run; the store says so too
                store.fail_unfinished(name, f"{type(err).__name__}: {err}".rstrip(": "))
                raise
    finally:
        if made_folder:
            _drop_unused_folder(run_folder, store, name)
    try:
        run = store.get_run(name)
        store_status, error = run.status, (run.error or "").strip().splitlines()[-1:]
    except KeyError:
        store_status, error = "missing", []
    return TrainResult(name, result.run_id, result.status, store_status, error[0] if error else "", result.seconds)
