"""The device's warm SuperExec and faster polls (client/supernode.py) and the ServerApp's
PollingGrid: what they keep of Flower's behaviour, and the Flower internals they rely on.

The end-to-end deployment tests (tests/test_deployment_e2e.py) run whole federations through
them; these check the parts one by one.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from client.supernode import (ForkExecutor, patch_supernode_poll, REPLY_POLL_S, superexec_command,
                              task_input_received)
from server.app import PollingGrid

ROOT = Path(__file__).resolve().parents[1]


def _spec(task_type=TaskType.CLIENT_APP, token="tok") -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=True, task_id=1)


class _Fallback:
    def __init__(self):
        self.launched, self.closed = [], False

    def launch(self, spec):
        self.launched.append(spec)
        from flwr.supercore.superexec.executor.types import LaunchResult
        return LaunchResult.accepted()

    def close(self):
        self.closed = True


def _wait_reaped(executor: ForkExecutor, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.02)
    assert not executor.children, "forked children were not reaped"


def test_warm_imports_keep_dependencies_and_forget_fedaffect():
    # In a fresh interpreter: warm_imports edits sys.modules.
    code = ("import json, sys; from client.supernode import warm_imports; kept = warm_imports(); "
            "print(json.dumps({'kept': kept, 'own': [m for m in sys.modules if m.split('.')[0] in "
            "('client', 'server', 'shared_models', 'strategies', 'fedaffect')]}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the app's imports, and what it imports only on first use (client.app.WARM_MODULES)
    assert {"torch", "numpy", "flwr.clientapp", "torch._dynamo", "sklearn.metrics"} <= set(result["kept"])
    assert not any(m.split(".")[0] == "client" for m in result["kept"])
    assert result["own"] == []  # the run's FAB supplies fedaffect's code


def test_fork_executor_runs_clientapp_tasks_in_a_child_and_hands_others_on(tmp_path):
    seen = tmp_path / "seen.json"

    def run(spec):
        seen.write_text(json.dumps({"pid": os.getpid(), "token": spec.token,
                                    "warm": "flwr.supercore.constant" in sys.modules}))
        raise SystemExit(0)  # what Flower's run_clientapp ends with

    fallback = _Fallback()
    executor = ForkExecutor(fallback, run=run)
    assert executor.launch(_spec(token="abc")).status == LaunchResultStatus.ACCEPTED
    _wait_reaped(executor)
    child = json.loads(seen.read_text())
    assert child["pid"] != os.getpid() and child["token"] == "abc" and child["warm"]
    assert fallback.launched == []

    server_task = _spec(TaskType.SERVER_APP)
    executor.launch(server_task)
    assert fallback.launched == [server_task] and not executor.children


def test_a_failing_child_leaves_the_executor_running(tmp_path):
    marks = tmp_path / "marks"

    def run(spec):
        with open(marks, "a") as f:
            f.write(spec.token + "\n")
        if spec.token == "bad":
            raise RuntimeError("the ClientApp crashed")

    executor = ForkExecutor(_Fallback(), run=run)
    for token in ("bad", "good"):
        executor.launch(_spec(token=token))
        _wait_reaped(executor)
    assert marks.read_text().split() == ["bad", "good"]
    executor.close()
    assert executor.fallback.closed


def test_the_child_does_not_run_the_parents_flower_exit_handlers(tmp_path):
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.exit.exit_handler import add_exit_handler, trigger_exit_handlers

    ran = tmp_path / "parent-handler-ran"
    before = list(exit_handler.registered_exit_handlers)
    add_exit_handler(lambda: ran.write_text("yes"))
    try:
        def run(spec):  # what Flower's flwr_exit does at the end of a task
            trigger_exit_handlers(run_before_force_exit=False)

        executor = ForkExecutor(_Fallback(), run=run)
        executor.launch(_spec())
        _wait_reaped(executor)
        assert not ran.exists()
    finally:
        exit_handler.registered_exit_handlers[:] = before


def test_supernode_poll_patch_caps_flowers_sleeps(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    source = inspect.getsource(loop.start_client_internal)
    assert "time.sleep(3)" in source, "Flower's idle sleep moved: update client/supernode.py"
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages), "Flower's reply wait moved"
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    patch_supernode_poll(0.25)
    loop.time.sleep(3)  # idle: a request to the SuperLink each time
    loop.time.sleep(0.5)  # waiting for the ClientApp's reply: a look at the SuperNode's own state
    loop.time.sleep(0.01)
    assert slept == [0.25, REPLY_POLL_S, 0.01]
    assert loop.time.time is time.time


def test_flower_still_exposes_what_the_warm_superexec_replaces():
    import flwr.supercore.superexec.run_superexec as superexec

    assert callable(superexec.get_executor)
    assert "get_executor(" in inspect.getsource(superexec.run_superexec)
    cmd = superexec_command("127.0.0.1:9094", 0.5, parent_pid=42)
    assert cmd[1:4] == ["-m", "client.supernode", "superexec"] and cmd[-2:] == ["--parent-pid", "42"]


def _restore_pull_defaults(monkeypatch):
    """Flower's object-pull functions, their keyword defaults restored after the test."""
    from flwr.supercore.inflatable import inflatable_utils as pulls

    functions = (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree)
    for fn in functions:
        for key in ("initial_backoff", "max_time"):
            monkeypatch.setitem(fn.__kwdefaults__, key, fn.__kwdefaults__[key])
    return functions


