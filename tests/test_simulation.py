"""End-to-end federations with the in-process engine: the real ServerApp and ClientApp."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedaffect.cli import app as cli
from server.app import run_federation
from server.simulation import InProcessGrid, prepare_run, simulate
from server.store import RunStore
from shared_models.config import RunConfig


def test_three_device_federation_improves_over_round_zero(synth_manifest, tmp_path):
    # 4 speakers, 4 folds: 3 training devices, 1 held-out speaker never trained on.
    cfg = RunConfig(manifest=str(synth_manifest), folds=4, fold=0, num_server_rounds=2, local_epochs=3,
                    task="both", run_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    threads, seen = torch.get_num_threads(), []
    summary = simulate(cfg, all_folds=False, progress=False, on_round=lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 1] and torch.get_num_threads() == threads  # egemaps-mlp: one thread, then restored
    rounds = summary["folds"][0]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["train_devices"] == 3
    assert rounds[-1]["uar"] > rounds[0]["uar"] + 0.1
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert rounds[-1]["ccc_arousal"] > rounds[0]["ccc_arousal"]
    store = RunStore(summary["config"]["store-url"])
    run = store.get_run(summary["runs"][0])
    assert run.status == "completed"
    evaluated = {d["device"] for d in store.device_metrics(run.id) if d["phase"] == "evaluate"}
    trained = {d["device"] for d in store.device_metrics(run.id) if d["phase"] == "train"}
    assert len(evaluated) == 1 and not evaluated & trained  # held-out speaker only evaluates


def test_a_failing_device_does_not_stop_the_round(tone_manifest, tmp_path):
    from client.app import app as client_app

    cfg, n = prepare_run(RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=2, run_name="flaky",
                                   run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")), progress=False)

    def flaky(msg, context):
        if context.node_config["partition-id"] == 1 and msg.metadata.message_type == "train":
            raise RuntimeError("battery died")
        return client_app(msg, context)

    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    summary = run_federation(InProcessGrid(flaky, nodes, cfg.to_mapping(), 7), cfg, RunStore(cfg.store_url))
    last = summary["rounds"][-1]
    assert (last["train_devices"], last["train_failures"]) == (n - 1, 1)
    assert math.isfinite(last["uar"])


def test_a_device_that_connects_during_a_run_joins_it(tone_manifest, tmp_path):
    """A SuperNode that connects after the run's census (started late, or let back in by the
    SuperLink only once a crash's stale heartbeat expired) trains from the next round on,
    its cooperative counts included, instead of sitting idle until the next run."""
    from client.app import app as client_app
    from flwr.supercore.task_identity import TaskIdentity

    cfg, n = prepare_run(RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=3, run_name="late",
                                   run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")), progress=False)

    class LateGrid(InProcessGrid):
        """Partition 1's node connects once round 1's training is over."""

        def __init__(self, *args):
            super().__init__(*args)
            self.late = next(i for i, c in self._contexts.items() if c.node_config["partition-id"] == 1)
            self.connected = False

        def get_node_ids(self):
            return [i for i in super().get_node_ids() if self.connected or i != self.late]

        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            self.connected |= any(r.metadata.message_type == "train" for r in replies)
            return replies

    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    store = RunStore(cfg.store_url)
    summary = run_federation(LateGrid(client_app, nodes, cfg.to_mapping(), 7), cfg, store)
    assert [(r["train_devices"], r["train_failures"]) for r in summary["rounds"][1:]] == [(n - 1, 0), (n, 0), (n, 0)]
    rows = store.device_metrics(store.get_run("late").id)
    trained = {d["device"] for d in rows if d["phase"] == "train" and d["round"] == 1}
    assert len(trained) == n - 1 and len({d["device"] for d in rows if d["phase"] == "train"}) == n
    assert summary["rounds"][-1]["coop_labelled"] == sum(1 for _ in open(tone_manifest)) - 1  # every device counted


def test_a_round_where_every_device_fails_fails_the_run(tone_manifest, tmp_path):
    """One failing device is tolerated; all of them failing (a config no device can run) must
    not go on to a run stored as completed with nothing trained."""
    from client.app import app as client_app
    from flwr.supercore.task_identity import TaskIdentity

    cfg, n = prepare_run(RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=2, run_name="broken",
                                   run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")), progress=False)

    def broken(msg, context):
        if msg.metadata.message_type == "train":
            raise RuntimeError("no such device: cuda")
        return client_app(msg, context)

    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    store = RunStore(cfg.store_url)
    with pytest.raises(RuntimeError, match=rf"every device failed to train round 1: no such device: cuda \({n}x\)"):
        run_federation(InProcessGrid(broken, nodes, cfg.to_mapping(), 7), cfg, store)
    run = store.get_run("broken")
    assert run.status == "failed" and "every device failed" in run.error


def test_a_one_off_failure_of_the_only_sampled_device_does_not_fail_the_run(tone_manifest, tmp_path):
    """fraction-train 0.25 samples one device of four: its one error (a drive briefly gone)
    is a dropped-out round, not a broken run; three such rounds in a row are."""
    from client.app import app as client_app
    from flwr.supercore.task_identity import TaskIdentity

    def run(name, failing_rounds):
        cfg, n = prepare_run(RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=4, run_name=name,
                                       fraction_train=0.25, run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")),
                             progress=False)

        def flaky(msg, context):
            if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) in failing_rounds:
                raise RuntimeError("drive not mounted")
            return client_app(msg, context)

        nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
        return run_federation(InProcessGrid(flaky, nodes, cfg.to_mapping(), 7), cfg, RunStore(cfg.store_url))

    rounds = run("once", {2})["rounds"]
    assert [(r["train_devices"], r["train_failures"]) for r in rounds[1:]] == [(1, 0), (0, 1), (1, 0), (1, 0)]
    with pytest.raises(RuntimeError, match=r"every device failed to train round 4 \(3 exchanges in a row\)"):
        run("thrice", {2, 3, 4})


def test_runs_with_one_seed_sample_the_same_devices(tone_manifest, tmp_path):
    """fraction-train < 1: Flower samples devices with Python's random module, seeded by the
    run's seed, so that two strategies compared on one seed see the same devices."""
    import random

    def sampled(name):
        cfg = RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=3, fraction_train=0.5,
                        run_name=name, run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
        summary = simulate(cfg, all_folds=False, progress=False)
        store = RunStore(summary["config"]["store-url"])
        rows = store.device_metrics(store.get_run(summary["runs"][0]).id)
        return sorted((d["round"], d["device"]) for d in rows if d["phase"] == "train")

    first = sampled("a")
    random.seed(12345)  # whatever state the module was left in
    assert sampled("b") == first and len({d for _, d in first}) > 1


