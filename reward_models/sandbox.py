"""The sandbox `code_exec` runs programs in: limits, the backends and their probe, one run, a batch of runs.

`run_sandboxed(code, tests, limits)` runs a program and then its tests (Python source with asserts) in one process
and scores 1.0 when both run to the end and exit 0 within the limits, else 0.0, with a reason ("timeout (wall 2.0
s)", "memory limit (256 MB)", "exit 1: AssertionError (tests.py line 2: assert f(2) == 4)", ...); `run_batch` runs
many in parallel (a thread pool driving subprocesses). How one process is started, fed and read, and the driver
that runs inside it, are in `reward_models.sandbox_process`. docs/code_exec.md has the catalogue of hostile programs
and what each backend does with them.

Backends (`sandbox_backend()` probes once and caches; every `Outcome` names the one it ran under):

- **bwrap** (bubblewrap, where `shutil.which("bwrap")` finds one that works): the host's `/` read-only; the home
  dir, the working dir, the venv, the site-packages dirs, this package's source tree and `Limits.hide` under empty
  read-only tmpfs (the interpreter's own prefix bound back read-only, its site-packages hidden again); a private
  size-capped `/tmp` holding the work dir; new pid, network (no interfaces but a loopback of its own), ipc and uts
  namespaces; a new session; the sandbox dies with its parent; environment cleared. Run as root, bwrap keeps
  CAP_SETUID/CAP_SETGID for the driver only, which drops to an unprivileged uid of its own (one per concurrent
  sample) before any sample code runs, so that RLIMIT_NPROC holds (the kernel never applies it to uid 0); run as
  a user, bwrap builds a user namespace and forbids nested ones.
- **fallback** (no working bwrap): the same rlimits, an empty environment, a throwaway temp dir as the working dir,
  an isolated interpreter (`-I -S`: no site-packages, no user site, no PYTHON* variables, so `import posttrain`
  and `import reward_models` fail), its own session, the process group killed at the wall limit. Run as root it
  also drops to an unprivileged uid per sample (any process left with that uid is killed afterwards), so the
  program cannot write root's files, read 0700 dirs (`/root`, pytest's tmp dirs) or signal root's processes.
  It does NOT isolate the network, does NOT hide world-readable files (the project's source and the venv are
  readable: a program that puts them on `sys.path` imports them), does NOT stop writes to world-writable dirs
  (`/tmp`, `/dev/shm`), and processes that leave the session (setsid) outlive the wall kill unless it runs as
  root. Run as an ordinary user it additionally cannot stop the program from reading or writing that user's
  files or signalling that user's processes (the trainer included). Use it for trusted or throwaway machines only.

Both: RLIMIT_CPU (SIGXCPU at the limit, SIGKILL a second later), RLIMIT_AS (memory), RLIMIT_NPROC (processes and
threads), RLIMIT_FSIZE (largest file written), RLIMIT_NOFILE 256, no core dumps, stdout + stderr read up to
`max_output_bytes` (the process is killed past it), the wall limit enforced by killing the whole process group
(bwrap: its pid namespace). A program passes only when the driver's completion token — a random string the program
never sees through its input, argv or environment — follows the tests, so `sys.exit(0)` or `os._exit(0)` before the
tests ran scores 0. Not defended: a program that deliberately digs the token out of the interpreter's memory (gc,
frames), or that returns objects whose `__eq__` always holds; the tests should compare with plain values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from reward_models.errors import RewardError
from reward_models.sandbox_process import (
    SANDBOX_WORKDIR,
    UIDS,
    Raw,
    bwrap_command,
    execute,
    kill_uid,
    python_command,
)

logger = logging.getLogger("reward_models.code_exec")  # where the fallback warning always went

BACKENDS = ("auto", "bwrap", "fallback")


class SandboxError(RewardError):
    """The sandbox itself cannot run (no backend, a setup failure): an environment problem, never a sample's score."""


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. The defaults suit RL rollouts of short programs; tests use tighter ones."""

    cpu_seconds: float = 5.0  # RLIMIT_CPU (rounded up to whole seconds): SIGXCPU, then SIGKILL one second later
    wall_seconds: float = 10.0  # the process group (bwrap: the pid namespace) is killed at this wall time
    memory_mb: int = 1024  # RLIMIT_AS: address space, so thread stacks and malloc arenas count
    max_processes: int = 32  # RLIMIT_NPROC: processes and threads of the sandbox's uid
    max_output_bytes: int = 1 << 20  # stdout + stderr; past it the run is killed ("output limit")
    max_file_mb: int = 16  # RLIMIT_FSIZE; under bwrap also the size of the whole writable /tmp
    max_parallel: int = field(default_factory=lambda: max(1, min(32, os.cpu_count() or 1)))  # samples at once
    hide: tuple[str, ...] = ()  # more host paths to cover with an empty tmpfs under bwrap (data, credentials)

    def __post_init__(self) -> None:
        checks = {"cpu_seconds": (self.cpu_seconds, 0.1), "wall_seconds": (self.wall_seconds, 0.1),
                  "memory_mb": (self.memory_mb, 64), "max_processes": (self.max_processes, 1),
                  "max_output_bytes": (self.max_output_bytes, 256), "max_file_mb": (self.max_file_mb, 1),
                  "max_parallel": (self.max_parallel, 1)}  # fmt: skip
        for name, (value, least) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
                raise RewardError(f"code_exec limit '{name}' must be a number >= {least}, got {value!r}")
        object.__setattr__(self, "hide", (self.hide,) if isinstance(self.hide, str) else tuple(self.hide))


@dataclass(frozen=True)
class Backend:
    """A sandbox that works on this machine: its name, the interpreter it runs, whether each run gets an
    unprivileged uid of its own, and what it isolates (`isolates`) and what it does not (`exposes`)."""

    name: str
    python: str
    drops_uid: bool
    isolates: tuple[str, ...]
    exposes: tuple[str, ...]
    detail: str = ""

    def describe(self) -> str:
        exposed = f"; does not isolate: {', '.join(self.exposes)}" if self.exposes else ""
        return f"{self.name} ({self.python}{', ' + self.detail if self.detail else ''}): isolates " + (
            ", ".join(self.isolates) + exposed
        )


@dataclass(frozen=True)
class Outcome:
    """One sandboxed run: its score (1.0 passed, 0.0 not), why, what it printed, and where it ran."""

    score: float
    reason: str
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    backend: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.score == 1.0


# ---- backends ---------------------------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probed: dict[str, Backend | str] = {}  # backend name -> Backend, or why it does not work here
_warned: list[str] = []  # the fallback warning, logged once


def sandbox_backend(name: str = "auto") -> Backend:
    """The backend runs go through: "bwrap" or "fallback" (SandboxError when it cannot run here), or "auto" (bwrap
    when it works, else the fallback, logged once as a warning). Probed once per process with a real run."""
    if name not in BACKENDS:
        raise RewardError(f"code_exec backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        found = _probe("bwrap")
        if isinstance(found, Backend):
            return found
        fallback = sandbox_backend("fallback")
        with _probe_lock:
            if not _warned:
                _warned.append(found)
                logger.warning("code_exec: bubblewrap unavailable (%s); using the fallback: %s", found,
                               fallback.describe())  # fmt: skip
        return fallback
    found = _probe(name)
    if isinstance(found, str):
        raise SandboxError(f"code_exec: the {name} sandbox does not work here: {found}")
    return found


def _probe(name: str) -> Backend | str:
    with _probe_lock:
        if name not in _probed:
            _probed[name] = _find_bwrap() if name == "bwrap" else _find_fallback()
        return _probed[name]


def _base_python() -> str:
    """The interpreter behind the trainer's (a venv's python is a link to it)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _try(backend: Backend) -> str | None:
    """None when `backend` runs a tiny program and its tests; otherwise why not."""
    try:
        out = _run(backend, "import json\nprint(json.dumps([1]))", "assert True", None, Limits(max_parallel=1),
                   module="solution")  # fmt: skip
    except (OSError, SandboxError) as err:
        return str(err)
    if out.passed and out.stdout.strip() == "[1]":
        return None
    return f"{out.reason}; stderr: {out.stderr.strip()[-300:] or '(empty)'}"


