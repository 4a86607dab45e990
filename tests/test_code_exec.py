"""The `code_exec` reward runs a completion's program against the row's tests in a sandbox. Correct programs score
1, wrong ones 0; every program in the hostile catalogue scores 0 with the reason its case names, and the host, the
working tree and this test process are left as they were. Each case runs under every backend available here
(bubblewrap, the fallback); what the fallback cannot contain is marked, with the reason, never dropped silently."""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import pytest

from reward_models import reward_columns
from reward_models.code_exec import (
    Limits,
    SandboxError,
    code_exec_reward,
    extract_code,
    python_tool,
    run_python,
    run_sandboxed,
    sandbox_backend,
)
from reward_models.errors import RewardError

REPO = Path(__file__).resolve().parents[1]
# Tight limits keep the catalogue fast. The wall limit is generous (a loaded CI machine must not turn a quick case
# into a timeout) except for the cases that wait it out: WAITS, 2 s, the slowest case of the file.
WAITS = 2.0
TIGHT = Limits(cpu_seconds=1, wall_seconds=10, memory_mb=256, max_processes=16, max_output_bytes=64 * 1024,
               max_file_mb=1, max_parallel=8)  # fmt: skip
SECRET_ENV = "CODE_EXEC_TEST_SECRET"


def _probe(name: str):
    try:
        return sandbox_backend(name), ""
    except SandboxError as err:
        return None, str(err)


BACKENDS = {name: _probe(name) for name in ("bwrap", "fallback")}
HOME = Path.home()
HOME_FILES = sorted(str(p) for p in HOME.iterdir() if p.is_file() and os.access(p, os.R_OK)) if HOME.is_dir() else []
HOME_PRIVATE = HOME.is_dir() and not HOME.stat().st_mode & stat.S_IXOTH  # others cannot even enter it (root's 0700)


def _contains(backend: str) -> set[str]:
    """What `backend` keeps a program from doing here (docs/code_exec.md, "What each backend isolates")."""
    found = BACKENDS[backend][0]
    always = {"limits", "environment", "imports"}
    if backend == "bwrap":
        return always | {"network", "readable_files", "home", "private_files", "signals", "writes"}
    if found is not None and found.drops_uid:  # root: an unprivileged uid per run
        return always | {"private_files", "signals", "writes"} | ({"home"} if HOME_PRIVATE else set())
    return always


NOT_CONTAINED = {
    "network": "the fallback has no network namespace: the program reaches the host's loopback",
    "readable_files": "the fallback hides no world-readable file: the repo and the venv are importable by path",
    "home": "the fallback hides no home dir, and this one lets others in",
    "private_files": "the fallback as a non-root user runs as that user and reads its files (/proc/<pid>/environ)",
    "signals": "the fallback as a non-root user can signal that user's processes: running it would kill this test",
    "writes": "the fallback as a non-root user can write that user's files: running it would write into the repo",
}


# A program whose escape works ends normally, so that the tests after it pass and it scores 1: the test fails
# (or, where the backend is known not to contain it, xfails). One that is contained raises SystemExit('<why>').
@dataclass(frozen=True)
class Case:
    id: str
    program: str  # str.format fields: repo_file, outside_file, secret_file, ssh_key, test_pid, port, home_files
    reason: str  # what the outcome's reason starts with
    needs: str  # the containment it tests (a key of NOT_CONTAINED, or limits/environment/imports)
    harmful: bool = False  # uncontained, running it would harm the host or this test: skip instead of xfail
    tests: str = "pass"
    wall: float | None = None  # the wall limit when not TIGHT's


