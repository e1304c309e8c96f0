"""A throwaway PostgreSQL for the tests: found, installed (as root, with apt) and started privately.

:func:`postgres_url` is what the ``postgres_url`` fixture in ``conftest.py`` uses:

1. ``FEDAFFECT_TEST_POSTGRES_URL`` set: that database is used as it is (nothing is started).
2. Otherwise the PostgreSQL server binaries are looked for (``/usr/lib/postgresql/*/bin``,
   then ``initdb``/``pg_ctl`` on the PATH); when missing and running as root on a machine
   with ``apt-get``, the Debian package ``postgresql`` is installed.
3. A private cluster is made with ``initdb`` in a new temporary folder and started with
   ``pg_ctl`` on a free port of 127.0.0.1 (its unix socket in that folder too), one database
   is created, and the cluster is stopped and the folder removed at the end. The system
   cluster, if any, is never touched. ``initdb`` refuses to run as root, so as root the
   cluster is run by the ``postgres`` user (created by the Debian package), else ``nobody``.

When PostgreSQL can be neither found nor installed, :class:`PostgresUnavailable` says why
(the fixture turns it into a skip). A cluster that is installed but fails to start is an
error, with the end of the server log.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

ENV_URL = "FEDAFFECT_TEST_POSTGRES_URL"
DB_NAME = "fedaffect_test"
DB_USER = "fedaffect"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed and cannot be installed here."""


def _version_key(bin_dir: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/([\d.]+)/bin", bin_dir)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def find_bin_dir() -> Path | None:
    """Folder with ``initdb`` and ``pg_ctl`` (the newest Debian version first), or None."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for d in dirs:
        if all(os.access(Path(d) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        folder = Path(initdb).resolve().parent
        if (folder / "pg_ctl").exists():
            return folder
    return None


def install_postgres() -> Path:
    """Install the Debian package ``postgresql`` (as root with apt-get) and return its bin folder.

    Raises
    ------
    PostgresUnavailable
        Not root, no apt-get, or the installation failed.
    """
    if os.name != "posix" or os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL is not installed and the tests do not run as root to install it "
            f"(install the package `postgresql`, or set {ENV_URL}=postgresql://user:pw@host/db)"
        )
    if shutil.which("apt-get") is None:
        raise PostgresUnavailable(f"PostgreSQL is not installed and there is no apt-get to install it (set {ENV_URL})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    folder = find_bin_dir()
    if result.returncode != 0 or folder is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise PostgresUnavailable("apt-get install postgresql failed: " + " | ".join(tail))
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """A PostgreSQL cluster of its own in a temporary folder, listening on 127.0.0.1.

    Parameters
    ----------
    bin_dir : Path
        Folder of ``initdb``, ``pg_ctl`` and ``createdb``.
    """

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = Path(bin_dir)
        self.root: Path | None = None
        self.port = 0
        self.password = secrets.token_hex(16)
        self._run_as: pwd.struct_passwd | None = None
        self._started = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{DB_NAME}"

    def _cmd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs = {}
        if self._run_as is not None:  # root: run the server tools as the unprivileged user
            kwargs = dict(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        env.pop("PGDATA", None)
        return subprocess.run(args, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
                               + (f"\nserver log:\n{log}" if log else ""))

    def start(self) -> str:
        """Create, start and fill the cluster; returns its SQLAlchemy URL."""
        self.root = Path(tempfile.mkdtemp(prefix="fedaffect-pg-"))  # short path: unix socket names are limited
        atexit.register(self.stop)
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self._run_as = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self._run_as is None:
                raise PostgresUnavailable("running as root and there is no `postgres` or `nobody` user to run PostgreSQL")
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
        pwfile.chmod(0o600)
        self._check(self._cmd(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", DB_USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--locale=C",
        ), "initdb")
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=30 -c shared_buffers=16MB")
        for attempt in range(3):  # a free port can be taken by someone else before the server binds it
            self.port = _free_port()
            result = self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                               "-o", f"-p {self.port} {options}", "-w", "-t", "60", "start", timeout=90)
            if result.returncode == 0:
                self._started = True
                break
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if attempt == 2 or "could not bind" not in log:
                self._check(result, "pg_ctl start")
        self._check(self._cmd(str(self.bin_dir / "createdb"), "-h", str(self.root), "-p", str(self.port),
                              "-U", DB_USER, DB_NAME), "createdb")
        return self.url

    def stop(self) -> None:
        """Stop the server (immediately: the data is thrown away) and remove the folder."""
        if self.root is None:
            return
        if self._started:
            self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def postgres_url() -> Iterator[str]:
    """Yield the URL of a PostgreSQL database for the tests, then clean up (see the module docstring).

    Raises
    ------
    PostgresUnavailable
        When PostgreSQL is not installed and cannot be installed.
    """
    url = os.environ.get(ENV_URL)
    if url:
        yield url
        return
    bin_dir = find_bin_dir() or install_postgres()
    cluster = PrivateCluster(bin_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