def _find_bwrap() -> Backend | str:
    binary = shutil.which("bwrap")
    if binary is None:
        return "bwrap is not on PATH (apt-get install bubblewrap)"
    root = os.geteuid() == 0
    backend = Backend(
        "bwrap", _base_python(), drops_uid=root,
        isolates=("network", "host filesystem (read-only; home, project, venv hidden)", "host processes",
                  "environment", "resource limits"),
        exposes=(), detail=binary,
    )  # fmt: skip
    why = _try(backend)
    return backend if why is None else f"{binary}: {why}"


def _find_fallback() -> Backend | str:
    root = os.geteuid() == 0
    isolates = ["environment", "resource limits", "trainer imports on the default sys.path"]
    exposes = ["network", "world-readable files (project source, venv)", "world-writable dirs (/tmp, /dev/shm)"]
    if root:
        isolates.append("root's files and processes (runs as an unprivileged uid)")
    else:
        exposes += ["this user's files", "this user's processes (the trainer's included)"]
    # Dropped to an unprivileged uid, the program must still be able to run the interpreter: one under /root
    # (pyenv, uv) cannot be, so try the system's.
    candidates = [_base_python()] + ([p for p in ("/usr/local/bin/python3", "/usr/bin/python3") if os.path.exists(p)]
                                     if root else [])  # fmt: skip
    reasons = []
    for python in dict.fromkeys(candidates):
        backend = Backend("fallback", python, drops_uid=root, isolates=tuple(isolates), exposes=tuple(exposes))
        why = _try(backend)
        if why is None:
            return backend
        reasons.append(f"{python}: {why}")
    return "; ".join(reasons)