CATALOGUE = [
    Case("infinite_loop", "while True:\n    pass", "timeout (", "limits", wall=WAITS),  # cpu, or wall when contended
    Case("sleep_forever", "import time\ntime.sleep(3600)", "timeout (wall 2.0 s)", "limits", wall=WAITS),
    Case("fork_bomb", "import os\nwhile True:\n    os.fork()", "process limit (16)", "limits"),
    Case("memory_hog", "hog = []\nwhile True:\n    hog.append(bytearray(16 << 20))", "memory limit (256 MB)", "limits"),
    Case("huge_output", "while True:\n    print('x' * 4096)", "output limit (65536 bytes)", "limits"),
    Case(
        "huge_file", "with open('big', 'wb') as f:\n    f.write(b'x' * (8 << 20))", "file size limit (1 MB)", "limits"
    ),
    Case(
        "raise_own_limits",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (3600, 3600))",
        "exit 1: ValueError: not allowed to raise maximum limit",
        "limits",
    ),
    # EPERM as an unprivileged uid; EINVAL in bwrap's user namespace (as a user), where uid 0 is not mapped.
    Case("become_root", "import os\nos.setuid(0)", "exit 1: ", "limits"),
    Case(
        "sys_exit_before_tests",
        "import sys\nsys.exit(0)",
        "exited before the tests finished",
        "limits",
        tests="raise AssertionError('the tests ran')",
    ),
    Case(
        "os_exit_before_tests",
        "import os\nos._exit(0)",
        "exited before the tests finished",
        "limits",
        tests="raise AssertionError('the tests ran')",
    ),
    Case("write_into_repo", "open({repo_file!r}, 'w').write('pwned')", "exit 1: ", "writes", harmful=True),
    Case("write_into_test_tmp_dir", "open({outside_file!r}, 'w').write('pwned')", "exit 1: ", "writes"),
    Case("read_file_outside", "print(open({secret_file!r}).read())", "exit 1: ", "private_files"),
    Case("read_ssh_key", "print(open({ssh_key!r}).read())", "exit 1: ", "private_files"),
    Case(
        "read_home",
        "read = []\nfor name in {home_files!r}:\n    try:\n        read.append(open(name).read(64))\n"
        "    except OSError as err:\n        print(err)\nif not read:\n    raise SystemExit('home unreadable')\n"
        "print(read)",
        "exit 1: home unreadable",
        "home",
    ),
    Case(
        "read_host_environment",
        "import os\nfound = [k for k in os.environ if k == {secret_env!r}]\nprint(dict(os.environ))\n"
        "try:\n    found.append(open('/proc/{test_pid}/environ').read())\nexcept OSError as err:\n    print(err)\n"
        "if not found:\n    raise SystemExit('environment clean')\nprint(found)",
        "exit 1: environment clean",
        "private_files",
    ),
    # Success is judged by the effect, not kill()'s return: Linux reports kill(-1) done when every process refused
    # (EPERM), and a pid namespace's init silently ignores SIGKILL from inside (bwrap's reaper is the parent there).
    Case(
        "signal_parent_and_test",
        "import os, signal, time\nkilled = []\ntry:\n    os.kill({test_pid}, signal.SIGKILL)\n"
        "    killed.append('test')\nexcept OSError as err:\n    print('test process:', err)\n"
        "parent = os.getppid()\ntry:\n    os.kill(parent, signal.SIGKILL)\nexcept OSError as err:\n"
        "    print('parent:', err)\ntime.sleep(0.2)\nif os.getppid() != parent:\n    killed.append('parent')\n"
        "if not killed:\n    raise SystemExit('nothing to kill')",
        "exit 1: nothing to kill",
        "signals",
        harmful=True,
    ),
    Case(
        "open_socket",
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'pwned')",
        "exit 1: ",
        "network",
    ),
    Case(
        "import_trainer",
        "import importlib\nfound = []\nfor name in ('posttrain', 'reward_models', 'trl', 'torch'):\n    try:\n"
        "        importlib.import_module(name)\n        found.append(name)\n    except ImportError:\n        pass\n"
        "if not found:\n    raise SystemExit('no trainer module')\nprint(found)",
        "exit 1: no trainer module",
        "imports",
    ),
    Case(
        "import_trainer_by_path",
        "import importlib.util, sys\nsys.path[:0] = [{repo!r}, *{site_dirs!r}]\n"
        "found = [n for n in ('posttrain', 'reward_models', 'trl') if importlib.util.find_spec(n)]\n"
        "if not found:\n    raise SystemExit('trainer source hidden')\nprint(found)",
        "exit 1: trainer source hidden",
        "readable_files",
    ),
]


