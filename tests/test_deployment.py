"""A real federation's parts without processes: certificates, keys, state directory,
device registry, enrolled groups, resume, and what devices send.

Devices here are data directories (node config ``data-dir``, as in deployment) driven by
the in-process grid; the end-to-end runs with a real SuperLink and SuperNodes are in
tests/test_deployment_e2e.py (slow).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flwr.common.serde import message_to_proto

from client.app import app as client_app
from client.deployment import DeviceConfig, init_device, supernode_command
from server.app import run_federation
from server.deployment import ServerConfig, init_server, superlink_command
from server.simulation import InProcessGrid
from server.store import CONFUSION_KEY, RunStore
from shared_models.config import ConfigError, RunConfig
from shared_models.features import FeatureCache
from shared_models.models import frontend_for
from shared_models.security import (
    CertificateError, check_certificate, fingerprint, make_ca, make_server_certificate, read_device_public_key,
    write_certificate,
)

EMOTIONS = "anger,boredom,fear,happiness,neutral,sadness"


# --------------------------------------------------------------------------- certificates and keys


def test_server_certificate_is_checked_against_its_ca_host_and_dates(tmp_path):
    ca, ca_key = make_ca()
    write_certificate(tmp_path / "ca.crt", ca)
    cert, _ = make_server_certificate(ca, ca_key, ["coord.example.org", "10.0.0.5"])
    write_certificate(tmp_path / "server.crt", cert)
    assert check_certificate(tmp_path / "server.crt", ca_path=tmp_path / "ca.crt", host="coord.example.org") == []
    check_certificate(tmp_path / "server.crt", ca_path=tmp_path / "ca.crt", host="10.0.0.5")
    with pytest.raises(CertificateError, match="not valid for 'other.org'"):
        check_certificate(tmp_path / "server.crt", ca_path=tmp_path / "ca.crt", host="other.org")

    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    expired, _ = make_server_certificate(ca, ca_key, ["localhost"], days=2, not_before=old)
    write_certificate(tmp_path / "expired.crt", expired)
    with pytest.raises(CertificateError, match="expired"):
        check_certificate(tmp_path / "expired.crt", ca_path=tmp_path / "ca.crt")

    other_ca, other_key = make_ca("someone else's CA")
    stranger, _ = make_server_certificate(other_ca, other_key, ["localhost"])
    write_certificate(tmp_path / "stranger.crt", stranger)
    with pytest.raises(CertificateError, match="not signed by the CA"):
        check_certificate(tmp_path / "stranger.crt", ca_path=tmp_path / "ca.crt")
    write_certificate(tmp_path / "self.crt", other_ca)
    with pytest.raises(CertificateError, match="self-signed"):
        check_certificate(tmp_path / "self.crt", ca_path=tmp_path / "ca.crt")
    with pytest.raises(CertificateError, match="not a CA certificate"):
        check_certificate(tmp_path / "server.crt", must_be_ca=True)
    soon, _ = make_server_certificate(ca, ca_key, ["localhost"], days=5)
    write_certificate(tmp_path / "soon.crt", soon)
    assert "expires in 4 days" in check_certificate(tmp_path / "soon.crt")[0]


def test_device_init_makes_a_private_p384_openssh_key_once(tmp_path):
    info = init_device(tmp_path / "phone-07")
    keys = tmp_path / "phone-07" / "keys"
    assert stat.S_IMODE(os.stat(keys / "device").st_mode) == 0o600
    private = serialization.load_ssh_private_key((keys / "device").read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert info["public-key"].startswith("ecdsa-sha2-nistp384 ") and info["created"] == "yes"
    assert info["fingerprint"] == fingerprint(read_device_public_key(keys / "device.pub"))
    assert info["manifest"] == "missing"
    assert DeviceConfig.load(tmp_path / "phone-07" / "device.toml") == DeviceConfig("phone-07", "train")
    again = init_device(tmp_path / "phone-07")  # re-running never replaces an enrolled key
    assert again["public-key"] == info["public-key"] and again["created"] == "no"
    assert (tmp_path / "phone-07" / "cooperative.db").exists()  # the label queue
    init_device(tmp_path / "phone-07", role="heldout")
    init_device(tmp_path / "phone-07")  # e.g. to see the key again: the role stays
    assert DeviceConfig.load(tmp_path / "phone-07" / "device.toml") == DeviceConfig("phone-07", "heldout")
    with pytest.raises(ValueError, match="role"):
        init_device(tmp_path / "x", role="boss")


def test_only_p384_public_keys_can_be_enrolled(tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pub").write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(CertificateError, match="P-384"):
        read_device_public_key(tmp_path / "rsa.pub")
    init_device(tmp_path / "dev")
    with pytest.raises(CertificateError, match="PRIVATE key"):
        read_device_public_key(tmp_path / "dev" / "keys" / "device")
    (tmp_path / "notes.pub").write_text("# my notes\n")  # cryptography: "Unsupported key type"
    with pytest.raises(CertificateError, match="not an OpenSSH public key"):
        read_device_public_key(tmp_path / "notes.pub")
    (tmp_path / "junk.pub").write_text("hello\n")
    with pytest.raises(CertificateError, match="not an OpenSSH public key"):
        read_device_public_key(tmp_path / "junk.pub")
    with pytest.raises(CertificateError, match="not found"):
        read_device_public_key(tmp_path / "missing.pub")


# --------------------------------------------------------------------------- state directory


def test_server_init_keeps_the_ca_on_renew_and_refuses_to_overwrite(tmp_path):
    paths = init_server(tmp_path / "st", names=["localhost", "127.0.0.1"], port=18555, emotions=EMOTIONS)
    ca_before = paths.ca_cert.read_bytes()
    check_certificate(paths.server_cert, ca_path=paths.ca_cert, host="127.0.0.1")
    with pytest.raises(FileExistsError, match="--renew"):
        init_server(tmp_path / "st")
    init_server(tmp_path / "st", names=["localhost", "coord.lan"], renew=True)
    assert paths.ca_cert.read_bytes() == ca_before  # enrolled devices keep trusting the coordinator
    check_certificate(paths.server_cert, ca_path=paths.ca_cert, host="coord.lan")
    cmd = superlink_command(paths.root)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile",
                 "--database", "--log-file"):
        assert flag in cmd
    assert "--insecure" not in cmd and cmd[cmd.index("--port") + 1] == "18555"
    assert stat.S_IMODE(os.stat(paths.ca_key).st_mode) == 0o600
    # the store URL (a PostgreSQL password) in server.toml: the owner's alone, in a folder only the group enters
    assert stat.S_IMODE(os.stat(paths.config).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.root).st_mode) == 0o750


def test_a_failed_server_init_writes_nothing_and_renew_can_change_the_port(tmp_path):
    for bad in (dict(store_url="bogus://x"), dict(port=70000)):
        with pytest.raises((ConnectionError, ConfigError)):
            init_server(tmp_path / "st", names=["localhost"], **bad)
        assert not (tmp_path / "st").exists()  # a later init with good values just works
    paths = init_server(tmp_path / "st", names=["localhost"], port=18556)
    init_server(tmp_path / "st", renew=True, port=18557)
    assert ServerConfig.load(paths.config).port == 18557


def test_server_config_names_a_bad_key(tmp_path):
    paths = init_server(tmp_path / "st", names=["localhost"])
    text = paths.config.read_text()
    paths.config.write_text(text.replace("port =", "prot ="))
    with pytest.raises(ConfigError, match="'prot'"):
        ServerConfig.load(paths.config)
    paths.config.write_text(text.replace("[run-defaults]", '[run-defaults]\n"num-server-round" = 3'))
    with pytest.raises(ConfigError, match="num-server-round"):
        ServerConfig.load(paths.config)


def test_a_typo_in_server_toml_names_the_file_its_table_and_the_key_meant(tmp_path):
    """A run default is checked when server.toml is read, and named as the other config errors are."""
    import re

    paths = init_server(tmp_path / "st", names=["localhost"])
    text = paths.config.read_text()
    where = re.escape(str(paths.config))
    for line, match in (("round-timout = 300", r"unknown config key 'round-timout' \(did you mean 'round-timeout'\?\)$"),
                        ("round-timeout = -1", r"config key 'round-timeout' = -1(\.0)?: must be > 0$")):
        paths.config.write_text(text.replace("[run-defaults]", f"[run-defaults]\n{line}"))
        with pytest.raises(ConfigError, match=rf"^{where} \[run-defaults\]: {match}"):
            ServerConfig.load(paths.config)
    paths.config.write_text(text.replace("port =", "prot ="))
    with pytest.raises(ConfigError, match=rf"^{where}: unknown key 'prot' \(did you mean 'port'\?\)$"):
        ServerConfig.load(paths.config)
    paths.config.write_text("round-timeout = 300\n" + text)  # a run default outside its table
    with pytest.raises(ConfigError, match=r"'round-timeout' \(a run-config key: put it under \[run-defaults\]\)"):
        ServerConfig.load(paths.config)


def test_supernode_command_points_at_the_data_dir_and_key(tmp_path):
    init_device(tmp_path / "dev", name="phone-07", role="heldout")
    cmd = supernode_command(tmp_path / "dev", "coord:8000", tmp_path / "ca.crt", port=9555)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'data-dir="{(tmp_path / "dev").resolve()}"' in node_config
    assert 'name="phone-07"' in node_config and 'role="heldout"' in node_config
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("keys/device")
    assert "--insecure" not in cmd and cmd[cmd.index("--port") + 1] == "9555"


# --------------------------------------------------------------------------- registry


def test_device_registry_enrols_revokes_and_re_enrols(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.enrol_device("phone-07", 123, "ecdsa-sha2-nistp384 AAAA1", "SHA256:x", {"gender": "female"})
    with pytest.raises(ValueError, match="name"):
        store.enrol_device("phone-07", 124, "ecdsa-sha2-nistp384 AAAA2", "SHA256:y")
    with pytest.raises(ValueError, match="public key"):
        store.enrol_device("phone-08", 125, "ecdsa-sha2-nistp384 AAAA1", "SHA256:x")
    store.revoke_device("phone-07")
    with pytest.raises(KeyError):
        store.revoke_device("phone-07")
    assert [d.name for d in store.enrolled_devices(include_revoked=False)] == []
    store.enrol_device("phone-07", 126, "ecdsa-sha2-nistp384 AAAA3", "SHA256:z")  # a new key after revocation
    (row,) = store.enrolled_devices()
    assert row.node_id == "126" and row.revoked_at is None and row.groups == {}


class FakeFlwr:
    """The coordinator's ``flwr`` CLI without a SuperLink: registers keys, lists nodes."""

    def __init__(self, nodes: list[dict] | None = None) -> None:
        self.nodes = nodes or []
        self.next_id = 1000

    def __call__(self, paths, args, timeout=60):
        if args[:2] == ["supernode", "register"]:
            self.next_id += 1
            return {"success": True, "node-id": self.next_id}
        if args[:2] == ["supernode", "list"]:
            return {"success": True, "nodes": self.nodes}
        return {"success": True}


