"""A warm interpreter that runs scripts in children forked from it (:class:`BlockServer`): the doc blocks
of tests/test_docs.py, its ``innerloop -p`` commands, the ``ddp_spawn`` launches of
tests/train/test_review_s21_ddp.py, CLI commands of tests/test_review_s22_atomic.py, the training runs
killed mid-run (tests/lm_testing.py's ``kill_a_forked_training_run``), the plugin package's run of
tests/train/test_examples.py, the quick study's ``python -m innerloop train`` of
tests/benchmarks/test_science.py, the allocation failure of tests/test_review_s31a.py and the stopped
reader of tests/train/test_cli_inputs.py (the ``block_server`` fixture's users). The ``block_server`` fixture
(tests/conftest.py) is one per pytest process, started at its first use.

A fresh interpreter per script costs seconds of start-up (torch, innerloop, Lightning) before the
script's own work. The scripts are run instead by children forked from one interpreter that imported
those once: each child is still a process of its own (plugin registrations, globals and threads stay in
it), in a process group of its own (a job, as a shell starts one: a signal to the group reaches what it
started, and a job killed is killed with everything it started), that runs the script with fresh
globals, so a script that forgets an import still fails. The server forks only while it is a single
thread (a thread pool copied into a fork can hang; OpenBLAS, under numpy, starts one at import unless
told to use one thread); otherwise, or where fork does not exist, :attr:`BlockServer.forks` is False and
the callers start fresh interpreters as before.

One job at a time: a job still running when the next starts (a test that failed while its job ran on)
is killed, its process group with it, before the next starts; a server that does not report that job's
end is replaced by a fresh one. So a job left behind can never make the next one wait.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def environment() -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


RUN_BLOCK = """
import runpy, sys
namespace = runpy.run_path(sys.argv[1])
for name, value in list(namespace.items()):
    if name.startswith("test_") and callable(value):
        value()
"""
"""Runs the script ``sys.argv[1]`` and calls every ``test_*`` function it defines."""

SERVER = """
import json, os, signal, sys, time, traceback
import torch, innerloop, innerloop.train  # what nearly every block imports, once
single = len(os.listdir("/proc/self/task")) == 1 if os.path.isdir("/proc/self/task") else False
print("fork" if single and hasattr(os, "fork") else "no-fork", flush=True)
for line in sys.stdin:
    script, log, cwd, environment, timeout_s = line.rstrip("\\n").split("\\t")
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)  # a job of its own (the parent sets it too: whichever runs first)
        os.chdir(cwd)
        os.environ.update(json.loads(environment))
        with open(log, "w") as output, open(os.devnull) as nothing:
            os.dup2(nothing.fileno(), 0)
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            status = 0
            try:
                sys.argv = ["-c", script]
                exec(compile(RUN_BLOCK, "<block runner>", "exec"), {"__name__": "__main__"})
            except SystemExit as exit:
                status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)
    try:
        os.setpgid(pid, pid)  # before the pid is reported: a signal to the group reaches the job
    except OSError:  # it ended already
        pass
    print(f"pid {pid}", flush=True)
    deadline = time.monotonic() + float(timeout_s)  # a job that hangs is killed, as subprocess.run(timeout=) did
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        try:
            os.killpg(pid, signal.SIGKILL)  # the job and whatever it started
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        with open(log, "a") as output:
            output.write(f"timed out after {timeout_s} s\\n")
        print(124, flush=True)
    else:
        print(os.waitstatus_to_exitcode(done[1]), flush=True)
"""
"""The server's program (``RUN_BLOCK`` is defined before it): reads one job a line (script, log, working
folder, environment added as JSON, seconds before it is killed), forks it, prints ``pid N`` and then its
exit status (124 where it was killed for its time)."""


class Job:
    """A script running in a child of a :class:`BlockServer`: ``pid`` (also its process group's id),
    ``poll``, ``wait`` and ``kill`` as a :class:`subprocess.Popen`'s."""

    def __init__(self, server: BlockServer, pid: int, log: Path) -> None:
        self.server, self.pid, self.log = server, pid, log
        self.status: int | None = None

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        if self.status is None:
            try:
                self.status = self.server._status(self, timeout=0)
            except subprocess.TimeoutExpired:
                pass
        return self.status

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; :class:`subprocess.TimeoutExpired` if it runs ``timeout`` seconds more."""
        if self.status is None:
            self.status = self.server._status(self, timeout)
        return self.status

    def kill(self) -> None:
        """SIGKILL to its process group (the job and what it started), where it still runs."""
        if self.status is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class BlockServer:
    """Runs scripts in children forked from one warm interpreter (see the module's doc)."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"RUN_BLOCK = {RUN_BLOCK!r}\n" + SERVER],
            cwd=REPO,
            env={**environment(), "OPENBLAS_NUM_THREADS": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.forks = self.process.stdout.readline().strip() == "fork"
        self.job: Job | None = None  # the job whose end the server has not reported yet
        self.lines: queue.Queue[str] = queue.Queue()  # the server's output, read by a thread of its own
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()

    @staticmethod
    def _read(stdout, lines: queue.Queue[str]) -> None:
        for line in stdout:
            lines.put(line)
        lines.put("")  # the server ended

    def start(
        self,
        script: Path,
        log: Path,
        cwd: Path = REPO,
        environment: dict[str, str] | None = None,
        timeout_s: float = 300,
    ) -> Job:
        """Start ``script`` (:data:`RUN_BLOCK`) in a forked child, in ``cwd`` with ``environment``
        added to the server's, its stdout and stderr into ``log``; killed after ``timeout_s`` (status
        124). A job of this server still running is killed first (:meth:`_forget`)."""
        self._forget()
        line = f"{script}\t{log}\t{cwd}\t{json.dumps(environment or {})}\t{timeout_s:g}\n"
        self.process.stdin.write(line)
        self.process.stdin.flush()
        reported = self._line(timeout=60)
        assert reported.startswith("pid "), f"the block server answered {reported!r}"
        self.job = Job(self, int(reported.split()[1]), log)
        return self.job

    def run(
        self,
        script: Path,
        log: Path,
        cwd: Path = REPO,
        environment: dict[str, str] | None = None,
        timeout_s: float = 300,
    ) -> tuple[int, str]:
        """:meth:`start`, waited for: the exit status and the output (stdout and stderr together)."""
        status = self.start(script, log, cwd, environment, timeout_s).wait()
        return status, log.read_text()

    def _line(self, timeout: float | None) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise subprocess.TimeoutExpired("block server", timeout or 0) from None
        if not line:
            raise RuntimeError("the block server ended")
        return line.strip()

    def _status(self, job: Job, timeout: float | None) -> int:
        assert job is self.job, "a job of this server that ended already reports its status"
        try:
            status = int(self._line(timeout))
        except RuntimeError:  # the server died under it (its end is no status of the job's)
            self.job = None
            raise
        self.job = None
        return status

    def _forget(self) -> None:
        """A job still running (one a failed test left) is killed, its process group with it, and its end
        read; a server that does not report it within 30 s is replaced by a fresh one."""
        if self.job is None:
            return
        job = self.job
        job.kill()
        try:
            job.wait(timeout=30)
        except (subprocess.TimeoutExpired, RuntimeError):
            self.process.kill()
            self.process.wait()
            self._start()

    def close(self) -> None:
        """Ends the server and a job still running (its process group)."""
        if self.job is not None:
            self.job.kill()
        self.process.stdin.close()
        self.process.kill()  # idle: its teardown (torch, Lightning) would cost a second or two of CPU
        self.process.wait(timeout=60)
