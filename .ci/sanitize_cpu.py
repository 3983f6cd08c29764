"""`make sanitize-cpu`: the op and model tests against llama_fast._C built with ASan + UBSan.

The sanitized extension is built (by the Makefile, LLAMA_FAST_SANITIZE=1) into build/sanitize-cpu/lib, never
in place. This script lays out a shadow package build/sanitize-cpu/pkg/llama_fast whose entries are symlinks
to the source package except _C, which is the sanitized build; then runs pytest with that package first on
sys.path (python -P: the working directory is not prepended), libasan preloaded (the Python binary is not
instrumented, so the runtime must come first), leak detection off (CPython's own allocations at exit would
drown the report) and every UBSan report fatal. Exit status: pytest's.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "sanitize-cpu")
TESTS = ["tests/ops", "tests/test_model_cpu_decode.py", "tests/test_modeling.py", "tests/test_hardening_calls.py"]


def shadow_package() -> str:
    built = glob.glob(os.path.join(BUILD, "lib", "llama_fast", "_C*.so"))
    if not built:
        sys.exit(f"sanitize-cpu: no sanitized extension under {BUILD}/lib (run `make sanitize-cpu`)")
    pkg_root = os.path.join(BUILD, "pkg")
    pkg = os.path.join(pkg_root, "llama_fast")
    shutil.rmtree(pkg_root, ignore_errors=True)
    os.makedirs(pkg)
    source = os.path.join(ROOT, "llama_fast")
    for name in os.listdir(source):
        if not name.startswith("_C"):
            os.symlink(os.path.join(source, name), os.path.join(pkg, name))
    os.symlink(built[0], os.path.join(pkg, os.path.basename(built[0])))
    return pkg_root


def main() -> int:
    pkg_root = shadow_package()
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        sys.exit("sanitize-cpu: libasan.so not found (gcc -print-file-name=libasan.so)")
    # libstdc++ preloaded too: otherwise ASan's __cxa_throw interceptor finds no real one when C++ code throws
    # (a TORCH_CHECK), and ASan aborts with "CHECK failed: asan_interceptors.cpp ... real___cxa_throw".
    libstdcxx = subprocess.run(["gcc", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.path.join(ROOT, "tests")]),
               LD_PRELOAD=f"{libasan} {libstdcxx}",
               ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               # -P for the tests' own `python -c` subprocesses too: without it their working directory (the
               # checkout, with its in-place unsanitized _C) would come first on sys.path.
               PYTHONSAFEPATH="1")
    check = subprocess.run([sys.executable, "-P", "-c", "import torch, llama_fast._C as c; print(c.__file__)"], env=env,
                           capture_output=True, text=True, cwd=ROOT)
    if pkg_root not in check.stdout:
        sys.exit(f"sanitize-cpu: the sanitized extension is not the one imported:\n{check.stdout}{check.stderr}")
    args = sys.argv[1:] or TESTS
    return subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], env=env,
                          cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