def test_a_revoked_key_is_enrolled_again_only_with_force_and_the_revocation_is_kept(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import server.deployment as deployment
    from fedaffect.cli import app as cli

    monkeypatch.setattr(deployment, "_flwr", FakeFlwr())
    state = str(init_server(tmp_path / "st", names=["localhost"]).root)
    old = init_device(tmp_path / "old")
    old_key = tmp_path / "old" / "keys" / "device.pub"
    enrol = ["server", "enrol", "--state-dir", state, "--name", "phone-07", "--group", "gender=female"]
    assert CliRunner().invoke(cli, [*enrol, "--public-key", str(old_key)]).exit_code == 0
    assert CliRunner().invoke(cli, ["server", "unenrol", "phone-07", "--state-dir", state]).exit_code == 0
    res = CliRunner().invoke(cli, [*enrol, "--public-key", str(old_key)])
    assert res.exit_code == 2 and old["fingerprint"] in res.output and "was revoked" in res.output
    assert "--force" in res.output and "fedaffect device init" in res.output
    new_key = init_device(tmp_path / "new")
    res = CliRunner().invoke(cli, [*enrol, "--public-key", str(tmp_path / "new" / "keys" / "device.pub")])
    assert res.exit_code == 0, res.output
    assert "in place of its enrolment revoked" in res.output and old["fingerprint"] in res.output
    rows = deployment.list_devices(state, include_superseded=True)
    assert [(r["name"], r["status"], r["fingerprint"]) for r in rows] == [
        ("phone-07", "revoked", old["fingerprint"]), ("phone-07", "unregistered", new_key["fingerprint"])]
    assert [r["name"] for r in deployment.list_devices(state)] == ["phone-07"]  # the current one
    # the revoked key stays refused under any name; with --force the operator takes it back
    other = ["server", "enrol", "--state-dir", state, "--name", "phone-08", "--public-key", str(old_key)]
    assert CliRunner().invoke(cli, other).exit_code == 2
    res = CliRunner().invoke(cli, [*other, "--force"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["server", "devices", "--state-dir", state, "--all", "--json"])
    assert [d["name"] for d in __import__("json").loads(res.stdout)] == ["phone-07", "phone-07", "phone-08"]


def test_device_times_have_one_format(tmp_path, monkeypatch):
    """Flower's ``2026-11-23 07:04:19Z``, SQLite's zone-less times and Python's ``+00:00``:
    all ISO 8601 UTC in JSON, and ``2026-11-23 07:04:19Z`` in the table."""
    import json
    import re

    from typer.testing import CliRunner

    import server.deployment as deployment
    from fedaffect.cli import app as cli

    monkeypatch.setattr(deployment, "_flwr", FakeFlwr(
        [{"node-id": "123", "status": "online", "online-at": "2026-11-23 07:04:19Z"},
         {"node-id": "124", "status": "registered", "online-at": "N/A"}]))
    paths = init_server(tmp_path / "st", names=["localhost"])
    store = ServerConfig.load(paths.config).store(paths)
    store.enrol_device("phone-07", 123, "ecdsa-sha2-nistp384 AAAA1", "SHA256:x")
    store.enrol_device("phone-08", 124, "ecdsa-sha2-nistp384 AAAA2", "SHA256:y")
    store.enrol_device("phone-09", 125, "ecdsa-sha2-nistp384 AAAA3", "SHA256:z")
    revoked = deployment.unenrol_device(paths.root, "phone-09")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", revoked["revoked-at"])
    rows = {r["name"]: r for r in deployment.list_devices(paths.root)}
    assert rows["phone-07"]["last-seen"] == "2026-11-23T07:04:19Z" and rows["phone-08"]["last-seen"] == ""
    assert rows["phone-09"]["revoked-at"] == revoked["revoked-at"]
    for row in rows.values():
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["enrolled-at"]), row
    res = CliRunner().invoke(cli, ["server", "devices", "--state-dir", str(paths.root), "--json"])
    assert json.loads(res.stdout) == list(rows.values())
    res = CliRunner().invoke(cli, ["server", "devices", "--state-dir", str(paths.root)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "2026-11-23 07:04:19Z" in res.stdout and rows["phone-07"]["enrolled-at"].replace("T", " ") in res.stdout
    assert f"revoked {revoked['revoked-at'].replace('T', ' ')}" in res.stdout
    assert not re.search(r"\d\dT\d\d|\+00:00|\d:\d\d\.\d", res.stdout)  # no ISO "T", no offsets, no fractions


# --------------------------------------------------------------------------- devices as data directories


@pytest.fixture(scope="module")
def device_dirs(synth_manifest, tmp_path_factory):
    """Three device data directories made from the synth corpus (one speaker each); the
    first device's manifest has no gender (its enrolment gives it)."""
    root = tmp_path_factory.mktemp("devices")
    manifest = pd.read_csv(synth_manifest, keep_default_na=False)
    dirs = []
    for i, speaker in enumerate(sorted(manifest["speaker"].unique())[:3]):
        rows = manifest[manifest["speaker"] == speaker].copy()
        if i == 0:
            rows["gender"] = ""
        init_device(root / f"dev{i}")
        rows.to_csv(root / f"dev{i}" / "manifest.csv", index=False)
        dirs.append(root / f"dev{i}")
    return dirs


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping the serialised bytes of every message both ways."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[bytes] = []
        self.types: list[str] = []

    def _deliver(self, msg):
        self.types.append(msg.metadata.message_type)
        reply = super()._deliver(msg)
        self.sent.append(message_to_proto(msg).SerializeToString())
        self.sent.append(message_to_proto(reply).SerializeToString())
        return reply


def _federation(device_dirs, tmp_path, **overrides):
    cfg = RunConfig.from_mapping({"emotions": EMOTIONS, "num-server-rounds": 2, "local-epochs": 1,
                                  "run-dir": str(tmp_path / "runs"), "store-url": f"sqlite:///{tmp_path / 'r.db'}",
                                  "run-name": "dep", **overrides})
    node_configs = [{"data-dir": str(d), "name": d.name} for d in device_dirs]
    grid = RecordingGrid(client_app, node_configs, cfg.to_mapping(), run_id=7)
    return cfg, grid


def _run(grid, cfg, store):
    from flwr.supercore.task_identity import TaskIdentity  # messages need a run id (server/simulation.py)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    return run_federation(grid, cfg, store, engine="test")


def test_enrolled_groups_reach_the_devices_and_no_clip_data_is_sent(device_dirs, tmp_path):
    cfg, grid = _federation(device_dirs, tmp_path)
    store = RunStore(cfg.store_url)
    first = grid.get_node_ids()[0]  # node of dev0, whose manifest has no gender
    # enrolled under another name than the one the device gives itself (its folder's, dev0)
    store.enrol_device("phone-07", first, "ecdsa-sha2-nistp384 AAAA", "SHA256:x", {"gender": "female"})
    summary = _run(grid, cfg, store)
    groups = {(r["attribute"], r["group"]) for r in store.group_metrics(store.get_run("dep").id)}
    assert ("gender", "unknown") not in groups and ("gender", "female") in groups
    assert summary["final"]["uar"] is not None
    # the run store names it as the operator enrolled it: a device cannot pick its stored name
    stored = {d["device"] for d in store.device_metrics(store.get_run("dep").id)}
    assert "phone-07" in stored and "dev0" not in stored and {"dev1", "dev2"} <= stored
    # the per-round counts follow each device under that one name (not one entry per name)
    labelled = {r["coop_labelled"] for r in store.rounds(store.get_run("dep").id)}
    assert len(labelled) == 1

    # What went over the wire (protobuf bytes of every message both ways) holds no audio,
    # no features, no file names or paths and no per-clip labels of any device.
    wire = b"".join(grid.sent)
    assert len(wire) > 10_000
    model = cfg.model
    for d in device_dirs:
        manifest = pd.read_csv(d / "manifest.csv", keep_default_na=False)
        for _, row in manifest.head(8).iterrows():
            path = Path(row["path"])
            assert path.name.encode() not in wire and str(path.parent).encode() not in wire
            audio, _ = sf.read(path, dtype="int16")
            assert audio[4000:4016].tobytes() not in wire
            feats = np.load(FeatureCache(d / "cache").path_for(path, frontend_for(model)))
            assert np.asarray(feats, dtype=np.float32).ravel()[10:14].tobytes() not in wire
            assert np.asarray(feats, dtype=np.float64).ravel()[10:12].tobytes() not in wire
        assert str(d).encode() not in wire  # not even the data directory's path


def test_resume_continues_from_the_last_valid_checkpoint(device_dirs, tmp_path):
    cfg, grid = _federation(device_dirs, tmp_path, **{"num-server-rounds": 3})
    store = RunStore(cfg.store_url)
    _run(grid, cfg, store)
    run = store.get_run("dep")
    before = store.rounds(run.id)
    ckpt = tmp_path / "runs" / "dep" / "checkpoints"
    (ckpt / "round-0003.pt").write_bytes(b"torn write")  # a crash mid-save: hash mismatch
    store.finish_run(run.id, "failed", error="killed")

    cfg2, grid2 = _federation(device_dirs, tmp_path, **{"num-server-rounds": 4, "resume": "dep"})
    _run(grid2, cfg2, store)
    after = store.rounds(run.id)
    assert [r["round"] for r in after] == [0, 1, 2, 3, 4]
    assert after[:3] == before[:3]  # rounds up to the valid checkpoint (2) are kept as they were
    # Round 3 re-run from round 2's checkpoint is the round the uninterrupted run stored
    # (training is seeded): a resume that ignored the checkpoint's weights would differ.
    def timeless(row):
        return {k: v for k, v in row.items()
                if k not in ("wall_s", CONFUSION_KEY) and not k.endswith(("seconds", "_at"))}

    assert timeless(after[3]) == pytest.approx(timeless(before[3]))
    assert after[3][CONFUSION_KEY] == before[3][CONFUSION_KEY]
    assert store.get_run("dep").status == "completed"
    assert not any(m["round"] > 4 for m in store.device_metrics(run.id))
    assert store.latest_checkpoint(run.id)[0] == 4
    # one row per (round, device, phase): the re-run round 3 replaced the old one
    rows = [(m["round"], m["device"], m["phase"]) for m in store.device_metrics(run.id)]
    assert len(rows) == len(set(rows))
    # Aggregates computed (what differential privacy counts): rounds 1-3, then round 3 again
    # after the resume (the first one may have reached the devices) and 4.
    assert store.latest_checkpoint(run.id)[1]["aggregates"] == 5
    # Resuming a finished run with no more rounds asks no device to train.
    cfg3, grid3 = _federation(device_dirs, tmp_path, **{"num-server-rounds": 4, "resume": "dep"})
    _run(grid3, cfg3, store)
    assert "train" not in grid3.types and store.rounds(run.id) == after


def test_too_few_training_devices_left_fail_the_run_instead_of_hanging(device_dirs, tmp_path):
    """Flower's sampling waits without end for the strategy's minimum of devices; the
    coordinator waits ``round-timeout`` and fails the run (which can be resumed)."""
    cfg, grid = _federation(device_dirs, tmp_path, **{"min-train-devices": 3, "round-timeout": 1.0,
                                                       "num-server-rounds": 3})
    nodes = grid.get_node_ids()
    online = grid.get_node_ids

    def going(messages, *, timeout=None):  # a device goes offline after the first exchange
        replies = type(grid).send_and_receive(grid, messages, timeout=timeout)
        if any(m.metadata.message_type == "train" for m in messages):
            grid.get_node_ids = lambda: [n for n in online() if n != nodes[-1]]
        return replies

    grid.send_and_receive = going
    store = RunStore(cfg.store_url)
    with pytest.raises(RuntimeError, match="only 2 of min-train-devices=3"):
        _run(grid, cfg, store)
    assert store.get_run("dep").status == "failed" and [r["round"] for r in store.rounds(store.get_run("dep").id)] == [0]


def test_resume_of_an_unknown_run_is_refused(device_dirs, tmp_path):
    cfg, grid = _federation(device_dirs, tmp_path, resume="nope")
    with pytest.raises(KeyError, match="nope"):
        _run(grid, cfg, RunStore(cfg.store_url))


def test_a_missing_device_is_waited_for_then_refused(device_dirs, tmp_path):
    cfg, grid = _federation(device_dirs, tmp_path, **{"min-devices": 4, "round-timeout": 1.0})
    store = RunStore(cfg.store_url)
    store.enrol_device("pi-b", 999, "ecdsa-sha2-nistp384 BBBB", "SHA256:y", {})  # enrolled, never started
    with pytest.raises(RuntimeError, match=r"only 3 of min-devices=4 .*\(not connected: pi-b\)"):
        _run(grid, cfg, store)
    assert store.get_run("dep").status == "failed"


@pytest.mark.parametrize("deployed", [True, False])
def test_a_stopped_run_is_stored_as_stopped_not_as_a_traceback(device_dirs, tmp_path, deployed):
    """Flower ends a ServerApp whose run was stopped (train interrupted, flwr stop) by a signal;
    an in-process simulation is stopped by Ctrl-C, and has no `train --resume`."""
    from server.app import PollingGrid

    cfg, grid = _federation(device_dirs, tmp_path)
    store = RunStore(cfg.store_url)
    grid = PollingGrid(grid) if deployed else grid

    def stopped(*args, **kwargs):
        raise SystemExit(0) if deployed else KeyboardInterrupt

    grid.send_and_receive = stopped
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        _run(grid, cfg, store)
    run = store.get_run("dep")
    assert run.status == "failed" and "Traceback" not in run.error
    if deployed:
        assert run.error.startswith("stopped (SystemExit): the run was stopped on the SuperLink")
        assert "--resume dep" in run.error
    else:
        assert run.error == "stopped (KeyboardInterrupt): interrupted"


def test_train_resume_needs_a_known_run(tmp_path):
    from server.deployment import train

    init_server(tmp_path / "st", names=["localhost"])
    with pytest.raises(KeyError):
        train(tmp_path / "st", resume=f"missing-{uuid.uuid4().hex[:4]}")


@pytest.fixture()
def coordinator(tmp_path, monkeypatch):
    """An initialised state directory whose ``flwr run`` is a stand-in: each submitted run
    config is kept in ``configs``; ``then(log_path, config)`` plays the run (its default
    does what the ServerApp does to the store: reopens or creates the run, completes it)."""
    import tomllib
    from types import SimpleNamespace

    import server.deployment as deployment
    from server.superlink import FlowerRun

    paths = init_server(tmp_path / "st", names=["localhost"], emotions=EMOTIONS)
    fake = SimpleNamespace(paths=paths, store=ServerConfig.load(paths.config).store(paths), configs=[])

    def server_app(log_path, config):
        run = fake.store.reopen_run(config["resume"], config)[0] if config["resume"] else \
            fake.store.create_run(config["run-name"], config)
        fake.store.finish_run(run.id, "completed")

    def follow_run(app_dir, connection, run_config, env, cwd, *, log_path, **_):
        config = tomllib.loads(run_config.read_text())
        fake.configs.append(config)
        fake.then(log_path, config)
        return FlowerRun(1, "finished:completed", 0.0)

    fake.then = server_app
    monkeypatch.setattr(deployment, "follow_run", follow_run)
    monkeypatch.setattr(deployment, "stage_app", lambda dest: dest)
    return fake


def _train(coordinator, *args):
    from typer.testing import CliRunner

    from fedaffect.cli import app as cli

    return CliRunner().invoke(cli, ["train", "--state-dir", str(coordinator.paths.root), *args])


def test_a_resumed_run_keeps_its_config_and_refuses_options_that_would_change_it(coordinator):
    stored = RunConfig.from_mapping({"emotions": EMOTIONS, "num-server-rounds": 2, "run-name": "r1"}).to_mapping()
    coordinator.store.create_run("r1", stored)
    res = _train(coordinator, "--resume", "r1", "--rounds", "3", "--set", "round-timeout=99", "--strategy", "fair",
                 "--set", "lr=0.01", "--run-name", "r2")
    assert res.exit_code == 2, res.output
    for named in ("strategy 'fedavg' -> 'fair'", "lr 0.003 -> 0.01", "run-name 'r1' -> 'r2'", "stored config"):
        assert named in res.output
    assert "round-timeout 600" not in res.output and coordinator.configs == []  # nothing submitted
    # operational keys change and are stored; a value equal to the stored one (an experiment
    # file given again) is no change
    res = _train(coordinator, "--resume", "r1", "--rounds", "3", "--set", "round_timeout=99", "--min-devices", "2",
                 "--set", "min-train-devices=2", "--strategy", "fedavg", "--set", "lr=3e-3")
    assert res.exit_code == 0, res.output
    (sent,) = coordinator.configs
    assert sent["resume"] == "r1" and sent["strategy"] == "fedavg"
    changed = {"num-server-rounds": 3, "round-timeout": 99.0, "min-devices": 2, "min-train-devices": 2}
    assert {k: sent[k] for k in changed} == changed
    assert {k: coordinator.store.get_run("r1").config[k] for k in changed} == changed
    # the `resume` key is --resume's; a new run may not take a stored run's name
    assert _train(coordinator, "--set", "resume='r1'").exit_code == 2
    res = _train(coordinator, "--run-name", "r1")
    assert res.exit_code == 2 and "stored already" in res.output and "--resume r1" in res.output
    assert len(coordinator.configs) == 1


def test_a_train_stopped_before_its_run_was_stored_leaves_nothing_and_offers_no_resume(coordinator):
    runs = coordinator.paths.runs

    def stop(reason, stored=False, logged=""):
        def then(log_path, config):
            if logged:
                log_path.write_text(logged)
            if stored:
                coordinator.store.create_run(config["run-name"], config)
            raise reason
        return then

    coordinator.then = stop(KeyboardInterrupt())  # Ctrl-C while the app is being submitted
    res = _train(coordinator, "--run-name", "early")
    assert res.exit_code == 130 and "stopped (Ctrl-C): the run was not stored" in res.output, res.output
    assert "--resume" not in res.output and "run the same command again" in res.output
    assert not (runs / "early").exists()
    coordinator.then = stop(RuntimeError("flwr run could not submit the app: connection refused"))  # no SuperLink
    res = _train(coordinator, "--run-name", "down")
    assert res.exit_code == 1 and "could not submit" in res.output and "nothing to resume" in res.output
    assert "--resume" not in res.output and not (runs / "down").exists()
    # what the run said before it was stored stays, as the only trace of it
    coordinator.then = stop(KeyboardInterrupt("SIGHUP"), logged="[run] ServerApp: ImportError\n")
    res = _train(coordinator, "--run-name", "said")
    assert res.exit_code == 130 and str(runs / "said" / "flower.log") in res.output
    assert "--resume" not in res.output
    # stopped after the ServerApp stored it: marked failed, kept, and resumable
    coordinator.then = stop(KeyboardInterrupt("SIGTERM"), stored=True)
    res = _train(coordinator, "--run-name", "late")
    assert res.exit_code == 130 and "stopped (SIGTERM): the run is stopped on the devices" in res.output
    assert "--resume late` continues it" in res.output
    assert coordinator.store.get_run("late").status == "failed" and (runs / "late").is_dir()
    with pytest.raises(KeyError):
        coordinator.store.get_run("early")


# --------------------------------------------------------------------------- TLS as a device sees it


@pytest.fixture()
def https_server(tmp_path):
    """Start an HTTPS server on localhost with a given certificate; yields a starter."""
    import http.server
    import ssl
    import threading

    servers = []

    def start(cert, key) -> int:
        from shared_models.security import write_private_key

        write_certificate(tmp_path / "srv.crt", cert)
        write_private_key(tmp_path / "srv.key", key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
        httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return httpd.server_address[1]

    yield start
    for httpd in servers:
        httpd.shutdown()


@pytest.mark.parametrize("case, reason", [
    ("good", None), ("expired", "expired"), ("other-ca", "unable to get local issuer"),
    ("self-signed", "self-signed"), ("wrong-host", "mismatch"),
])
def test_a_device_refuses_a_superlink_it_cannot_trust(tmp_path, https_server, case, reason):
    from client.deployment import DeviceRefused, probe_superlink

    ca, ca_key = make_ca()
    write_certificate(tmp_path / "ca.crt", ca)
    other, other_key = make_ca("another CA")
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    cert, key = {
        "good": lambda: make_server_certificate(ca, ca_key, ["localhost"]),
        "expired": lambda: make_server_certificate(ca, ca_key, ["localhost"], days=2, not_before=old),
        "other-ca": lambda: make_server_certificate(other, other_key, ["localhost"]),
        "self-signed": lambda: (other, other_key),
        "wrong-host": lambda: make_server_certificate(ca, ca_key, ["coord.example.org"]),
    }[case]()
    port = https_server(cert, key)
    if reason is None:
        assert probe_superlink(f"localhost:{port}", tmp_path / "ca.crt") == "ok"
    else:
        with pytest.raises(DeviceRefused, match=reason):
            probe_superlink(f"localhost:{port}", tmp_path / "ca.crt")


def test_an_unreachable_superlink_is_not_an_error(tmp_path):
    from client.deployment import probe_superlink
    from shared_models.processes import free_port

    ca, _ = make_ca()
    write_certificate(tmp_path / "ca.crt", ca)
    assert probe_superlink(f"localhost:{free_port()}", tmp_path / "ca.crt").startswith("unreachable")


# --------------------------------------------------------------------------- the coordinator's process


def test_server_start_serves_tls_and_stops_cleanly_on_sigterm(tmp_path):
    """A real `fedaffect server start`: healthy over HTTPS with the federation's CA, and
    SIGTERM stops it and every process it started (exit code 0)."""
    import signal
    import ssl
    import subprocess
    import sys
    import time
    import urllib.request

    from shared_models.processes import descendants, free_port

    port = free_port()
    paths = init_server(tmp_path / "st", names=["localhost"], port=port)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedaffect"), "server", "start", "--state-dir",
                             str(paths.root)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    deadline, healthy = time.monotonic() + 90, False
    while time.monotonic() < deadline and not healthy and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"https://localhost:{port}/health", timeout=2, context=context) as res:
                healthy = res.status == 200
        except OSError:
            time.sleep(0.5)
    children = descendants(proc.pid)
    # a second coordinator on the same state dir is refused, not told "SuperLink up" by the first's health check
    second = subprocess.run([str(Path(sys.executable).parent / "fedaffect"), "server", "start", "--state-dir",
                             str(paths.root)], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already running" in second.stdout + second.stderr
    assert "SuperLink up" not in second.stdout + second.stderr
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert healthy, output
    assert proc.returncode == 0, output
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    assert children and not any(running(pid) for pid in children)
    assert (paths.logs / "superlink.log").exists() and paths.superlink_db.exists()


def test_a_failing_device_tells_the_coordinator_the_error_type_only(tmp_path, caplog):
    """Flower sends a handler's exception text to the coordinator; fedaffect's name the
    device's files, so only the type leaves the device and the details stay in its log."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    secret = tmp_path / "alice-private-recordings"
    secret.mkdir()  # no manifest.csv: loading the device fails
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=MessageType.EVALUATE)
    context = Context(run_id=7, node_id=1, node_config={"data-dir": str(secret)}, state=RecordDict(),
                      run_config=RunConfig(manifest="x.csv").to_mapping())
    with caplog.at_level(logging.ERROR, logger="fedaffect.client"):
        with pytest.raises(RuntimeError) as err:
            client_app(msg, context)
    assert "device failed" in str(err.value) and "alice" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained original either
    assert "alice-private-recordings" in caplog.text  # the device's own log has the details


def test_a_state_dir_without_its_server_key_is_a_configuration_error(tmp_path):
    """Exit code 2 (systemd does not restart it) with the command that repairs it, not
    Flower's complaint about an argument."""
    from server.deployment import start_server
    from shared_models.security import CertificateError

    paths = init_server(tmp_path / "st", names=["localhost"], port=18556)
    paths.server_key.unlink()
    with pytest.raises(CertificateError, match=r"server\.key is missing: .*--renew"):
        start_server(paths.root)


def test_a_second_device_start_on_one_data_dir_is_refused(tmp_path):
    """Two SuperNodes with one key: the SuperLink would refuse the second as if unenrolled."""
    from client.deployment import DevicePaths, _lock_data_dir

    paths = DevicePaths(tmp_path)
    first = _lock_data_dir(paths)
    try:
        with pytest.raises(RuntimeError, match=rf"another `fedaffect device start` is running on .* \(pid {os.getpid()}\)"):
            _lock_data_dir(paths)
    finally:
        first.close()
    _lock_data_dir(paths).close()  # released with the first one


@pytest.mark.parametrize("superlink", ["localhost", "localhost:", ":8000", "coord:80x0", "coord:70000"])
def test_a_superlink_address_without_a_port_is_an_option_error(tmp_path, superlink):
    """Flower would accept it, fail to parse it in the background and retry forever."""
    from typer.testing import CliRunner

    from fedaffect.cli import app as cli

    init_device(tmp_path / "dev")
    res = CliRunner().invoke(cli, ["device", "start", "--data-dir", str(tmp_path / "dev"), "--superlink", superlink,
                                   "--ca", str(tmp_path / "ca.crt")])
    assert res.exit_code == 2 and "is not HOST:PORT" in res.output


@pytest.mark.parametrize("output, refused", [
    # what Flower's SuperNode prints when the SuperLink stops accepting its key (unenrolled)
    (["INFO :      SuperNode ID: 42", "INFO :      SuperNode terminated gracefully."], True),
    # it also exits 0 after giving up a lost connection (--max-wait) or an error it does not retry
    (["INFO :      SuperNode ID: 42", "WARNING :   Giving up reconnection after 10.00 seconds and 5 tries.",
      "INFO :      SuperNode terminated gracefully."], False),
    (["ERROR :     Server error '500 Internal Server Error'", "INFO :      SuperNode terminated gracefully."], False),
])
def test_a_supernode_that_stops_by_itself_is_told_apart(tmp_path, monkeypatch, output, refused):
    """Exit 3 (not restarted by systemd) only for a device the SuperLink no longer accepts;
    a SuperNode that stopped after an error is a failure to restart from (exit 1)."""
    import sys

    import client.deployment as deployment

    data_dir = tmp_path / "dev"
    init_device(data_dir)
    (data_dir / "manifest.csv").write_text("path,speaker\n")
    script = "; ".join(f"print({line!r})" for line in output)
    monkeypatch.setattr(deployment, "supernode_command", lambda *a, **k: [sys.executable, "-c", script])
    monkeypatch.setattr(deployment, "check_certificate", lambda *a, **k: [])
    monkeypatch.setattr(deployment, "probe_superlink", lambda *a, **k: "ok")
    if refused:
        with pytest.raises(deployment.DeviceRefused, match="no longer accepts this device"):
            deployment.start_device(data_dir, "localhost:9999", tmp_path / "ca.crt")
    else:
        with pytest.raises(RuntimeError, match="stopped after an error") as err:
            deployment.start_device(data_dir, "localhost:9999", tmp_path / "ca.crt")
        assert not isinstance(err.value, deployment.DeviceRefused)

