"""How one sandboxed process runs (`reward_models.sandbox` decides what runs where; this module only runs it).

The driver that sets the rlimits, drops to an unprivileged uid and runs the program and the tests inside the
sandbox; the interpreter's and bubblewrap's command lines (which host dirs are hidden, which bound back); the pool
of unprivileged uids handed to concurrent runs as root, and the sweep that kills what a run left behind; and the
pipe pump that feeds the job, reads stdout and stderr up to the output limit and kills the process group at the wall
limit. docs/code_exec.md says what each backend isolates.
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SYSTEM_DIRS = {"/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/dev", "/proc",
               "/sys", "/run", "/var", "/nix", "/gnu", "/tmp", "/boot", "/srv", "/mnt", "/media"}  # fmt: skip
SANDBOX_WORKDIR = "/tmp/work"  # under bwrap: inside the sandbox's private /tmp
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


# ---- unprivileged uids (root only) -------------------------------------------------------------------------------

_UID_BASE = 1_900_000_000  # far above any real account; one uid per concurrent run, so NPROC counts one sample
_NOBODY = 65534


class UidPool:
    """Uids handed out one per concurrent run; where none can be mapped, every run shares nobody (65534)."""

    def __init__(self, size: int = 128):
        self._size, self._free, self._lock = size, None, threading.Lock()
        self._shared: int | None = None

    def acquire(self) -> int:
        with self._lock:
            if self._free is None and self._shared is None:
                base = _mapped_uid_base(self._size)
                if base == _NOBODY:
                    self._shared = base
                else:
                    self._free = queue.Queue()
                    for i in range(self._size):
                        self._free.put(base + i)
        return self._shared if self._shared is not None else self._free.get()

    def release(self, uid: int) -> None:
        if self._shared is None:
            self._free.put(uid)


def _mapped_uid_base(size: int) -> int:
    """A block of `size` uids this (possibly namespaced) root may switch to; nobody (65534, shared) otherwise."""
    try:
        ranges = [tuple(int(x) for x in line.split()) for line in Path("/proc/self/uid_map").read_text().splitlines()]
    except OSError:
        return _NOBODY
    for inside, _, count in ranges:
        if inside <= _UID_BASE and _UID_BASE + size <= inside + count:
            return _UID_BASE
    for inside, _, count in sorted(ranges, key=lambda r: -(r[0] + r[2])):
        top = inside + count - 1 - size
        if count > size and top > 100_000:
            return top
    return _NOBODY


UIDS = UidPool()


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose real or effective uid is `uid` (what a fallback run left behind, e.g. a child that
    called setsid to leave the process group)."""
    if uid in (0, _NOBODY, os.getuid()):
        return
    for _ in range(20):  # a forking survivor can race one pass
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status") as status:
                    fields = dict(line.split(":", 1) for line in status if ":" in line)
            except OSError:
                continue
            zombie = fields.get("State", "").split()[:1] == ["Z"]  # dead, waiting for init to reap it
            if not zombie and str(uid) in fields.get("Uid", "").split()[:2]:
                found = True
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


# ---- the driver -------------------------------------------------------------------------------------------------

# Runs inside the sandbox under `python -I -S -B`: sets the limits, drops the uid, then runs the program and the
# tests in one namespace. The job (and the completion token) arrives on stdin, which is then /dev/null.
DRIVER = r"""
import json, os, resource, sys

def _setup(job):
    for name, value in job["rlimits"]:
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        soft = value if name != "RLIMIT_CPU" else max(1, value - 1)
        resource.setrlimit(which, (soft, value))
    uid = job["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if {os.getuid(), os.geteuid(), os.getgid(), os.getegid()} != {uid}:
            raise RuntimeError("the uid did not change")
    os.makedirs(job["workdir"], exist_ok=True)
    os.chdir(job["workdir"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

def _main():
    job = json.loads(sys.stdin.buffer.read())
    token, write = job.pop("token"), os.write
    write(2, (token + ":started\n").encode())
    try:
        _setup(job)
    except BaseException as err:
        write(2, ("\n%s:setup:%s: %s\n" % (token, type(err).__name__, err)).encode())
        os._exit(125)
    import builtins, linecache, traceback
    builtins.exit = builtins.quit = sys.exit  # what site.py would add; scripts call exit()
    sys.argv = ["solution.py"]
    ns = {"__name__": job["module"], "__builtins__": builtins}
    try:
        for filename in ("solution.py", "tests.py"):
            source = job.pop(filename)
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            exec(compile(source, filename, "exec"), ns)
            del source
        entry_point = job.pop("entry_point")
        if entry_point and callable(ns.get("check")):
            if entry_point not in ns:
                raise NameError("entry point %r is not defined" % entry_point)
            ns["check"](ns[entry_point])
    except SystemExit:
        raise
    except BaseException:
        # The traceback module reads sources through linecache (the interpreter's own printer reads files); the
        # first frame is this driver's.
        kind, error, trace = sys.exc_info()
        sys.stdout.flush()
        traceback.print_exception(kind, error, trace.tb_next)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    write(2, ("\n%s:finished\n" % token).encode())

_main()
"""


# ---- command lines ----------------------------------------------------------------------------------------------