def test_cli_simulate_writes_summary_and_report(tone_manifest, tmp_path):
    out = tmp_path / "summary.json"
    res = CliRunner().invoke(cli, [
        "simulate", "--manifest", str(tone_manifest), "--folds", "2", "--rounds", "2", "--task", "both",
        "--run-dir", str(tmp_path / "runs"), "--summary-json", str(out), "--set", f"cache-dir='{tmp_path / 'c'}'",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert summary["config"]["num-server-rounds"] == 2
    assert len(summary["folds"]) == 2 and len(summary["final"]["uar"]["folds"]) == 2
    for key in ("uar", "wa", "macro_f1", "ccc_arousal", "ccc_valence"):
        values = summary["final"][key]["folds"]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (key, values)
        assert summary["final"][key]["mean"] == pytest.approx(np.mean(values))
        assert summary["final"][key]["std"] == pytest.approx(np.std(values))
    assert set(summary["per_group"]["gender"]) == {"female", "male"}
    # the per-round table's numbers: each round's mean over the folds, confusion counts summed
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for i, row in enumerate(summary["rounds"]):
        folds = [f["rounds"][i] for f in summary["folds"]]
        assert row["uar"] == pytest.approx(np.mean([f["uar"] for f in folds]))
        assert row["confusion"] == (np.asarray(folds[0]["confusion"]) + folds[1]["confusion"]).tolist()
    assert "2 folds" in res.output and "std" in res.output  # mean and std over the folds
    from rich.console import Console

    from fedaffect.cli import _final_table

    console = Console(record=True, width=100)
    console.print(_final_table({**summary, "folds": summary["folds"][:1]}))  # one fold: no std to show
    one = console.export_text()
    assert "value" in one and "std" not in one and "folds" not in one
    assert "reports, one per fold" in res.output
    assert all((tmp_path / "runs" / name / "report" / "index.html").exists() for name in summary["runs"])
    report = tmp_path / "runs" / summary["runs"][-1] / "report"
    for png in ("loss.png", "metrics.png", "groups.png", "confusion.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    html = (report / "index.html").read_text()
    assert "metrics.png" in html and summary["runs"][-1] in html
    assert "Final round (metrics: held-out devices)" in html and "<td>n</td><td>" in html
    from fedaffect.cli import _evaluated_on

    assert "holds out nobody" in _evaluated_on({"config": {"folds": 1}})  # folds = 1: in-sample numbers
    listed = CliRunner().invoke(cli, ["runs", "--run-dir", str(tmp_path / "runs")])
    assert listed.exit_code == 0 and "completed" in listed.output
    typo = CliRunner().invoke(cli, ["runs", "--run-dir", str(tmp_path / "rnus")])
    assert typo.exit_code == 2 and "no run store" in typo.output and not (tmp_path / "rnus").exists()


def test_a_fold_named_in_the_experiment_file_runs_that_fold_only(tone_manifest, tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(f'manifest = "{tone_manifest}"\nfolds = 2\nfold = 1\nnum-server-rounds = 1\n'
                   f'cache-dir = "{tmp_path / "c"}"\n')
    out = tmp_path / "summary.json"
    res = CliRunner().invoke(cli, ["simulate", "--config", str(exp), "--run-dir", str(tmp_path / "runs"),
                                   "--summary-json", str(out), "--no-report"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())["folds"]) == 1


@pytest.mark.parametrize("args,message", [
    (["--manifest", "/nonexistent/m.csv"], "m.csv"),
    (["--set", "num-server-round=3"], "num-server-round"),
    (["--model", "resnet-9000"], "resnet-9000"),
])
def test_cli_simulate_fails_clearly(tone_manifest, tmp_path, args, message):
    base = ["simulate", "--manifest", str(tone_manifest), "--folds", "2", "--rounds", "1",
            "--run-dir", str(tmp_path / "runs")]
    res = CliRunner().invoke(cli, base + args)
    assert res.exit_code != 0
    assert message in res.output


@pytest.mark.parametrize("folds", [1, 4], ids=["in-sample", "held-out"])
def test_one_exchange_per_round_and_its_evaluation_is_the_stored_models(tone_manifest, tmp_path, folds):
    # Round r's evaluation travels with round r + 1's train messages: R rounds take R + 1
    # exchanges, no device gets two messages in one, and the metrics stored for a round equal
    # a plain evaluation of the model that was sent.
    from client.app import app as client_app
    from server.app import _evaluation_messages, _evaluation_part, _pool_evaluation

    class CountingGrid(InProcessGrid):
        exchanges: list = []

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            self.exchanges.append(messages)
            return super().send_and_receive(messages, timeout=timeout)

    cfg, n = prepare_run(RunConfig(manifest=str(tone_manifest), folds=folds, fold=0, num_server_rounds=2,
                                   run_name="pipelined", run_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")),
                         progress=False)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    grid = CountingGrid(client_app, [{"partition-id": i, "num-partitions": n} for i in range(n)], cfg.to_mapping(), 7)
    store = RunStore(cfg.store_url)
    summary = run_federation(grid, cfg, store)
    rounds = grid.exchanges[1:]  # the first one asks the devices to describe themselves
    assert len(rounds) == cfg.num_server_rounds + 1
    kinds = [sorted({m.metadata.message_type for m in ex}) for ex in rounds]
    if folds == 1:  # the training devices evaluate the model before they train it
        assert kinds == [["train"], ["train"], ["evaluate"]]
    else:
        assert kinds == [["evaluate", "train"], ["evaluate", "train"], ["evaluate"]]
    for ex in rounds:
        targets = [m.metadata.dst_node_id for m in ex]
        assert len(targets) == len(set(targets))
    # round 1's model went out with round 2's train messages: evaluate it the plain way
    sent = rounds[1][0].content["arrays"]
    eval_nodes = [m.metadata.dst_node_id for m in rounds[-1]]
    replies = InProcessGrid.send_and_receive(grid, _evaluation_messages(eval_nodes, sent, 1))
    plain, _, _ = _pool_evaluation([_evaluation_part(r) for r in replies], len(eval_nodes))
    stored = summary["rounds"][1]
    assert stored["round"] == 1 and stored["train_devices"] == len(rounds[1]) - (folds > 1)
    assert stored["uar"] == pytest.approx(plain["uar"])
    assert stored["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def test_cli_simulate_exits_1_when_the_run_fails_and_stores_it_failed(tone_manifest, tmp_path):
    """A run that fails (here: devices never reach min-devices) must not look like a success."""
    res = CliRunner().invoke(cli, ["simulate", "--manifest", str(tone_manifest), "--folds", "1", "--rounds", "1",
                                   "--run-dir", str(tmp_path / "runs"), "--no-report",
                                   "--set", "min-devices=99", "--set", "round-timeout=0.5",
                                   "--set", f"cache-dir='{tmp_path / 'c'}'"])
    assert res.exit_code == 1 and "simulation failed" in res.output, res.output
    (run,) = RunStore(f"sqlite:///{tmp_path / 'runs' / 'fedaffect.db'}").list_runs()
    assert run.status == "failed" and "min-devices" in run.error


def test_fedprox_devices_apply_the_servers_proximal_mu(tone_manifest, tmp_path):
    """``proximal-mu`` travels in the round config (Flower's FedProx) and the devices use it:
    with a strong proximal term the global model moves less per round than with FedAvg."""
    from tests.test_dp import _checkpoints, _step_norms

    steps = {}
    for strategy in ("fedavg", "fedprox"):
        cfg = RunConfig(manifest=str(tone_manifest), folds=1, num_server_rounds=2, local_epochs=3, strategy=strategy,
                        proximal_mu=50.0, run_name=strategy, run_dir=str(tmp_path / "runs"),
                        cache_dir=str(tmp_path / "cache"))
        simulate(cfg, all_folds=False, progress=False)
        steps[strategy] = _step_norms(_checkpoints(cfg, strategy))
    assert all(p < 0.7 * f for p, f in zip(steps["fedprox"], steps["fedavg"])), steps


@pytest.mark.parametrize("changes,match", [
    ({"emotions": "anger,sadness,surprise"}, r"\['surprise'\] have no clip"),  # UAR would skip the class
    ({"faireg": "on", "task": "av", "faireg_reference": "Female"},  # the run would be stored, then fail
     r"faireg-reference 'Female' is not a group .* known: female, male"),
    pytest.param({"compute_device": "cuda"}, "torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_a_simulation_no_device_could_run_is_refused_before_it_starts(changes, match, tone_manifest, tmp_path):
    cfg = RunConfig(manifest=str(tone_manifest), run_dir=str(tmp_path), cache_dir=str(tmp_path / "c")).replace(**changes)
    with pytest.raises(ValueError, match=match):
        prepare_run(cfg, progress=False)
    assert not (tmp_path / "c").exists()  # refused before any feature was extracted


def test_final_table_shows_delta_with_epsilon_and_every_trained_dimension_per_group():
    from rich.console import Console

    from fedaffect.cli import _final_table

    summary = {
        "config": {"task": "av", "dp": "client", "dp-delta": 1e-5},
        "folds": [{}],
        "final": {"ccc_arousal": {"mean": 0.8, "std": 0.0}, "dp_epsilon": {"mean": None, "std": None}},
        "per_group": {"gender": {"female": {"ccc_arousal": 0.7, "ccc_valence": 0.2},
                                 "male": {"ccc_arousal": 0.75, "ccc_valence": 0.4}},
                      "speaker": {"s1": {"ccc_arousal": None, "ccc_valence": None}}},
    }
    console = Console(record=True, width=120)
    console.print(_final_table(summary))
    text = console.export_text()
    assert "dp_epsilon (delta 1e-05)" in text and "no privacy guarantee" in text
    assert "ccc_valence gender=female" in text and "ccc_valence gender=male" in text
    assert "speaker=s1" not in text and "uar gender" not in text


def test_a_resumed_simulation_continues_its_one_fold_with_its_stored_config(tone_manifest, tmp_path):
    """Resuming with the original command (every fold) must continue the stored run alone:
    each fold resuming the one run gave a '2 folds' summary of one run, std 0, and stored the
    last fold's number in a run trained on another fold's speakers."""
    runs, out = tmp_path / "runs", tmp_path / "summary.json"
    base = ["simulate", "--manifest", str(tone_manifest), "--folds", "2", "--run-dir", str(runs), "--no-report",
            "--set", f"cache-dir='{tmp_path / 'c'}'"]
    res = CliRunner().invoke(cli, base + ["--rounds", "1", "--set", "run-name=exp"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, base + ["--rounds", "2", "--set", "resume=exp-fold0", "--summary-json", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert summary["runs"] == ["exp-fold0"] and len(summary["final"]["uar"]["folds"]) == 1
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    store = RunStore(f"sqlite:///{runs / 'fedaffect.db'}")
    assert store.get_run("exp-fold0").config["fold"] == 0 and len(store.rounds(store.get_run("exp-fold1").id)) == 2
    # the option, with a key that would change what the run trains: refused, by name
    res = CliRunner().invoke(cli, base + ["--resume", "exp-fold1", "--seed", "3"])
    assert res.exit_code == 2 and "seed 0 -> 3" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, base + ["--resume", "exp-fold7"])
    assert res.exit_code == 2 and "no such run" in res.output and "Traceback" not in res.output
    with pytest.raises(ValueError, match="one stored run, one fold"):
        simulate(RunConfig(manifest=str(tone_manifest), folds=2, resume="exp-fold1", run_dir=str(runs)))


def test_cli_simulate_names_skipped_clips_in_one_line_without_python_source(tone_manifest, tmp_path):
    """A silent clip in a manifest is skipped with a warning for the user, not Python's
    ``file.py:329: SkippedClipsWarning`` and the line of source that raised it."""
    import pandas as pd
    import soundfile as sf

    df = pd.read_csv(tone_manifest)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    df.loc[0, "path"] = str(silent)
    manifest = tmp_path / "m.csv"
    df.to_csv(manifest, index=False)
    res = CliRunner().invoke(cli, ["simulate", "--manifest", str(manifest), "--folds", "1", "--rounds", "1",
                                   "--run-dir", str(tmp_path / "runs"), "--no-report",
                                   "--set", f"cache-dir='{tmp_path / 'c'}'"])
    assert res.exit_code == 0, res.output
    assert "warning: skipped 1 of 24 clips" in res.output and "1 silent" in res.output
    assert "SkippedClipsWarning" not in res.output and "skipped.warn(" not in res.output


def test_a_command_called_from_python_gets_its_declared_defaults_not_typer_option_objects():
    # demo calls simulate this way: an option added to simulate later must not leak in as a
    # typer.Option object (it did: the demo failed with "config key 'resume': expected str")
    import typer

    from fedaffect.cli import call_command

    def command(manifest: str = typer.Option(...), rounds: int = typer.Option(10), sets: list[str] = typer.Option([]),
                plain: str = "x") -> dict:
        return {"manifest": manifest, "rounds": rounds, "sets": sets, "plain": plain}

    assert call_command(command, manifest="m.csv") == {"manifest": "m.csv", "rounds": 10, "sets": [], "plain": "x"}
    assert call_command(command, manifest="m.csv", rounds=3)["rounds"] == 3
    with pytest.raises(TypeError, match="has no parameter round$"):
        call_command(command, manifest="m.csv", round=3)


def test_runs_lists_a_failed_runs_last_stored_round(tmp_path):
    """A run that failed after some rounds has no summary; `fedaffect runs` shows where it got to."""
    store = RunStore(f"sqlite:///{tmp_path / 'fedaffect.db'}")
    run = store.create_run("cut-short", {"model": "egemaps-mlp"}, "inprocess")
    for r, uar in enumerate((0.25, 0.4375)):
        store.add_round(run.id, r, {"uar": uar}, [], [])
    store.finish_run(run.id, "failed", error="every device failed to train round 2")
    res = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["runs", "--store-url", store.url])
    assert res.exit_code == 0, res.output
    (row,) = [line for line in res.output.splitlines() if "cut-short" in line]
    assert "failed" in row and "0.438" in row and "0.250" not in row
