"""A device of a real federation: its data directory, key pair and SuperNode.

``fedaffect device init --data-dir DIR``
    makes the device's SuperNode authentication key pair (EC P-384, OpenSSH format:
    ``DIR/keys/device`` mode 0600 and ``DIR/keys/device.pub``), its local config
    (``DIR/device.toml``) and its label queue / pseudo-label store (``DIR/cooperative.db``), and
    shows the public key to send to the operator (``fedaffect server enrol``).
``fedaffect device start --data-dir DIR --superlink HOST:PORT --ca ca.crt``
    runs ``flower-supernode`` in the foreground: TLS verified against the federation's CA
    only, authenticated with the device's private key, node config
    ``data-dir=DIR name=NAME role=train``. The ClientApp (:mod:`client.app`) reads the
    clips listed in ``DIR/manifest.csv``; only weights, counts and statistics leave the
    device. SIGTERM/SIGINT stop it; a SuperLink that is down is retried until it is back.

Data directory layout::

    manifest.csv     the device's clips (``fedaffect data prepare ... --out DIR/manifest.csv``);
                     rows without a label form the device's unlabelled pool
    device.toml      name, role
    keys/device      private key (never leaves the device)
    keys/device.pub  public key (goes to the operator)
    cooperative.db   label queue, answers, pseudo-labels (client/device_store.py)
    cache/           feature cache
    logs/            SuperNode log (supernode.log, rotated at 10 MiB, 5 kept)
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tomli_w

from client.supernode import DEFAULT_POLL_S
from shared_models.config import ConfigError
from shared_models.processes import BIN, flower_environment, free_port, run_foreground
from shared_models.security import (
    check_certificate, check_device_name, fingerprint, make_device_keypair, read_device_public_key,
)

__all__ = ["DeviceConfig", "DevicePaths", "init_device", "supernode_command", "probe_superlink", "start_device",
           "DeviceRefused"]

log = logging.getLogger("fedaffect.device")

#: Seconds a SuperLink keeps a node online after its last heartbeat (Flower 1.41: patience 2 x
#: the 30 s interval), plus a margin: a device restarted sooner is refused activation as if
#: its key were unknown, so ``device start`` retries that long before it gives up.
ACTIVATION_RETRY_S = 70.0


class DeviceRefused(RuntimeError):
    """The SuperLink refused this device (not enrolled, revoked, or TLS failed).

    ``activation`` is True when the SuperLink refused to activate the node, which Flower
    also answers while a node with this key is still online (a restart within a minute of a
    crash; a SuperNode stopped cleanly signs off, best effort)."""

    def __init__(self, message: str, activation: bool = False) -> None:
        super().__init__(message)
        self.activation = activation


@dataclass(frozen=True)
class DevicePaths:
    """Where a device keeps everything, under ``root`` (its data directory)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "device.toml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def private_key(self) -> Path:
        return self.root / "keys" / "device"

    @property
    def public_key(self) -> Path:
        return self.root / "keys" / "device.pub"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@dataclass
class DeviceConfig:
    """A device's ``device.toml``.

    Attributes
    ----------
    name : str
        The device's name (the operator enrols it under this name).
    role : str
        ``train`` (trains and evaluates) or ``heldout`` (evaluates only).
    """

    name: str
    role: str = "train"

    @classmethod
    def load(cls, path: Path) -> "DeviceConfig":
        """Read ``device.toml``.

        Raises
        ------
        FileNotFoundError
            If the device was never initialised.
        ConfigError
            For an unknown key or a bad role (named).
        """
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `fedaffect device init --data-dir {path.parent}` first")
        data = tomllib.loads(path.read_text())
        unknown = sorted(set(data) - {"name", "role"})
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known: name, role")
        cfg = cls(**data)
        if cfg.role not in ("train", "heldout"):
            raise ConfigError(f"{path}: key 'role' = {cfg.role!r}: must be train or heldout")
        return cfg

    def save(self, path: Path) -> None:
        """Write ``device.toml``."""
        path.write_text(tomli_w.dumps({"name": self.name, "role": self.role}))


