"""The device's Flower processes: a SuperNode that answers sooner, and a warm SuperExec.

Flower 1.41's SuperNode (``--isolation subprocess``) starts ``flower-superexec``, which starts
a fresh ``flwr-clientapp`` process for *every* message; that process imports torch, openSMILE
and the app before it can train, 4-5 s on a laptop core and far more on a Raspberry Pi, paid
once a round (fedaffect folds evaluation into the next train message). The SuperNode also sleeps 3 s whenever it
finds no message, and its SuperExec polls for tasks every second.

``fedaffect device start`` therefore runs (both started from :func:`main`)::

    python -m client.supernode supernode --poll P -- <flower-supernode arguments>
        Flower's own SuperNode (``--isolation process``), with its idle sleep capped at P s,
        which starts:
    python -m client.supernode superexec --poll P --runtime-api-address 127.0.0.1:PORT
        Flower's own SuperExec loop (task acquisition, tokens, the Runtime API) with a
        :class:`ForkExecutor`: the process imports the ClientApp's third-party dependencies
        once (:func:`warm_imports`) and forks a child per message that runs Flower's
        ``run_clientapp`` with the task's token, exactly what ``flwr-clientapp`` runs.

Each message still runs in a fresh process that exits afterwards (Flower's isolation: state
lives only in the Context), and the app's own code is still loaded from the run's FAB, not from
the device's installed copy: :func:`warm_imports` imports the app to learn its dependencies and
then forgets fedaffect's own modules. Only the interpreter start and the imports are saved.

A forked ClientApp that outlives its use is ended by the executor (:class:`ForkExecutor`):
one that has not received its message within :data:`INPUT_LIMIT_S` (a run stopped on the
coordinator while the SuperNode was downloading the message: Flower's SuperNode gives the
message up but leaves its task and message in place, and the ClientApp would wait for the
missing objects for up to 2 hours, see :data:`shared_models.processes.PULL_MAX_TIME_S`), and
any that has run for :data:`TASK_LIMIT_S`. Flower's SuperExec tells an executor nothing about
runs (``reconcile()`` takes no argument, an ``ExecutionSpec`` names no run), and the SuperNode
itself never learns that the run stopped, so these are limits on time, not on run status.

Depends on Flower internals (``flwr.supercore.superexec.run_superexec.get_executor``,
``flwr.supernode.start_client_internal.time``, ``flwr.supernode.runtime.run_clientapp``'s
``pull_task_input``); ``tests/test_supernode.py`` fails when a Flower release moves them.
POSIX only (``os.fork``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace

from shared_models.processes import PULL_MAX_TIME_S, shorten_object_pull_backoff

__all__ = ["OWN_PACKAGES", "DEFAULT_POLL_S", "REPLY_POLL_S", "INPUT_LIMIT_S", "TASK_LIMIT_S", "KILL_GRACE_S",
           "warm_imports", "run_clientapp_task", "task_input_received", "ForkExecutor", "patch_supernode_poll",
           "superexec_command", "main"]

log = logging.getLogger("fedaffect.supernode")

#: fedaffect's top-level packages: never kept warm, so that a run's FAB supplies them.
OWN_PACKAGES = ("client", "server", "shared_models", "strategies", "fedaffect", "bench")

#: Seconds between polls of an idle SuperNode (Flower: 3) and of its SuperExec (Flower: 1).
DEFAULT_POLL_S = 0.5

#: Seconds between the SuperNode's looks at its own state for a ClientApp's reply (Flower: 0.5).
REPLY_POLL_S = 0.05

#: Seconds a forked ClientApp may take to receive its message (and the message's objects)
#: before the executor ends it. Flower's own pull gives up after ``PULL_MAX_TIME_S`` (5 min)
#: and the ClientApp then exits by itself; this is the backstop, a minute later, for a
#: ClientApp that is stuck before or around that pull.
INPUT_LIMIT_S = PULL_MAX_TIME_S + 60

#: Seconds a forked ClientApp may run at all: Flower's default message lifetime
#: (``flwr.app.constants.DEFAULT_TTL``, 12 h, the TTL of fedaffect's messages), after which
#: the SuperLink refuses its reply anyway. Only a hung ClientApp gets there (its heartbeat
#: thread keeps the SuperNode waiting for it).
TASK_LIMIT_S = 12 * 3600.0

#: Seconds between the SIGTERM that ends a ClientApp (Flower's handler reports the task
#: failed and exits) and a SIGKILL if it is still there.
KILL_GRACE_S = 10.0

# In a forked ClientApp: the write end of its pipe to the executor (see task_input_received).
_INPUT_PIPE: int | None = None


def warm_imports(app: str = "client.app") -> list[str]:
    """Import the third-party modules that ``app`` imports, but not fedaffect's own.

    Imports ``app`` (a module name, or ``module:attribute``) and the modules it names in its
    ``WARM_MODULES`` (those imported lazily on first use), then removes every module of
    :data:`OWN_PACKAGES` from ``sys.modules``, so that a later import (Flower loading the
    ClientApp from the run's FAB directory) reads fedaffect's code afresh while torch,
    torchaudio, openSMILE, NumPy, SQLAlchemy and Flower stay imported. Imports only: no
    torch operation runs (its thread pools would not survive a fork).

    Returns
    -------
    list of str
        The names of the modules kept warm (newly imported, not fedaffect's).
    """
    before = set(sys.modules)
    module = importlib.import_module(app.partition(":")[0])
    for name in getattr(module, "WARM_MODULES", ()):
        importlib.import_module(name)
    own = [name for name in sys.modules if name.partition(".")[0] in OWN_PACKAGES]
    for name in own:
        del sys.modules[name]
    importlib.invalidate_caches()
    return sorted(set(sys.modules) - before)


@dataclass
class _Child:
    """A forked ClientApp as its executor sees it."""

    task_id: int
    started: float  # time.monotonic() at the fork
    pipe: int | None  # read end: the child writes one byte once it has its message
    has_input: bool = False
    ended_at: float | None = None  # when the executor sent SIGTERM
    killed: bool = False


class ForkExecutor:
    """A SuperExec executor that forks each ClientApp task from this (warm) process.

    Implements the executor protocol of ``flwr.supercore.superexec.executor`` (Flower 1.41).
    ClientApp tasks run ``run(spec)`` in a forked child that exits when it returns; any other
    task type is handed to ``fallback`` (Flower's ``SubprocessExecutor``).

    :meth:`reconcile` (called by Flower's SuperExec loop before every task poll) reaps the
    children that exited and ends those that outlived their use: a child that has not said
    it received its message (:func:`task_input_received`) within ``input_limit_s`` seconds,
    or that has run for ``task_limit_s`` seconds, gets SIGTERM (Flower's handler in the
    ClientApp reports the task failed and exits), and SIGKILL ``kill_grace_s`` seconds later
    if it is still there. Flower gives an executor no run status (``reconcile()`` takes no
    argument; an ``ExecutionSpec`` names no run) and the SuperNode never learns that a run
    was stopped, so a ClientApp whose run was stopped on the coordinator is recognised by
    waiting for a message that does not come.

    Parameters
    ----------
    fallback : executor
        Runs task types other than ``flwr-clientapp``.
    run : callable, optional
        ``run(spec)`` in the child (default: :func:`run_clientapp_task`); it must call
        :func:`task_input_received` once its message has arrived.
    input_limit_s, task_limit_s, kill_grace_s : float, optional
        Default :data:`INPUT_LIMIT_S`, :data:`TASK_LIMIT_S`, :data:`KILL_GRACE_S`.

    Notes
    -----
    The child drops the parent's Flower exit handlers and signal handlers before running,
    so that its exit closes nothing of the parent's. Torch must not have run an operation in
    the parent (its thread pools do not survive a fork); :func:`warm_imports` only imports.
    """

    def __init__(self, fallback, run=None, *, input_limit_s: float = INPUT_LIMIT_S,
                 task_limit_s: float = TASK_LIMIT_S, kill_grace_s: float = KILL_GRACE_S) -> None:
        self.fallback = fallback
        self.run = run or run_clientapp_task
        self.input_limit_s, self.task_limit_s, self.kill_grace_s = input_limit_s, task_limit_s, kill_grace_s
        self.children: dict[int, _Child] = {}  # by process id

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        """Every supported task type can start at once (one process per task)."""
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        """No capacity gate."""

    def launch(self, spec):
        """Fork a child that runs the ClientApp task ``spec`` (an ``ExecutionSpec``)."""
        global _INPUT_PIPE
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        try:
            read_end, write_end = os.pipe()
        except OSError as err:
            return LaunchResult.failed(f"no pipe for the ClientApp: {err}")
        try:
            pid = os.fork()
        except OSError as err:
            os.close(read_end)
            os.close(write_end)
            return LaunchResult.failed(f"fork failed: {err}")
        if pid == 0:  # the child
            code, started = 0, time.perf_counter()
            try:
                os.close(read_end)
                for other in self.children.values():  # the other children's pipes are the parent's
                    if other.pipe is not None:
                        os.close(other.pipe)
                _INPUT_PIPE = write_end
                _forget_parent_handlers()
                self.run(spec)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except BaseException:  # noqa: BLE001 - report, never return into the parent's loop
                traceback.print_exc()
                code = 1
            finally:
                log.info("task %d: ClientApp process %d done in %.2f s (exit %s)", spec.task_id, os.getpid(),
                         time.perf_counter() - started, code)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.children[pid] = _Child(spec.task_id, time.monotonic(), read_end)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap children that have exited (no zombies); end those past their limits."""
        now = time.monotonic()
        for pid, child in list(self.children.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._forget(pid)
                continue
            self._read_pipe(child)
            self._enforce_limits(pid, child, now)

    def _read_pipe(self, child: _Child) -> None:
        """Note the child's byte that says its message arrived; close the pipe at its end."""
        if child.pipe is None:
            return
        try:
            data = os.read(child.pipe, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            child.has_input = True
        if not data or child.has_input:  # the child closes its end right after the byte
            os.close(child.pipe)
            child.pipe = None

    def _enforce_limits(self, pid: int, child: _Child, now: float) -> None:
        age = now - child.started
        if child.ended_at is None:
            if not child.has_input and age >= self.input_limit_s:
                why = (f"has not received its message after {age:.0f} s (its run was probably stopped "
                       "on the coordinator)")
            elif age >= self.task_limit_s:
                why = f"has run for {age:.0f} s, the limit is {self.task_limit_s:.0f} s"
            else:
                return
            log.warning("task %d: ClientApp process %d %s: ending it", child.task_id, pid, why)
            child.ended_at = now
            _signal(pid, signal.SIGTERM)
        elif not child.killed and now - child.ended_at >= self.kill_grace_s:
            log.warning("task %d: ClientApp process %d still there %.0f s after SIGTERM: killing it",
                        child.task_id, pid, now - child.ended_at)
            child.killed = True
            _signal(pid, signal.SIGKILL)

    def _forget(self, pid: int) -> None:
        child = self.children.pop(pid)
        if child.pipe is not None:
            os.close(child.pipe)

    def close(self) -> None:
        """Stop running children (SIGTERM: Flower's handler pushes their status; SIGKILL
        after 5 s) and the fallback."""
        for pid in list(self.children):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in list(self.children):
            _signal(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._forget(pid)
        self.fallback.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def task_input_received() -> None:
    """In a forked ClientApp: tell the executor that the task's message has arrived.

    Until then the executor counts the child against :data:`INPUT_LIMIT_S`. Only the first
    call writes; in any other process this does nothing.
    """
    global _INPUT_PIPE
    fd, _INPUT_PIPE = _INPUT_PIPE, None
    if fd is None:
        return
    try:
        os.write(fd, b"1")
    except OSError:
        pass
    finally:
        os.close(fd)


def _forget_parent_handlers() -> None:
    """In a forked child: drop the SuperExec's Flower exit handlers and signal handlers."""
    from flwr.supercore.exit import exit_handler

    with exit_handler._lock_handlers:  # noqa: SLF001 - the registry is module state in Flower
        exit_handler.registered_exit_handlers.clear()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def run_clientapp_task(spec) -> None:
    """What ``flwr-clientapp --token T`` does: pull the task, run the ClientApp, push the reply.

    Two changes. Object pulls retry sooner and give up after minutes, not hours
    (:func:`shorten_object_pull_backoff`): the SuperNode offers the task before it has pulled
    the message's objects from the SuperLink; a ``flwr-clientapp`` that spent 4 s importing
    never noticed, a forked one asks at once and would wait 1 + 2 s. And once Flower's
    ``pull_task_input`` has the message, the executor is told (:func:`task_input_received`),
    which takes the process off the executor's :data:`INPUT_LIMIT_S`.
    """
    import flwr.supernode.runtime.run_clientapp as flower_clientapp
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    shorten_object_pull_backoff()
    pull_task_input = getattr(flower_clientapp, "pull_task_input", None)
    if pull_task_input is None:
        raise RuntimeError("flwr.supernode.runtime.run_clientapp.pull_task_input is gone: "
                           "fedaffect's warm SuperExec needs updating for this Flower release")

    def pull_then_tell(client):
        task_input = pull_task_input(client)
        task_input_received()
        return task_input

    flower_clientapp.pull_task_input = pull_then_tell  # this process only: a child of the fork
    flower_clientapp.run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def patch_supernode_poll(poll_s: float) -> None:
    """Shorten the sleeps of Flower's SuperNode loop.

    ``flwr.supernode.start_client_internal`` sleeps 3 s after each empty pull from the
    SuperLink: capped at ``poll_s`` (with 0.5, a message is noticed 1.25 s sooner on average,
    for one more small request per second to the SuperLink per idle device). It also sleeps
    0.5 s between looks at its own in-memory state while it waits for the ClientApp's reply
    (and for the reply's objects): capped at :data:`REPLY_POLL_S`, since those looks cost
    no request (a reply left 0.25 s sooner on average, measured 0.45-1.0 s between the
    ClientApp's push and the SuperNode's send on a busy 2-core box).

    Raises
    ------
    RuntimeError
        If this Flower release no longer sleeps through that module's ``time``.
    """
    import flwr.supernode.start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(getattr(loop, "time", None), SimpleNamespace):
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses `time`: "
                           "fedaffect's SuperNode poll patch needs updating for this Flower release")
    loop.time = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    loop.time.sleep = lambda seconds: time.sleep(min(seconds, poll_s if seconds >= 1 else REPLY_POLL_S))


def superexec_command(runtime_api_address: str, poll_s: float, parent_pid: int | None = None) -> list[str]:
    """The command line of the warm SuperExec for a SuperNode's Runtime API address."""
    cmd = [sys.executable, "-m", "client.supernode", "superexec", "--poll", str(poll_s),
           "--runtime-api-address", runtime_api_address]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def _supernode(poll_s: float, flower_args: list[str]) -> None:
    """Flower's SuperNode in this process (process isolation) plus the warm SuperExec."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="9094")
    known, _ = parser.parse_known_args(flower_args)
    patch_supernode_poll(poll_s)
    shorten_object_pull_backoff()
    # Started before the SuperNode serves its Runtime API: Flower's HTTP client retries.
    subprocess.Popen(superexec_command(f"{known.host}:{known.port}", poll_s, os.getpid()))  # noqa: S603
    sys.argv = ["flower-supernode", *flower_args, "--isolation", "process"]
    flower_supernode()


def _superexec(poll_s: float, runtime_api_address: str, parent_pid: int | None) -> None:
    """Flower's SuperExec loop with a :class:`ForkExecutor`, after :func:`warm_imports`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # httpx logs every request at INFO: with a 0.5 s poll, ~2 lines a second into supernode.log
    # (about 20 MB a day of an idle device, which would rotate the useful lines away)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    warm = warm_imports()
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_s)
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    if not hasattr(superexec, "get_executor"):
        raise RuntimeError("flwr.supercore.superexec.run_superexec.get_executor is gone: "
                           "fedaffect's warm SuperExec needs updating for this Flower release")
    superexec.get_executor = lambda *args, **kwargs: ForkExecutor(SubprocessExecutor())
    log.info("warm SuperExec: %d modules imported once for every ClientApp task", len(warm))
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True, parent_pid=parent_pid)


def main(argv: list[str] | None = None) -> None:
    """``python -m client.supernode {supernode,superexec} ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode")
    sub = parser.add_subparsers(dest="process", required=True)
    node = sub.add_parser("supernode", help="Flower's SuperNode, process isolation, warm SuperExec")
    node.add_argument("--poll", type=float, default=DEFAULT_POLL_S)
    node.add_argument("flower_args", nargs=argparse.REMAINDER)
    execp = sub.add_parser("superexec", help="Flower's SuperExec with a fork executor")
    execp.add_argument("--poll", type=float, default=DEFAULT_POLL_S)
    execp.add_argument("--runtime-api-address", required=True)
    execp.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.poll <= 0:
        parser.error("--poll must be > 0 seconds")
    if args.process == "supernode":
        flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
        _supernode(args.poll, flower_args)
    else:
        _superexec(args.poll, args.runtime_api_address, args.parent_pid)


if __name__ == "__main__":
    main()