def _param(backend: str, case: Case):
    found, why = BACKENDS[backend]
    marks = []
    if found is None:
        marks = [pytest.mark.skip(reason=f"no {backend} sandbox here: {why}")]
    elif case.id == "read_home" and not HOME_FILES:
        marks = [pytest.mark.skip(reason=f"no readable file directly in {HOME} to try")]
    elif case.needs not in _contains(backend):
        reason = NOT_CONTAINED[case.needs]
        marks = [pytest.mark.skip(reason=reason) if case.harmful else pytest.mark.xfail(strict=True, reason=reason)]
    return pytest.param(backend, case, marks=marks, id=f"{backend}-{case.id}")


def _runnable(backend: str, case: Case) -> bool:
    return (case.needs in _contains(backend) or not case.harmful) and (case.id != "read_home" or bool(HOME_FILES))


def _limits(case: Case) -> Limits:
    return TIGHT if case.wall is None else replace(TIGHT, wall_seconds=case.wall)


class Hostile:
    """The whole catalogue, run once per backend with its cases in parallel (the default test run stays fast)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.secret = secrets.token_hex(16)
        self.secret_file = tmp / "secret.txt"
        self.secret_file.write_text(self.secret)
        ssh = tmp / "home" / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        self.ssh_key = ssh / "id_ed25519"
        self.ssh_key.write_text(self.secret)
        self.ssh_key.chmod(0o600)
        self.outcomes: dict[str, dict[str, object]] = {}
        self.leaks: dict[str, dict[str, list[str]]] = {}
        self.written: list[Path] = []

    def outcome(self, backend: str, case: Case):
        if backend not in self.outcomes:
            self._run(backend)
        return self.outcomes[backend][case.id], self.leaks[backend][case.id]

    def _run(self, backend: str) -> None:
        import site

        repo_file = REPO / f".code_exec_pwned_{backend}_{secrets.token_hex(4)}"
        outside_file = self.tmp / f"pwned_{backend}.txt"
        self.written += [repo_file, outside_file]
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        fields = {"repo_file": str(repo_file), "outside_file": str(outside_file), "secret_file": str(self.secret_file),
                  "ssh_key": str(self.ssh_key), "test_pid": os.getpid(), "port": listener.getsockname()[1],
                  "home_files": HOME_FILES, "secret_env": SECRET_ENV, "repo": str(REPO),
                  "site_dirs": site.getsitepackages()}  # fmt: skip
        cases = [c for c in CATALOGUE if _runnable(backend, c)]
        os.environ[SECRET_ENV] = self.secret
        try:
            with ThreadPoolExecutor(max_workers=len(cases)) as pool:
                outcomes = list(pool.map(lambda c: run_sandboxed(c.program.format(**fields), c.tests, _limits(c),
                                                                 backend=backend), cases))  # fmt: skip
        finally:
            del os.environ[SECRET_ENV]
        try:
            connection, _ = listener.accept()
            connection.close()
            reached = True
        except BlockingIOError:
            reached = False
        listener.close()
        self.outcomes[backend] = {c.id: o for c, o in zip(cases, outcomes)}
        self.leaks[backend] = {}
        for case, outcome in zip(cases, outcomes):
            leaks = []
            if self.secret in outcome.stdout + outcome.stderr:
                leaks.append("the secret was printed")
            if case.id == "write_into_repo" and repo_file.exists():
                leaks.append(f"{repo_file} was written")
            if case.id == "write_into_test_tmp_dir" and outside_file.exists():
                leaks.append(f"{outside_file} was written")
            if case.id == "open_socket" and reached:
                leaks.append("the test's listening socket was reached")
            self.leaks[backend][case.id] = leaks

    def clean(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    catalogue = Hostile(tmp_path_factory.mktemp("hostile"))
    yield catalogue
    catalogue.clean()


@pytest.mark.parametrize(("backend", "case"), [_param(b, c) for b in BACKENDS for c in CATALOGUE])
def test_hostile_program_scores_zero_with_its_reason_and_harms_nothing(hostile, backend, case):
    outcome, leaks = hostile.outcome(backend, case)
    assert not leaks, (leaks, outcome)
    assert outcome.score == 0.0 and outcome.reason.startswith(case.reason), outcome
    assert outcome.backend == backend
    os.kill(os.getpid(), 0)  # this process is alive (the signalling case aimed at it)


# ---- correct and wrong programs, through the reward ---------------------------------------------------------------

AVAILABLE = [pytest.param(b, marks=[] if BACKENDS[b][0] else [pytest.mark.skip(reason=f"no {b}: {BACKENDS[b][1]}")])
             for b in BACKENDS]  # fmt: skip


@pytest.mark.parametrize("backend", AVAILABLE)
def test_correct_programs_score_one_and_wrong_ones_zero(backend):
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    right = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    chat = [{"role": "assistant", "content": right}]  # TRL's conversational form
    reasons = []
    scores = code_exec_reward(["p"] * 4, [right, wrong, chat, "no fence: def add(a, b): return a + b"],
                              tests=[tests] * 4, backend=backend, log_extra=lambda name, values: reasons.extend(values),
                              **_tight_kwargs())  # fmt: skip
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert reasons[0] == "passed" and reasons[1].startswith("exit 1: AssertionError (tests.py line 1: assert add(2")
    assert reasons[3].startswith("exit 1: SyntaxError")


def _tight_kwargs() -> dict:
    return {"cpu_seconds": TIGHT.cpu_seconds, "wall_seconds": TIGHT.wall_seconds, "memory_mb": TIGHT.memory_mb,
            "max_processes": TIGHT.max_processes, "max_output_bytes": TIGHT.max_output_bytes,
            "max_file_mb": TIGHT.max_file_mb, "max_parallel": TIGHT.max_parallel}  # fmt: skip


def _tasks() -> list[dict]:
    text = (resources.files("posttrain.data") / "code_tasks.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_shipped_task_passes_its_reference_and_fails_a_wrong_solution():
    # The end-to-end demonstration: the packaged tasks, their reference solutions as a policy would write them
    # (in a fenced block), through the registered reward with the default backend.
    tasks = _tasks()
    assert 10 <= len(tasks) <= 20 and len({t["entry_point"] for t in tasks}) == len(tasks)
    completions = [f"```python\n{t['solution']}```" for t in tasks] + [f"```python\n{t['wrong_solution']}```"
                                                                        for t in tasks]  # fmt: skip
    logged: dict[str, float] = {}
    scores = code_exec_reward([t["prompt"] for t in tasks] * 2, completions, tests=[t["tests"] for t in tasks] * 2,
                              entry_point=[t["entry_point"] for t in tasks] * 2,
                              log_metric=lambda name, value: logged.update({name: value}), **_tight_kwargs())  # fmt: skip
    n = len(tasks)
    failed = [t["entry_point"] for t, s in zip(tasks, scores[:n]) if s != 1.0]
    passed_wrong = [t["entry_point"] for t, s in zip(tasks, scores[n:]) if s != 0.0]
    assert not failed and not passed_wrong, (failed, passed_wrong)
    assert logged == {"code_exec/bwrap": 1.0 if sandbox_backend().name == "bwrap" else 0.0}


def test_a_humaneval_style_check_gets_the_entry_point():
    tests = "def check(candidate):\n    assert candidate(3) == 9\n"
    assert run_sandboxed("def square(x):\n    return x * x", tests, TIGHT, entry_point="square").passed
    outcome = run_sandboxed("def square(x):\n    return x + x", tests, TIGHT, entry_point="square")
    assert outcome.reason.startswith("exit 1: AssertionError (tests.py line 2: assert candidate(3) == 9)"), outcome
    outcome = run_sandboxed("def cube(x):\n    return x ** 3", tests, TIGHT, entry_point="square")
    assert outcome.reason == "exit 1: NameError: entry point 'square' is not defined", outcome


# ---- the reward's contract -----------------------------------------------------------------------------------------


def test_the_reward_declares_the_tests_column():
    assert reward_columns("code_exec", {}) == ("tests",)
    assert reward_columns("code_exec", {"tests_column": "unit_tests"}) == ("unit_tests",)


def test_rows_without_tests_are_skipped_and_bad_tests_refused():
    assert code_exec_reward(["p"], ["print(1)"], tests=[None]) == [None]
    with pytest.raises(RewardError, match="needs the dataset column 'tests'"):
        code_exec_reward(["p"], ["print(1)"], answer=["1"])
    with pytest.raises(RewardError, match="row 0 has empty or non-string tests"):
        code_exec_reward(["p"], ["print(1)"], tests=["  "])  # every program would pass
    with pytest.raises(RewardError, match="must be one of auto, bwrap, fallback"):
        code_exec_reward(["p"], ["print(1)"], tests=["pass"], backend="docker")
    with pytest.raises(RewardError, match="'wall_seconds' must be a number >= 0.1"):
        Limits(wall_seconds=0)


@pytest.mark.parametrize(
    ("completion", "code"),
    [("```python\na = 1\n```\ntext\n```python\nb = 2\n```", "b = 2\n"),  # the last python block
     ("```\nx = 1\n```", "x = 1\n"),  # a bare fence
     ("```py\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),  # other languages are not the program
     ("```bash\nls\n```", ""),  # fences, none of them python: no code
     ("x = 1\nprint(x)", "x = 1\nprint(x)"),  # no fence: the whole completion
     ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off by the token limit
     ([{"role": "assistant", "content": "```python\ny = 2\n```"}], "y = 2\n")],
)  # fmt: skip
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def test_no_code_scores_zero_without_running():
    assert run_sandboxed("  \n", "pass", TIGHT).reason == "no code"
    assert code_exec_reward(["p"], ["```bash\nls\n```"], tests=["pass"]) == [0.0]


# ---- the tool --------------------------------------------------------------------------------------------------------


def test_run_python_returns_stdout_or_the_error():
    assert run_python("print(sum(range(10)))") == "45"
    assert run_python("if __name__ == '__main__':\n    print('main')") == "main"  # a script, as a user expects
    error = run_python("print('before')\n1 / 0")
    assert error.startswith("before\nError: exit 1: ZeroDivisionError: division by zero"), error
    assert run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)").find("Error:") >= 0
    tool = python_tool(Limits(cpu_seconds=1, wall_seconds=1, memory_mb=256, max_processes=16))
    assert tool("import time\ntime.sleep(60)").startswith("Error: timeout (wall 1.0 s)")
    long = tool("print('y' * 10000)")
    assert len(long) < 4100 and long.endswith("[output cut at 4000 characters]")
    flood = tool("while True:\n    print('y' * 1000)")  # past the output limit: the error still shows
    assert "[output cut at 4000 characters]\nError: output limit (1048576 bytes)" in flood, flood[-300:]


def test_a_passing_program_may_print_what_a_failure_looks_like():
    outcome = run_sandboxed(
        "import sys\nprint('MemoryError BlockingIOError: [Errno 11]', file=sys.stderr)", "pass", TIGHT
    )
    assert outcome.passed, outcome


def test_run_python_has_a_tool_schema():
    from transformers.utils import get_json_schema

    for tool in (run_python, python_tool(TIGHT)):
        schema = get_json_schema(tool)
        assert schema["function"]["name"] == "run_python"
        assert schema["function"]["parameters"]["required"] == ["code"]
        assert schema["function"]["parameters"]["properties"]["code"]["type"] == "string"
        assert "Python program" in schema["function"]["parameters"]["properties"]["code"]["description"]