def init_device(data_dir: Path, name: str | None = None, role: str | None = None) -> dict[str, str]:
    """Initialise a device's data directory (idempotent: existing keys, name and role are
    kept unless given).

    Parameters
    ----------
    data_dir : Path
    name : str, optional
        Device name (default: the one in ``device.toml``, else the folder's name).
    role : str, optional
        ``train`` or ``heldout`` (default: the one in ``device.toml``, else ``train``).

    Returns
    -------
    dict
        ``name``, ``public-key`` (the line to send to the operator), ``public-key-file``,
        ``fingerprint``, ``created`` (``"yes"`` when a new key pair was made) and
        ``manifest`` (``"missing"`` when the device has no clips listed yet).

    Raises
    ------
    ValueError
        For a bad name or role.
    """
    paths = DevicePaths(Path(data_dir).expanduser().resolve())
    old = DeviceConfig.load(paths.config) if paths.config.exists() else None
    name = name or (old.name if old else paths.root.name)
    role = role or (old.role if old else "train")  # re-running init never turns a held-out device into a trainer
    check_device_name(name)
    if role not in ("train", "heldout"):
        raise ValueError(f"role {role!r}: must be train or heldout")
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / "keys").mkdir(exist_ok=True, mode=0o700)
    created = not paths.private_key.exists()
    if created:
        make_device_keypair(paths.private_key, paths.public_key)
    DeviceConfig(name=name, role=role).save(paths.config)
    from client.device_store import DeviceStore

    DeviceStore(paths.root).close()  # the label queue and pseudo-label store
    line = read_device_public_key(paths.public_key)
    return {"name": name, "public-key": line, "public-key-file": str(paths.public_key),
            "fingerprint": fingerprint(line), "created": "yes" if created else "no",
            "manifest": "ok" if paths.manifest.exists() else "missing"}


def supernode_command(data_dir: Path, superlink: str, ca: Path, *, port: int | None = None,
                      max_wait_s: float | None = None, poll_s: float | None = DEFAULT_POLL_S) -> list[str]:
    """The command line of a device's SuperNode.

    Flower's ``flower-supernode``, run through :mod:`client.supernode` (a warm SuperExec
    that forks each ClientApp from a process with torch already imported, and a shorter
    idle poll) unless ``poll_s`` is None.

    Parameters
    ----------
    data_dir : Path
        An initialised data directory.
    superlink : str
        ``host:port`` of the coordinator.
    ca : Path
        The federation's CA certificate (the coordinator's ``certs/ca.crt``).
    port : int, optional
        Port of the SuperNode's local ClientApp API (default: a free one, so that several
        devices can run on one host).
    max_wait_s : float, optional
        Give up after this many seconds without the SuperLink (default: retry forever).
    poll_s : float or None, optional
        Seconds between the idle SuperNode's polls of the SuperLink (default 0.5); None runs
        Flower's plain ``flower-supernode`` (3 s polls, a fresh ``flwr-clientapp`` process
        that imports everything for every message).
    """
    paths = DevicePaths(Path(data_dir).expanduser().resolve())
    cfg = DeviceConfig.load(paths.config)
    node_config = f'data-dir="{paths.root}" name="{cfg.name}" role="{cfg.role}"'
    cmd = [
        str(BIN / "flower-supernode"),
        "--root-certificates", str(Path(ca).expanduser().resolve()),
        "--superlink", superlink,
        "--auth-supernode-private-key", str(paths.private_key),
        "--node-config", node_config,
        "--port", str(port or free_port()),
    ]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    if poll_s is not None:
        cmd = [sys.executable, "-m", "client.supernode", "supernode", "--poll", str(poll_s), "--", *cmd[1:]]
    return cmd