# ---- one run ----------------------------------------------------------------------------------------------------


def run_sandboxed(
    code: str,
    tests: str = "",
    limits: Limits | None = None,
    *,
    entry_point: str | None = None,
    backend: str = "auto",
    module: str = "solution",
) -> Outcome:
    """Run `code`, then `tests` in the same namespace (then `check(<entry_point>)` when the tests define `check`,
    HumanEval's convention), in a sandbox; score 1.0 when both ran to the end and the process exited 0 within
    `limits`. The program runs as module `module` (not "__main__", so a demo `if __name__ == "__main__":` block
    that reads input does not run before the tests); `run_python` runs it as "__main__"."""
    limits = limits or Limits()
    if not code.strip():
        return Outcome(0.0, "no code")
    return _run(sandbox_backend(backend), code, tests, entry_point, limits, module=module)


def _run(backend: Backend, code: str, tests: str, entry_point: str | None, limits: Limits, *, module: str) -> Outcome:
    uid = UIDS.acquire() if backend.drops_uid else None
    workdir = None
    try:
        if backend.name == "bwrap":
            command = bwrap_command(backend.python, drops_uid=backend.drops_uid, hide=limits.hide,
                                    tmp_bytes=limits.max_file_mb << 20)  # fmt: skip
            sandbox_dir = SANDBOX_WORKDIR
        else:
            workdir = tempfile.mkdtemp(prefix="code_exec_")
            if uid is not None:
                os.chown(workdir, uid, uid)
            command, sandbox_dir = python_command(backend.python), workdir
        token = secrets.token_hex(16)
        # The fallback starts the interpreter as `uid` already; under bwrap the driver drops to it.
        driver_uid = uid if backend.name == "bwrap" else None
        job = {"token": token, "uid": driver_uid, "workdir": sandbox_dir, "module": module, "solution.py": code,
               "tests.py": tests, "entry_point": entry_point, "rlimits": _rlimits(limits)}  # fmt: skip
        started = time.monotonic()
        raw = execute(command, json.dumps(job).encode(), wall_seconds=limits.wall_seconds,
                      max_output_bytes=limits.max_output_bytes, user=uid if backend.name == "fallback" else None,
                      cwd=workdir)  # fmt: skip
        return _outcome(raw, token, limits, backend.name, time.monotonic() - started)
    finally:
        if uid is not None:
            kill_uid(uid)
            UIDS.release(uid)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _rlimits(limits: Limits) -> list[tuple[str, int]]:
    return [("RLIMIT_CPU", math.ceil(limits.cpu_seconds) + 1), ("RLIMIT_AS", limits.memory_mb << 20),
            ("RLIMIT_NPROC", limits.max_processes), ("RLIMIT_FSIZE", limits.max_file_mb << 20),
            ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)]  # fmt: skip


