"""`make gpu-check` (.ci/gpu_check.py) without a GPU: its arguments, time boxes, step loop and summary, with
fake steps and a fake clock, and the no-GPU mode CI runs."""
from __future__ import annotations

import json
import sys

import pytest
from script_module import load_script


@pytest.fixture(scope="module")
def gc():
    return load_script(".ci/gpu_check.py", "gpu_check")


def test_arguments(gc, tmp_path):
    args = gc.parse_args(["--out", str(tmp_path), "--budgets", "build=200, bench=90", "--skip", "sanitizer"])
    assert args.nominal == {**gc.NOMINAL_S, "build": 200.0, "bench": 90.0}
    assert args.skip == ("sanitizer",) and not args.plan_only
    for bad in (["--budgets", "compile=3"], ["--budgets", "build=-1"], ["--budgets", "build=x"],
                ["--budgets", "build"], ["--skip", "lint"], ["--deadline-s", "0"], []):
        with pytest.raises(SystemExit):
            gc.parse_args((["--out", str(tmp_path)] if bad else []) + bad)


def test_default_boxes_fit_the_deadline(gc):
    assert sum(gc.NOMINAL_S.values()) <= gc.DEADLINE_S < 9 * 60
    assert all(gc.MINIMUM_S[s] <= gc.NOMINAL_S[s] for s in gc.STEPS)
    assert len(gc.OUTPUT_FILES) <= 8   # what the GPU machine sends back


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_time_boxes_pass_unused_time_downstream_and_keep_later_minimums(gc):
    clock = FakeClock()
    # multi_gpu as on a one-GPU machine (gpu_check.step_times): no time of its own
    nominal = {"build": 100, "tests": 50, "bench": 50, "multi_gpu": 0, "sanitizer": 20}
    minimum = {"build": 30, "tests": 10, "bench": 10, "multi_gpu": 0, "sanitizer": 10}
    boxes = gc.TimeBoxes(gc.STEPS, nominal, minimum, deadline_s=220, clock=clock)
    assert boxes.timeout("build") == 100                  # 220 - (50 + 50 + 20)
    clock.now += 40                                        # the build took 40 of its 100
    assert boxes.timeout("tests") == 110                   # 180 - 70: the 60 unused flow downstream
    clock.now += 150                                       # the tests overran what the others need
    assert boxes.timeout("bench") == 20                    # 30 left, sanitizer's minimum kept
    clock.now += 20
    assert boxes.timeout("sanitizer") == 10
    clock.now += 8
    assert boxes.timeout("sanitizer") == 0                 # 2 s left: too little to start anything


def test_earlier_steps_keep_their_minimum_when_the_deadline_is_short(gc):
    boxes = gc.TimeBoxes(gc.STEPS, gc.NOMINAL_S, gc.MINIMUM_S, deadline_s=70, clock=FakeClock())
    assert boxes.timeout("build") == 60


def test_pytest_counts(gc):
    log = "....\nFAILED tests/gpu/x.py::t - boom\n==== 2 failed, 40 passed, 3 skipped, 1 error in 12.3s ====\n"
    assert gc.pytest_counts(log) == {"failed": 2, "passed": 40, "skipped": 3, "errors": 1}
    assert gc.pytest_counts("no summary here") == {}


def test_sanitizer_selection_takes_the_named_cases_and_names_missing_ones(gc):
    ids = ["tests/gpu/test_cuda_norm.py::test_rms_norm[shape0-dtype0]",
           "tests/gpu/test_cuda_norm.py::test_rms_norm[shape3-dtype2]",
           "tests/gpu/test_cuda_rotary.py::test_rotary[a]", "tests/gpu/test_cuda_rotary.py::test_rotary[b]"]
    chosen, missing = gc.sanitizer_selection(ids, ("test_rms_norm[shape3-dtype2]", "test_rotary[c]", "test_gone[x]"))
    assert chosen == ["tests/gpu/test_cuda_norm.py::test_rms_norm[shape3-dtype2]",
                      "tests/gpu/test_cuda_rotary.py::test_rotary[a]"]        # a stand-in for the missing case
    assert missing == ["test_rotary[c]", "test_gone[x]"]