def probe_superlink(superlink: str, ca: Path, timeout_s: float = 5.0) -> str:
    """Check the coordinator's TLS certificate against the federation's CA before starting.

    Connects to ``https://HOST:PORT/health`` trusting ``ca`` only.

    Returns
    -------
    str
        ``"ok"``, or ``"unreachable: ..."`` when nothing answers (the SuperNode will keep
        retrying; not an error).

    Raises
    ------
    DeviceRefused
        If the SuperLink's certificate is not accepted: expired, self-signed, signed by
        another CA, or not issued for ``HOST`` (the message gives OpenSSL's reason).
    """
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(Path(ca).expanduser()))
    try:
        with urllib.request.urlopen(f"https://{superlink}/health", timeout=timeout_s, context=context):
            return "ok"
    except urllib.error.HTTPError:
        return "ok"  # TLS went through; the path does not matter here
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLCertVerificationError):
            why = reason.verify_message or str(reason)
            raise DeviceRefused(f"the SuperLink at {superlink} presented a certificate this device does not trust "
                                f"({why}): it must be issued for {superlink.rsplit(':', 1)[0]!r}, unexpired, and "
                                f"signed by the federation's CA {ca} (the coordinator's certs/ca.crt)") from None
        if isinstance(reason, ssl.SSLError):
            raise DeviceRefused(f"TLS with the SuperLink at {superlink} failed: {reason}") from None
        return f"unreachable: {reason}"


