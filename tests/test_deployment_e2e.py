"""A real federation on localhost, with real processes (slow): ``fedaffect server init``,
``server start`` (TLS SuperLink, SuperNode authentication), ``device init``, ``server
enrol``, three ``device start`` SuperNodes on synth-corpus devices, ``fedaffect train``.

The run store is a real PostgreSQL (tests/pg.py starts a private cluster, installing
PostgreSQL when missing and running as root); where PostgreSQL cannot be had, SQLite.

Faults: an unenrolled and a revoked key are refused; in one run, a device killed (SIGKILL)
mid-run does not stop it and rejoins when restarted, and the coordinator killed (SIGKILL, the
whole process tree) mid-run is restarted and ``train --resume`` finishes the run without
losing a stored round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from server.store import RunStore
from shared_models.processes import descendants, free_port

pytestmark = pytest.mark.slow

FEDAFFECT = str(Path(sys.executable).parent / "fedaffect")
EMOTIONS = "anger,boredom,fear,happiness,neutral,sadness"
# Run names unique to this session: the run store may be a PostgreSQL database that other
# sessions' runs share (FEDAFFECT_TEST_POSTGRES_URL), where a fixed name exists already.
TAG = uuid.uuid4().hex[:6]
TWO, CUT, FAULTS = f"two-{TAG}", f"cut-{TAG}", f"faults-{TAG}"
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200"}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([FEDAFFECT, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def spawn(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([FEDAFFECT, *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started: a crash, nothing is cleaned up."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Federation:
    """A coordinator and its devices, all real processes."""

    def __init__(self, root: Path, store_url: str, manifest: Path) -> None:
        self.root, self.state, self.port = root, root / "state", free_port()
        self.store_url, self._store = store_url, None
        res = cli("server", "init", "--state-dir", str(self.state), "--port", str(self.port), "--host", "localhost",
                  "--host", "127.0.0.1", "--store-url", store_url, "--emotions", EMOTIONS)
        assert res.returncode == 0, res.stdout + res.stderr
        self.ca = self.state / "certs" / "ca.crt"
        self.server: subprocess.Popen | None = None
        self.devices: dict[str, subprocess.Popen] = {}
        self.start_server()
        clips = pd.read_csv(manifest, keep_default_na=False)
        self.speakers = sorted(clips["speaker"].unique())
        for i, speaker in enumerate(self.speakers):
            rows = clips[clips["speaker"] == speaker].copy()
            gender = rows["gender"].iloc[0]
            if i == 0:
                rows["gender"] = ""  # this device's gender comes from its enrolment
            data = root / f"dev{i}"
            assert cli("device", "init", "--data-dir", str(data), "--name", f"dev{i}").returncode == 0
            rows.to_csv(data / "manifest.csv", index=False)
            if i < 3:  # dev3 is never enrolled
                res = cli("server", "enrol", "--state-dir", str(self.state), "--name", f"dev{i}", "--public-key",
                          str(data / "keys" / "device.pub"), "--group", f"gender={gender}")
                assert res.returncode == 0, res.stdout + res.stderr
        for i in range(3):
            self.start_device(f"dev{i}")
        wait_for(lambda: self.online() >= {"dev0", "dev1", "dev2"}, 120, "3 devices online")

    def start_server(self) -> None:
        self.server = spawn("server", "start", "--state-dir", str(self.state), log=self.root / "server.log")
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.ca))

        def healthy() -> bool:
            assert self.server.poll() is None, (self.root / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"https://localhost:{self.port}/health", timeout=2, context=context) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 60, "the SuperLink", every=0.5)

    def start_device(self, name: str, *extra: str) -> subprocess.Popen:
        proc = spawn("device", "start", "--data-dir", str(self.root / name), "--superlink", f"localhost:{self.port}",
                     "--ca", str(self.ca), *extra, log=self.root / f"{name}.log")
        self.devices[name] = proc
        return proc

    def devices_status(self) -> dict[str, dict]:
        res = cli("server", "devices", "--state-dir", str(self.state), "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        return {d["name"]: d for d in json.loads(res.stdout)}

    def online(self) -> set[str]:
        return {n for n, d in self.devices_status().items() if d["status"] == "online"}

    def train(self, *args: str) -> subprocess.Popen:
        return spawn("train", "--state-dir", str(self.state), "--set", "local-epochs=1", "--set",
                     "round-timeout=150", *args, log=self.root / "train.log")

    def store(self) -> RunStore:
        if self._store is None:  # one store (one connection pool) for all the polling
            self._store = RunStore(self.store_url)
        return self._store

    def stored_rounds(self, run: str) -> list[dict]:
        try:
            return self.store().rounds(self.store().get_run(run).id)
        except KeyError:
            return []

    def close(self) -> None:
        for proc in [*self.devices.values(), self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.devices.values(), self.server]:
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    kill_tree(proc)
        # A ClientApp process started just before its SuperNode was killed can outlive it:
        # end every process still working in this federation's folders.
        for pid in os.listdir("/proc"):
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if pid.isdigit() and cwd.startswith(str(self.root)):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def federation(request, tmp_path_factory, synth_manifest):
    try:
        store_url = request.getfixturevalue("postgres_url")
    except pytest.skip.Exception:
        store_url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'fedaffect.db'}"
    fed = Federation(tmp_path_factory.mktemp("federation"), store_url, synth_manifest)
    yield fed
    fed.close()


def test_an_unenrolled_device_is_refused(federation):
    proc = federation.start_device("dev3", "--max-wait", "30")
    assert proc.wait(timeout=90) == 3
    assert "refused this device" in (federation.root / "dev3.log").read_text()
    assert "dev3" not in federation.devices_status()


def test_train_two_rounds_on_three_devices(federation):
    proc = federation.train("--rounds", "2", "--min-devices", "3", "--run-name", TWO)
    assert proc.wait(timeout=600) == 0, (federation.root / "train.log").read_text()[-3000:]
    store = federation.store()
    run = store.get_run(TWO)
    assert run.status == "completed" and run.engine == "flower"
    rounds = store.rounds(run.id)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["train_devices"] == 3 and rounds[2]["uar"] > rounds[0]["uar"]
    devices = store.device_metrics(run.id)
    assert {(d["device"], d["phase"]) for d in devices if d["round"] == 2} == {
        (f"dev{i}", phase) for i in range(3) for phase in ("train", "evaluate")}
    groups = {(g["attribute"], g["group"]) for g in store.group_metrics(run.id)}
    assert ("gender", "unknown") not in groups  # dev0's clips took its enrolled gender
    assert {("gender", "female"), ("gender", "male")} <= groups
    assert store.latest_checkpoint(run.id)[0] == 2
    # the device's console says when the coordinator accepted it; its log is not flooded
    assert "accepted this device" in (federation.root / "dev1.log").read_text()
    assert "HTTP Request" not in (federation.root / "dev1" / "logs" / "supernode.log").read_text()


def test_a_run_that_times_out_is_stopped_and_marked_failed(federation):
    """`fedaffect train --timeout` must not leave the run going on the devices alone."""
    proc = federation.train("--rounds", "200", "--run-name", CUT, "--timeout", "45")
    assert proc.wait(timeout=300) == 1
    assert "timed out" in (federation.root / "train.log").read_text()
    run = federation.store().get_run(CUT)
    assert run.status == "failed", run.error
    stored = len(federation.stored_rounds(CUT))
    time.sleep(20)  # a run still going would store a round every few seconds
    assert len(federation.stored_rounds(CUT)) == stored < 200


def test_a_dropped_device_and_a_crashed_coordinator_lose_no_round(federation):
    """One run, two faults: dev2 is killed during round 1 (the round goes on without it),
    then the whole coordinator is killed as soon as round 1 is stored (round 2 is training:
    a round's evaluation travels with the next round's training); the coordinator and dev2 are
    restarted, dev2 rejoins, and ``train --resume`` finishes the run from its last valid
    checkpoint with every stored round intact."""
    dev2_log = federation.root / "dev2" / "logs" / "supernode.log"
    seen = len(dev2_log.read_text(errors="replace")) if dev2_log.exists() else 0  # earlier runs' messages
    proc = federation.train("--rounds", "3", "--run-name", FAULTS)
    store = federation.store()

    def checkpointed(round_: int):
        rounds = federation.stored_rounds(FAULTS)
        latest = store.latest_checkpoint(store.get_run(FAULTS).id) if rounds else None
        return latest is not None and latest[0] >= round_

    # A device crashes during round 1, as soon as its first train message arrives (it also
    # carries round 0's in-sample evaluation: round 0 is stored once that exchange is over).
    wait_for(lambda: "Receiving: train message" in dev2_log.read_text(errors="replace")[seen:], 300,
             "dev2's round-1 train message", every=0.05)
    kill_tree(federation.devices["dev2"])
    wait_for(lambda: checkpointed(0), 300, "round 0 of run faults", every=0.2)
    wait_for(lambda: checkpointed(1), 600, "round 1 of run faults", every=0.05)
    consoles = {name: federation.root / f"{name}.log" for name in ("dev0", "dev1", "dev2")}
    console_seen = {name: len(path.read_text(errors="replace")) for name, path in consoles.items()}
    kill_tree(federation.server)  # SuperLink, SuperExec, ServerApp: all SIGKILLed while round 2 trains
    stored = federation.stored_rounds(FAULTS)
    assert 2 <= len(stored) < 4, [r["round"] for r in stored]
    assert proc.wait(timeout=300) != 0  # `fedaffect train` reports the lost run
    round1 = stored[1]
    assert round1["train_devices"] == 2 and round1["train_failures"] == 1  # the round went on without dev2

    federation.start_server()
    federation.start_device("dev2")
    # The restarted SuperLink lists every device as it last knew it, so "online" says nothing yet:
    # dev0 and dev1 reconnect when their SuperNodes' backoff next tries (up to a minute), dev2 is
    # let back in once its heartbeat from before its crash expires. Their consoles say when (a run
    # started before counts a device in from its next round only, see server.app.LateDevices).
    def back(name: str) -> bool:
        text = consoles[name].read_text(errors="replace")[console_seen[name]:]
        return ("accepted this device" if name == "dev2" else "online again") in text

    wait_for(lambda: all(back(n) for n in consoles), 180, "the devices to reconnect, dev2 to rejoin", every=0.5)
    assert "lost the SuperLink" in consoles["dev0"].read_text(errors="replace")[console_seen["dev0"]:]
    proc = federation.train("--resume", FAULTS)
    assert proc.wait(timeout=600) == 0, (federation.root / "train.log").read_text()[-3000:]
    rounds = federation.stored_rounds(FAULTS)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[: len(stored)] == stored  # nothing stored before the crash was lost or changed
    # the first round stored after the restart was trained after it (a round trained but not yet
    # stored when the coordinator died is trained again), with dev2 back
    assert rounds[len(stored)]["train_devices"] == 3
    assert store.get_run(FAULTS).status == "completed"


def test_a_revoked_device_is_refused(federation):
    """Last in the module on purpose: dev1 stays revoked for the federation's remaining life."""
    res = cli("server", "unenrol", "dev1", "--state-dir", str(federation.state))
    assert res.returncode == 0, res.stdout + res.stderr
    assert federation.devices_status()["dev1"]["status"] == "revoked"
    # the running device learns it at its next heartbeat or pull, stops, and says why (exit 3:
    # systemd does not restart it)
    assert federation.devices["dev1"].wait(timeout=120) == 3
    assert "no longer accepts this device" in (federation.root / "dev1.log").read_text()
    proc = federation.start_device("dev1", "--max-wait", "30")
    assert proc.wait(timeout=90) == 3