def python_command(python: str) -> list[str]:
    # -I: no script dir or cwd on sys.path, no user site, PYTHON* ignored; -S: no site-packages (nor .pth hooks such
    # as an editable install's finder); -B: no .pyc writes.
    return [python, "-I", "-S", "-B", "-c", DRIVER]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _hidden_paths(keep: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Host dirs to cover with an empty tmpfs: the home dir, the working dir, the venv, site-packages, whatever else
    is on the trainer's sys.path, this package's source tree and `extra`; never a system dir, nor one inside `keep`
    (the interpreter's prefix and stdlib)."""
    import site

    candidates = [sys.prefix, *extra, str(Path(__file__).resolve().parents[1])]
    candidates += [p for p in sys.path if p]
    for where in (Path.home, os.getcwd):
        try:
            candidates.append(str(where()))
        except (RuntimeError, OSError):  # no home dir known; a deleted working dir
            pass
    try:
        candidates += [*site.getsitepackages(), site.getusersitepackages()]
    except AttributeError:  # site without getsitepackages (an old virtualenv)
        pass
    found = []
    for path in candidates:
        real = os.path.realpath(path)
        if not os.path.isdir(real) or real in SYSTEM_DIRS or _under(real, "/tmp"):
            continue
        if any(_under(real, k) for k in keep if k not in SYSTEM_DIRS):
            continue
        found.append(real)
    # Outermost only: a tmpfs over /home/u already hides /home/u/proj.
    return sorted(p for p in set(found) if not any(q != p and _under(p, q) for q in found))


def bwrap_command(python: str, *, drops_uid: bool, hide: Sequence[str], tmp_bytes: int) -> list[str]:
    """The bwrap command line that runs the driver under `python`; `drops_uid`: run as root, the driver drops to
    an unprivileged uid (no user namespace); `hide`: more host paths to cover; `tmp_bytes`: the size of /tmp."""
    # What the interpreter needs: never hidden; bound back read-only where a hidden dir covers it (a pyenv or uv
    # python lives under the home dir).
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    needed = [os.path.realpath(sys.base_prefix), os.path.dirname(python), stdlib, f"{stdlib}/lib-dynload"]
    hidden = _hidden_paths(needed, hide)
    needed = [n for n in needed if n not in SYSTEM_DIRS and os.path.isdir(n)]
    keep = sorted(n for n in set(needed) if not any(m != n and _under(n, m) for m in needed))
    command = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--clearenv",
               "--setenv", "PATH", SANDBOX_PATH, "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", SANDBOX_WORKDIR,
               "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]  # fmt: skip
    if drops_uid:  # root: no user namespace; the driver drops to its uid with these two, then has none
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # a user: bwrap needs a user namespace; none nested inside it
        command += ["--unshare-user", "--disable-userns"]
    for path in hidden:
        command += ["--size", "65536", "--tmpfs", path]
    for path in keep:  # the interpreter's prefix, if a hidden dir (the home of a pyenv or uv python) covered it
        cover = next((h for h in [*hidden, "/tmp"] if _under(path, h)), None)
        if cover is None:
            continue
        parts = Path(path).relative_to(cover).parts
        for i in range(1, len(parts)):  # bwrap would make these 0700: the dropped uid could not pass
            command += ["--perms", "0755", "--dir", str(Path(cover, *parts[:i]))]
        command += ["--ro-bind", path, path]
    for path in _site_dirs(keep):  # -S leaves them off sys.path; hidden so that no sys.path.append finds them
        if any(_under(path, h) for h in hidden):
            continue
        command += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
    for path in hidden:
        command += ["--remount-ro", path]
    return command + ["--", *python_command(python)]


def _site_dirs(keep: Sequence[str]) -> list[str]:
    found = []
    for root in [*keep, "/usr", "/usr/local"]:
        for pattern in ("lib*/python3*/site-packages", "lib*/python3*/dist-packages", "lib/python3/dist-packages"):
            found += [str(p) for p in Path(root).glob(pattern) if p.is_dir()]
    return sorted(set(found))


# ---- running one process ----------------------------------------------------------------------------------------


@dataclass
class Raw:
    returncode: int
    stdout: bytes
    stderr: bytes
    exceeded: str | None  # "wall" | "output" | None


def execute(
    command: list[str], payload: bytes, *, wall_seconds: float, max_output_bytes: int, user: int | None, cwd: str | None
) -> Raw:
    """Run `command` in a new session (as `user` when given), feed it `payload`, and collect its output until it
    ends, passes `max_output_bytes` or `wall_seconds`; the whole process group is killed afterwards."""
    ids = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    env = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": cwd or "/nonexistent"}
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd, start_new_session=True, close_fds=True, **ids)  # fmt: skip
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    exceeded = None
    try:
        exceeded = _pump(proc, payload, chunks, wall_seconds, max_output_bytes)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: children left behind die with it
        except OSError:
            pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    return Raw(proc.returncode, b"".join(chunks["stdout"]), b"".join(chunks["stderr"]), exceeded)


def _pump(
    proc: subprocess.Popen, payload: bytes, chunks: dict[str, list[bytes]], wall_seconds: float, max_output_bytes: int
) -> str | None:
    """Write the job, read both pipes up to the output limit, until they close or the wall limit; what was exceeded."""
    deadline = time.monotonic() + wall_seconds
    selector = selectors.DefaultSelector()
    for name in ("stdout", "stderr"):
        stream = getattr(proc, name)
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ, name)
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
    sent, total, exited = 0, 0, None
    with selector:
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return "wall"
            if exited is None and proc.poll() is not None:
                exited = now
            if exited is not None and now - exited > 0.25:  # children of a finished program still hold the pipes
                return None
            for key, _ in selector.select(timeout=min(deadline - now, 0.05)):
                if key.data == "stdin":
                    try:
                        sent += os.write(key.fd, payload[sent : sent + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # the sandbox is gone (BrokenPipeError): its exit status says why
                        sent = len(payload)
                    if sent >= len(payload):
                        selector.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.data].append(chunk)
                total += len(chunk)
                if total > max_output_bytes:
                    return "output"
    return None