def start_device(data_dir: Path, superlink: str, ca: Path, *, port: int | None = None,
                 max_wait_s: float | None = None, poll_s: float | None = DEFAULT_POLL_S,
                 threads: int | None = None, echo: Callable[[str], None] | None = None) -> int:
    """Run the device's SuperNode in the foreground until it exits or is signalled.

    Checks first that the device is initialised, has a manifest, and that ``ca`` is a
    valid (unexpired) CA certificate. ``port``, ``max_wait_s`` and ``poll_s``: see
    :func:`supernode_command`. ``threads``: CPU threads of the ClientApp's torch (default:
    torch's own, one per core); give 1 when several devices share one machine, or their
    OpenMP threads spin against each other (10x slower training measured with 3 devices on
    2 cores).

    Returns
    -------
    int
        0 after a stop by signal, else the SuperNode's exit code.

    Raises
    ------
    FileNotFoundError
        Device not initialised, or no ``manifest.csv``.
    CertificateError
        ``ca`` missing, expired, or not a CA certificate.
    DeviceRefused
        The SuperLink refused the device: not enrolled or revoked, or the SuperLink's
        certificate is not signed by ``ca`` (the message says which is likely); also when
        the SuperNode stops by itself with success, which it does when the SuperLink stops
        accepting its key mid-session (unenrolled while running). A refused
        activation is retried for up to :data:`ACTIVATION_RETRY_S` (at most ``max_wait_s``)
        first: the SuperLink refuses a device restarted within a minute of a crash the same way
        (one stopped cleanly usually signs off and starts again at once).
    RuntimeError
        Another ``device start`` runs on this data directory.
    ValueError
        ``superlink`` is not ``HOST:PORT``.
    """
    host, colon, port_text = superlink.rpartition(":")
    if not (colon and host and port_text.isdigit() and 0 < int(port_text) < 65536):
        # Flower would take it, fail to parse it and keep retrying (or restart forever under systemd)
        raise ValueError(f"superlink {superlink!r} is not HOST:PORT: give the coordinator's address with its port, "
                         f"e.g. coord.example.org:8000 (`fedaffect server init` printed it)")
    paths = DevicePaths(Path(data_dir).expanduser().resolve())
    if not paths.private_key.exists():
        raise FileNotFoundError(f"{paths.private_key} not found: run `fedaffect device init --data-dir {paths.root}`")
    if not paths.manifest.exists():
        raise FileNotFoundError(f"{paths.manifest} not found: list the device's clips there, e.g. "
                                f"`fedaffect data prepare csv --source my-clips.csv --out {paths.manifest}`")
    for warning in check_certificate(Path(ca).expanduser(), must_be_ca=True):
        log.warning(warning)
    probe = probe_superlink(superlink, ca)
    if probe != "ok":
        log.warning("SuperLink %s %s; the SuperNode keeps trying", superlink, probe)
    cmd = supernode_command(paths.root, superlink, ca, port=port, max_wait_s=max_wait_s, poll_s=poll_s)

    def refused(code: int, tail: collections.deque) -> None:
        text = "\n".join(tail)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            raise DeviceRefused(f"the SuperLink at {superlink} has a certificate not signed by {ca} (wrong CA, "
                                "self-signed or expired): get the coordinator's certs/ca.crt")
        # Flower's own exit codes (305 here) reach the shell as 1: only its log text tells.
        if "Failed to activate SuperNode" in text:
            raise DeviceRefused(f"the SuperLink at {superlink} refused this device: its key is not enrolled or was "
                                f"revoked (ask the operator to run `fedaffect server enrol --public-key "
                                f"{paths.public_key.name} ...`), a SuperNode with this key is still connected "
                                f"(another `device start` on {paths.root}), or the SuperLink's TLS certificate is not "
                                f"signed by {ca}.\nlast lines:\n{text[-1500:]}", activation=True)
        if code == 0:
            # A SuperNode runs until signalled. One that stops by itself with success, with no
            # error logged, was told by the SuperLink that its key is no longer accepted: Flower
            # answers an unenrolled node (and one whose clock is far off the coordinator's: its
            # signed requests look replayed) with UNAUTHENTICATED and the SuperNode stops
            # "gracefully". After an error it logged (connection given up with --max-wait, an
            # HTTP error it does not retry, TLS failing later), Flower also exits 0: that is a
            # failure to restart from, not a refusal.
            trouble = [line for line in tail if "ERROR" in line or "Giving up" in line]
            if "terminated gracefully" in text and not trouble:
                raise DeviceRefused(
                    f"the SuperLink at {superlink} no longer accepts this device ({paths.root}): its key was "
                    f"unenrolled (`fedaffect server unenrol`) or the coordinator's registry was reset. Ask the "
                    f"operator to enrol it again (`fedaffect server enrol --public-key {paths.public_key.name} "
                    f"...`), then start the device again. (The SuperLink also refuses a device whose clock is more "
                    f"than 5 s ahead of the coordinator's or 5 min behind: check that both keep time with NTP.)")
            raise RuntimeError(f"the SuperNode stopped after an error: {trouble[-1].strip() if trouble else text[-300:]}"
                               f" (see {paths.logs / 'supernode.log'}); `device start` can be run again")

    state = {"online": False, "lost": False}  # accepted by the SuperLink; lost it since

    def watch(line: str) -> None:
        if "SuperNode ID:" in line:  # Flower's line once the SuperLink has activated the node
            state["online"] = True
            log.info("online: the SuperLink at %s accepted this device (node %s); it trains when a run asks it",
                     superlink, line.rsplit(":", 1)[-1].strip())
        elif "Connection attempt failed" in line and state["online"] and not state["lost"]:  # Flower retries
            state["lost"] = True
            log.warning("lost the SuperLink at %s; the SuperNode keeps trying (after a coordinator restart, "
                        "devices are back within about a minute)", superlink)
        elif "Connection successful after" in line and state["lost"]:
            state["lost"] = False
            log.info("online again: reconnected to the SuperLink at %s (%s)", superlink,
                     line.split("Connection successful", 1)[1].strip().rstrip("."))
        if echo is not None:
            echo(line)

    env = flower_environment(paths.root / "flower")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    lock = _lock_data_dir(paths)  # one SuperNode per device: a second one is refused by its key anyway
    try:
        # A device restarted within a minute of a crash (SIGKILL, power lost; a clean stop
        # usually signs off) is still "online" for the SuperLink, which refuses
        # to activate it exactly as it refuses an unknown key: retry until that has expired.
        deadline = time.monotonic() + min(ACTIVATION_RETRY_S, max_wait_s or ACTIVATION_RETRY_S)
        while True:
            try:
                return run_foreground(cmd, env=env, cwd=paths.root,
                                      log_path=paths.logs / "supernode.log", echo=watch, on_exit=refused)
            except DeviceRefused as err:
                if not err.activation or time.monotonic() >= deadline:
                    raise
                log.warning("the SuperLink did not activate this device; if it ran less than a minute ago the "
                            "SuperLink still sees it online: retrying for %.0f s", deadline - time.monotonic())
                time.sleep(min(10.0, max(deadline - time.monotonic(), 0.0)))
    finally:
        lock.close()


def _lock_data_dir(paths: DevicePaths):
    """Hold an exclusive lock on the data directory for as long as the returned file is open.

    Raises
    ------
    RuntimeError
        If another ``fedaffect device start`` holds it.
    """
    import fcntl

    handle = open(paths.root / ".supernode.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise RuntimeError(f"another `fedaffect device start` is running on {paths.root}"
                           + (f" (pid {holder})" if holder else "") + ": one SuperNode per device") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