# ---- why it failed ----------------------------------------------------------------------------------------------

_FRAME = re.compile(r'File "(solution\.py|tests\.py)", line (\d+)')


def _outcome(raw: Raw, token: str, limits: Limits, backend: str, seconds: float) -> Outcome:
    stderr = raw.stderr.decode("utf-8", "replace")
    stdout = raw.stdout.decode("utf-8", "replace")
    setup = re.search(re.escape(token) + r":setup:(.*)", stderr)
    if setup:
        raise SandboxError(f"code_exec: the {backend} sandbox failed to set up: {setup.group(1)}")
    started, finished = f"{token}:started\n" in stderr, f"\n{token}:finished\n" in stderr
    stderr = stderr.replace(f"{token}:started\n", "", 1).replace(f"\n{token}:finished\n", "")
    rc = raw.returncode
    if not started and raw.exceeded is None:  # bwrap (or the interpreter) failed before the driver ran
        raise SandboxError(f"code_exec: the {backend} sandbox did not start (exit {rc}): {stderr.strip()[-500:]}")
    # bwrap reports a child killed by signal N as exit 128 + N; Popen reports it as -N.
    sig = -rc if rc < 0 else rc - 128 if backend == "bwrap" and rc > 128 else None
    if raw.exceeded == "wall":
        reason = f"timeout (wall {limits.wall_seconds:.1f} s)"
    elif raw.exceeded == "output":
        reason = f"output limit ({limits.max_output_bytes} bytes)"
    elif rc == 0 and finished:  # before the stderr patterns: a passing program may print "MemoryError"
        return Outcome(1.0, "passed", stdout, stderr, rc, backend, seconds)
    elif rc == 0:
        reason = "exited before the tests finished (exit 0 without the completion token)"
    elif sig == signal.SIGXCPU:
        reason = f"timeout (cpu {limits.cpu_seconds:.1f} s)"
    elif "MemoryError" in stderr:
        reason = f"memory limit ({limits.memory_mb} MB)"
    elif "[Errno 27] File too large" in stderr or "[Errno 28] No space left" in stderr:
        reason = f"file size limit ({limits.max_file_mb} MB)"
    elif "BlockingIOError: [Errno 11]" in stderr or "can't start new thread" in stderr:
        reason = f"process limit ({limits.max_processes})"
    elif sig is not None:
        reason = f"killed by {_signal_name(sig)}"
    else:
        reason = f"exit {rc}: {_error_summary(stderr)}"
    return Outcome(0.0, reason, stdout, stderr, rc, backend, seconds)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _error_summary(stderr: str, limit: int = 300) -> str:
    """The exception line of a traceback, with the failing line of solution.py/tests.py when there is one."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "(no error output)"
    summary = lines[-1].strip()
    frames = [i for i, line in enumerate(lines) if _FRAME.search(line)]
    if frames:
        i = frames[-1]
        where = _FRAME.search(lines[i])
        source = lines[i + 1].strip() if i + 1 < len(lines) - 1 else ""
        summary += f" ({where.group(1)} line {where.group(2)}{': ' + source if source else ''})"
    return summary if len(summary) <= limit else summary[:limit] + "…"


# ---- batches ----------------------------------------------------------------------------------------------------


def run_batch(
    codes: Sequence[str],
    tests: Sequence[str],
    limits: Limits | None = None,
    *,
    entry_points: Sequence[str | None] | None = None,
    backend: str = "auto",
) -> list[Outcome]:
    """`run_sandboxed` over aligned lists, `limits.max_parallel` at a time, outcomes in order."""
    limits = limits or Limits()
    entry_points = entry_points if entry_points is not None else [None] * len(codes)
    if not codes:
        return []
    sandbox_backend(backend)  # probe once here, not in every worker

    def one(i: int) -> Outcome:
        return run_sandboxed(codes[i], tests[i], limits, entry_point=entry_points[i], backend=backend)

    with ThreadPoolExecutor(max_workers=min(limits.max_parallel, len(codes)), thread_name_prefix="code_exec") as pool:
        return list(pool.map(one, range(len(codes))))


__all__ = ["BACKENDS", "Backend", "Limits", "Outcome", "SandboxError", "run_batch", "run_sandboxed",
           "sandbox_backend"]  # fmt: skip