def test_run_logged_kills_at_the_time_box(gc, tmp_path):
    log = tmp_path / "x.log"
    status, rc, _ = gc.run_logged([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"],
                                  str(log), timeout_s=2)
    assert status == "timeout" and rc is None
    text = log.read_text()
    assert "hi" in text and "killed after its time box" in text
    status, rc, _ = gc.run_logged([sys.executable, "-c", "raise SystemExit(3)"], str(log), timeout_s=60)
    assert (status, rc) == ("failed", 3)


def _fake_machine(gc, monkeypatch, cuda: bool, gpus: int = 1):
    monkeypatch.setattr(gc, "probe", lambda python: {"cuda": cuda, "device": "FakeGPU", "capability": "9.0",
                                                     "gpu_count": gpus if cuda else 0})
    monkeypatch.setattr(gc, "collect_gpu_tests", lambda python, timeout_s=120: [
        f"tests/gpu/t.py::{case}" for case in gc.SANITIZER_TESTS] + list(gc.NEEDS_DEMO_MODEL))


def test_no_gpu_says_so_checks_the_plan_and_exits_0(gc, monkeypatch, tmp_path, capsys):
    _fake_machine(gc, monkeypatch, cuda=False)
    assert gc.main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"].startswith("skipped: no CUDA GPU here")
    assert len(summary["plan"]["sanitizer_tests"]) == len(gc.SANITIZER_TESTS)
    assert summary["plan"]["multi_gpu_worlds"] == {"1": [], "2": [2], "4": [2, 4], "8": [2, 4, 8]}
    assert {s["status"] for s in summary["steps"].values()} == {"skipped"}
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_a_broken_plan_fails_ci(gc, monkeypatch, tmp_path):
    _fake_machine(gc, monkeypatch, cuda=False)
    monkeypatch.setattr(gc, "collect_gpu_tests", lambda python, timeout_s=120: ["tests/gpu/t.py::test_rms_norm"])
    assert gc.main(["--out", str(tmp_path), "--plan-only"]) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "plan failed"


def test_steps_run_in_order_and_every_outcome_is_recorded(gc, monkeypatch, tmp_path):
    _fake_machine(gc, monkeypatch, cuda=True, gpus=2)
    calls = []

    def fake(name, status):
        def step(args, info, timeout_s):
            calls.append(name)
            assert timeout_s > 0
            if status == "raise":
                raise RuntimeError("the bench crashed")
            return gc.StepResult(name, status, 1.0, timeout_s)
        return step

    monkeypatch.setattr(gc, "STEP_FUNCTIONS", {
        "build": fake("build", "passed"), "tests": fake("tests", "failed"),
        "bench": fake("bench", "raise"), "multi_gpu": fake("multi_gpu", "passed"),
        "sanitizer": fake("sanitizer", "timeout")})
    assert gc.main(["--out", str(tmp_path)]) == 1
    assert calls == list(gc.STEPS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    states = {name: s["status"] for name, s in summary["steps"].items()}
    assert states == {"build": "passed", "tests": "failed", "bench": "failed", "multi_gpu": "passed",
                      "sanitizer": "timeout"}
    assert "the bench crashed" in summary["steps"]["bench"]["note"]
    assert summary["status"] == "failed" and "finished_unix" in summary


def test_a_failed_build_skips_the_rest_and_says_why(gc, monkeypatch, tmp_path):
    _fake_machine(gc, monkeypatch, cuda=True)
    monkeypatch.setattr(gc, "STEP_FUNCTIONS", {
        "build": lambda args, info, t: gc.StepResult("build", "failed", note="BUILT WITHOUT CUDA KERNELS"),
        **{s: (lambda args, info, t: pytest.fail("must not run")) for s in gc.STEPS[1:]}})
    assert gc.main(["--out", str(tmp_path)]) == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["build"]["note"] == "BUILT WITHOUT CUDA KERNELS"
    assert all(steps[s]["status"] == "skipped" and steps[s]["note"] == "the build failed" for s in gc.STEPS[1:])


def test_summary_is_valid_json_after_every_write(gc, tmp_path):
    path = tmp_path / "summary.json"
    summary = gc.Summary(str(path), {"environment": {"cuda": True}})
    assert json.loads(path.read_text())["status"] == "running"
    summary.record(gc.StepResult("build", "passed", 3.0))
    assert json.loads(path.read_text())["steps"]["build"]["status"] == "passed"
    assert summary.finish() == "failed"          # tests/bench/sanitizer never ran
    assert not (tmp_path / "summary.json.tmp").exists()


def test_build_environment_targets_the_device(gc, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    env = gc.build_env({"capability": "9.0"})
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["LLAMA_FAST_CUDA"] == "1"
    assert int(env["MAX_JOBS"]) >= 1


def test_tests_step_deselects_what_needs_the_demo_model_where_it_is_missing(gc, monkeypatch, tmp_path):
    seen = []

    def fake_run(cmd, log_path, timeout_s, env=None, cwd=None):
        seen.append(cmd)
        with open(log_path, "a") as f:
            f.write("==== 12 passed, 3 skipped in 4.0s ====\n")
        return "passed", 0, 4.0

    monkeypatch.setattr(gc, "run_logged", fake_run)
    args = gc.parse_args(["--out", str(tmp_path)])
    result = gc.step_tests(args, {"demo_model": False, "pytest_timeout": True}, 100)
    assert result.status == "passed" and result.details["passed"] == 12
    assert all(f"--deselect={t}" in seen[0] for t in gc.NEEDS_DEMO_MODEL)
    assert f"--timeout={gc.PER_TEST_TIMEOUT_S}" in seen[0]
    gc.step_tests(args, {"demo_model": True}, 100)
    assert not any(a.startswith("--deselect") or a.startswith("--timeout") for a in seen[1])


def test_a_run_where_every_gpu_test_skipped_is_a_failure(gc, monkeypatch, tmp_path):
    def fake_run(cmd, log_path, timeout_s, env=None, cwd=None):
        with open(log_path, "a") as f:
            f.write("==== 80 skipped in 1.0s ====\n")
        return "passed", 0, 1.0

    monkeypatch.setattr(gc, "run_logged", fake_run)
    assert gc.step_tests(gc.parse_args(["--out", str(tmp_path)]), {}, 100).status == "failed"


def test_multi_gpu_world_sizes(gc):
    assert [gc.multi_gpu_worlds(n) for n in (0, 1, 2, 3, 4, 7, 8, 16)] == [
        [], [], [2], [2], [2, 4], [2, 4], [2, 4, 8], [2, 4, 8]]


def test_one_gpu_skips_the_multi_gpu_step_and_gives_its_time_to_the_others(gc, monkeypatch, tmp_path):
    _fake_machine(gc, monkeypatch, cuda=True, gpus=1)
    boxes = {}

    def fake(name):
        def step(args, info, timeout_s):
            boxes[name] = timeout_s
            return gc.StepResult(name, "passed", 0.0, timeout_s)
        return step

    monkeypatch.setattr(gc, "STEP_FUNCTIONS", {s: fake(s) for s in gc.STEPS})
    assert gc.main(["--out", str(tmp_path)]) == 0
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["multi_gpu"]["status"] == "skipped" and steps["multi_gpu"]["note"] == "skipped: 1 GPU(s)"
    assert "multi_gpu" not in boxes
    # the build's box: the deadline less the later steps' nominal times, multi_gpu's counted as none
    later = sum(gc.NOMINAL_S[s] for s in ("tests", "bench", "sanitizer"))
    assert boxes["build"] > gc.NOMINAL_S["build"] and boxes["build"] <= gc.DEADLINE_S - later


def test_multi_gpu_step_runs_the_benchmark_in_its_box_and_keeps_its_numbers(gc, monkeypatch, tmp_path):
    seen = []

    def fake_run(cmd, log_path, timeout_s, env=None, cwd=None):
        seen.append((cmd, log_path, timeout_s))
        out = cmd[cmd.index("--out") + 1]
        with open(out, "w") as f:
            json.dump({"results": [
                {"gpus": 1, "eager": {"decode_tok_s": 100.0}, "cuda_graphs": {"decode_tok_s": 200.0}, "load_s": 3},
                {"gpus": 2, "eager": {"decode_tok_s": 150.0}, "cuda_graphs": {"error": "RuntimeError: x"},
                 "allreduce": [{"bytes": 8192, "synchronized_median_us": 30.0, "back_to_back_mean_us": 12.0}]},
                {"gpus": 4, "error": "not run: 5 s left of the budget"}]}, f)
        return "passed", 0, 50.0

    monkeypatch.setattr(gc, "run_logged", fake_run)
    args = gc.parse_args(["--out", str(tmp_path)])
    result = gc.step_multi_gpu(args, {"gpu_count": 4}, 60)
    (cmd, log, box), = seen
    assert gc.MULTI_GPU_SCRIPT in cmd and float(cmd[cmd.index("--budget-s") + 1]) < box == 60
    assert log.endswith("bench.log") and "multi_gpu.json" in gc.OUTPUT_FILES
    assert result.status == "passed" and result.details["worlds"] == [2, 4]
    assert [r["gpus"] for r in result.details["results"]] == [1, 2, 4]
    assert result.details["results"][1]["allreduce"][0]["synchronized_median_us"] == 30.0
    assert result.details["results"][2]["error"].startswith("not run")