def test_object_pulls_retry_sooner_in_patched_processes(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils as pulls

    from shared_models.processes import PULL_BACKOFF_S, PULL_MAX_TIME_S, shorten_object_pull_backoff

    functions = _restore_pull_defaults(monkeypatch)
    assert all(fn.__kwdefaults__["initial_backoff"] == 1 for fn in functions)  # Flower 1.41's wait
    assert all(fn.__kwdefaults__["max_time"] == 7200 for fn in functions)  # ... and its 2 hours
    shorten_object_pull_backoff()
    assert all(fn.__kwdefaults__["initial_backoff"] == PULL_BACKOFF_S for fn in functions)
    assert all(fn.__kwdefaults__["max_time"] == PULL_MAX_TIME_S for fn in functions)
    assert 60 <= PULL_MAX_TIME_S <= 600  # minutes, not hours
    # the ClientApp's pull goes through the patched function and passes the default on
    from flwr.supernode.runtime import run_clientapp
    assert run_clientapp.pull_and_inflate_object_from_tree is pulls.pull_and_inflate_object_from_tree
    assert "initial_backoff=initial_backoff" in inspect.getsource(pulls.pull_and_inflate_object_from_tree)
    assert "max_time=max_time" in inspect.getsource(pulls.pull_and_inflate_object_from_tree)


def test_a_clientapp_whose_message_never_comes_gives_up_after_minutes(monkeypatch):
    """Bug: a run stopped on the coordinator while the SuperNode was downloading a message
    left the ClientApp asking for its objects every 10 s for up to 2 hours (Flower's
    PULL_MAX_TIME). The pull the ClientApp makes (run_clientapp.pull_task_input) must give
    up once PULL_MAX_TIME_S has passed; a fake clock moves 100 s a miss."""
    from types import SimpleNamespace

    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable import inflatable_utils as pulls

    from shared_models.processes import PULL_MAX_TIME_S, shorten_object_pull_backoff

    _restore_pull_defaults(monkeypatch)
    shorten_object_pull_backoff()
    clock = {"now": 1000.0}
    monkeypatch.setattr(pulls, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    misses = []

    def pull(object_id):  # the SuperNode's answer: object found, never available
        misses.append(object_id)
        if len(misses) > PULL_MAX_TIME_S / 100 + 2:
            raise RuntimeError(f"still asking after {clock['now'] - 1000:.0f} s: the pull has no limit")
        clock["now"] += 100
        raise pulls.ObjectUnavailableError(object_id)

    with pytest.raises(pulls.ObjectPullError, match="timeout"):
        pulls.pull_and_inflate_object_from_tree(ObjectTree(object_id="m"), pull, lambda _id: None)
    assert len(misses) == math.ceil(PULL_MAX_TIME_S / 100)


def _wait_for(path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"the child never wrote {path.name}"


def _waiting_forever(started: Path, *, tell: bool = False, ignore_term: bool = False):
    """A child's ``run``: a ClientApp that waits without end (e.g. for message objects that
    never come), after telling the executor it has its message when ``tell``."""
    def run(spec):
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if tell:
            task_input_received()
        started.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)
    return run


@contextlib.contextmanager
def _one_child(executor):
    """Launch one forked child; yield its pid; SIGKILL it afterwards if the test left it."""
    executor.launch(_spec())
    (pid,) = executor.children
    try:
        yield pid
    finally:
        if executor.children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.parametrize("ignore_term", [False, True])
def test_a_clientapp_that_never_gets_its_message_is_ended(tmp_path, ignore_term):
    """Bug: each run stopped on the coordinator left one forked ClientApp (~240 MB) per
    device, waiting for its message. The executor ends a child that has not received its
    message within input_limit_s (SIGTERM, then SIGKILL kill_grace_s later)."""
    started = tmp_path / "started"
    executor = ForkExecutor(_Fallback(), run=_waiting_forever(started, ignore_term=ignore_term))
    executor.input_limit_s, executor.kill_grace_s = 0, 0  # set after construction: ignored without the limit
    with _one_child(executor):
        _wait_for(started)  # its SIGTERM handling is in place
        _wait_reaped(executor)


def test_a_clientapp_with_its_message_is_ended_only_past_the_task_limit(tmp_path):
    started = tmp_path / "started"
    executor = ForkExecutor(_Fallback(), run=_waiting_forever(started, tell=True))
    executor.input_limit_s = 0  # it said it has its message: this limit no longer applies
    with _one_child(executor) as pid:
        _wait_for(started)  # written after task_input_received()
        for _ in range(3):
            executor.reconcile()
        assert pid in executor.children and executor.children[pid].has_input
        os.kill(pid, 0)  # still running
        executor.task_limit_s = 0
        _wait_reaped(executor)


def test_the_clientapp_task_tells_the_executor_once_flower_has_its_message(monkeypatch):
    """run_clientapp_task wraps Flower's pull_task_input, which run_clientapp looks up by name."""
    import flwr.supernode.runtime.run_clientapp as flower_clientapp

    import client.supernode as supernode

    assert "pull_task_input(client)" in inspect.getsource(flower_clientapp.run_clientapp)
    _restore_pull_defaults(monkeypatch)
    real_tell = supernode.task_input_received
    told, order = [], []
    monkeypatch.setattr(supernode, "task_input_received", lambda: told.append(len(order)))
    monkeypatch.setattr(flower_clientapp, "pull_task_input", lambda client: order.append(client) or "input")

    def fake_run_clientapp(**kwargs):  # what Flower's run_clientapp does first
        assert told == [] and flower_clientapp.pull_task_input("client") == "input"
        order.append("ran")

    monkeypatch.setattr(flower_clientapp, "run_clientapp", fake_run_clientapp)
    supernode.run_clientapp_task(_spec())
    assert order == ["client", "ran"] and told == [1]  # told right after the pull, before the app ran
    real_tell()  # outside a forked child: nothing to tell, no error


def test_the_task_limit_is_flowers_message_lifetime():
    from flwr.app.constants import DEFAULT_TTL

    from client.supernode import INPUT_LIMIT_S, TASK_LIMIT_S
    from shared_models.processes import PULL_MAX_TIME_S

    assert TASK_LIMIT_S == DEFAULT_TTL and PULL_MAX_TIME_S < INPUT_LIMIT_S < TASK_LIMIT_S


class _SlowGrid:
    """Replies to every pushed message after ``lag`` pulls; records pulls."""

    def __init__(self, lag: int) -> None:
        self.lag, self.pulls, self.pushed = lag, 0, []

    def push_messages(self, messages):
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.lag:
            return []
        from types import SimpleNamespace
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), has_error=lambda: False) for i in ids]


def test_polling_grid_collects_every_reply_and_honours_the_timeout():
    grid = _SlowGrid(lag=3)
    replies = PollingGrid(grid, poll_s=0.01).send_and_receive(["a", "b"], timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"] and grid.pulls == 3

    never = _SlowGrid(lag=10**9)
    assert PollingGrid(never, poll_s=0.01).send_and_receive(["a"], timeout=0.1) == []
    assert never.pulls >= 2

    class _HeldGrid(_SlowGrid):
        """The first pull is held past the deadline; the reply arrives meanwhile."""

        def pull_messages(self, ids):
            if self.pulls == 0:
                time.sleep(0.3)
            return super().pull_messages(ids)

    held = _HeldGrid(lag=2)
    replies = PollingGrid(held, poll_s=0.01).send_and_receive(["a"], timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]  # pulled once more after the deadline
    with pytest.raises(ValueError, match="poll_s"):
        PollingGrid(grid, poll_s=0)


def test_a_log_that_cannot_be_written_never_stops_the_output_being_read(tmp_path):
    """A full disk or a failing echo must not leave a service blocked on a full pipe."""
    import collections
    import subprocess
    import sys

    from shared_models.processes import LogPump

    proc = subprocess.Popen([sys.executable, "-c", "for i in range(20000): print('line', i, 'x' * 60)"],
                            stdout=subprocess.PIPE)  # ~1.4 MB: far more than a pipe holds

    def echo(_line):
        raise BrokenPipeError("the terminal went away")

    tail = collections.deque(maxlen=3)
    pump = LogPump(proc.stdout, tmp_path / "no-such-folder" / "x.log", tail, "", on_line=echo)
    assert proc.wait(timeout=60) == 0  # the child never blocked
    pump.join(timeout=10)
    assert tail[-1].startswith("line 19999")


def test_a_service_log_is_rotated_by_size_and_keeps_the_newest_lines(tmp_path):
    """A SuperLink or SuperNode running for months must not fill its disk with one log file."""
    import collections
    import subprocess
    import sys

    from shared_models.processes import LogPump

    path = tmp_path / "supernode.log"
    path.write_text("from an earlier start\n")
    proc = subprocess.Popen([sys.executable, "-c", "for i in range(3000): print('line', i, 'x' * 60)"],
                            stdout=subprocess.PIPE)  # ~220 KB
    pump = LogPump(proc.stdout, path, collections.deque(maxlen=3), "", max_bytes=20_000, backups=3)
    assert proc.wait(timeout=60) == 0
    pump.join(timeout=10)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["supernode.log", "supernode.log.1", "supernode.log.2", "supernode.log.3"]
    assert all(f.stat().st_size <= 20_000 for f in files)
    newest = path.read_text().splitlines()
    assert newest[-1].startswith("line 2999 ")
    # the files in rotation order hold consecutive lines: nothing lost between them
    kept = [line for name in ("supernode.log.3", "supernode.log.2", "supernode.log.1", "supernode.log")
            for line in (tmp_path / name).read_text().splitlines()]
    numbers = [int(line.split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 3000))


def test_polling_grid_names_the_device_of_flowers_own_errors_and_bounds_object_pulls(monkeypatch):
    """Devices killed while uploading their replies held the round for the SuperLink's 180 s
    push session each (Flower pulls a pull's replies one after the other), and Flower's error
    reply named the ServerApp's node ("node 1")."""
    from flwr.app import Error, Message, MessageType, Metadata, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.superlink.grid import http_grid
    from flwr.supercore.task_identity import TaskIdentity

    from server.app import OBJECT_PULL_GRACE_S

    for key, value in (("_run_id", 17), ("_node_id", 0), ("_task_id", 1)):  # messages need a run id
        monkeypatch.setattr(TaskIdentity, key, value, raising=False)

    def with_id(msg, message_id):
        msg.metadata.__dict__["_message_id"] = message_id  # what Flower's push does
        return msg

    limits = []

    def flower_pull_objects(object_ids, pull_object_fn, *, max_time=7200):  # records what it was given
        limits.append(max_time)
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", flower_pull_objects)

    class _Grid:
        def push_messages(self, messages):
            return [with_id(m, f"id{m.metadata.dst_node_id}").metadata.message_id for m in messages]

        def pull_messages(self, ids):
            for _ in range(2):  # two stalled replies' objects, pulled one after the other
                http_grid.pull_objects(object_ids=["o"], pull_object_fn=None)
            # made by Flower in the ServerApp's process: its sender is the ServerApp's own node
            metadata = Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=1, reply_to_message_id="id7",
                                group_id="", created_at=time.time(), ttl=0, message_type="system")
            return [Message(metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                                                           reason="objects unavailable"))]

    sent = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    replies = PollingGrid(_Grid(), poll_s=0.01).send_and_receive([sent], timeout=5)
    assert len(replies) == 1 and replies[0].has_error() and replies[0].error.reason == "objects unavailable"
    assert replies[0].metadata.src_node_id == 7 and replies[0].metadata.message_type == MessageType.TRAIN
    # both pulls end by the round's deadline + grace (not 2 hours, nor 2 x the deadline)
    assert len(limits) == 2 and limits[1] <= limits[0] <= 5 + OBJECT_PULL_GRACE_S and limits[0] > OBJECT_PULL_GRACE_S
    assert http_grid.pull_objects is flower_pull_objects  # restored after the pull

