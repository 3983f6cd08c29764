#!/usr/bin/env python
"""Compiles every Triton kernel of llama_fast with every autotune config to cubins for sm_80 (A100) and
sm_90 (H100) -- no GPU needed: triton.compile with an explicit GPUTarget runs its own bundled ptxas.

Fails on any compile error, on shared memory above the device's per-block limit, and on register spills
(ptxas's "bytes spill stores/loads"), and prints a table: kernel, config, arch, registers, shared, spills.

    python .ci/check_triton_cubins.py [--jobs N] [--filter SUBSTRING]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes.
ARCHS = {80: ("A100", 163 * 1024), 90: ("H100", 227 * 1024)}
# What a real launch tells the compiler: torch allocations are 16-byte aligned, and triton marks integer
# arguments divisible by 16 as such. Model dimensions and strides (4096, 11008, 128 x heads ...) are, so the
# check compiles pointers and these integer arguments with that hint, as the GPU would see them; row counts
# and sequence lengths vary and get none.
DIVISIBLE_INT = re.compile(r"stride|_s[bthsh]$|^(H|I|K|N|D)$")
MODULES = ("rms_norm", "rotary", "attention", "silu_and_mul", "quant_linear", "kquant_linear", "store_kv")


def _setup_env() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("check_triton_cubins: unset TRITON_INTERPRET; the interpreter compiles nothing")
    # A private cache so ptxas really runs (and reports registers and spills) for every config.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_fast_triton_check_")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    sys.path.insert(0, ROOT)


def _cases(filter_text: str):
    import importlib
    out = []
    for mod_name in MODULES:
        mod = importlib.import_module(f"llama_fast.kernels.{mod_name}")
        for case in mod.compile_cases():
            for ci, config in enumerate(case.configs):
                for arch in ARCHS:
                    if filter_text in case.name:
                        out.append((mod_name, case.name, ci, arch))
    return out


def _config_text(config) -> str:
    meta = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta}{',' if meta else ''}w={config.num_warps},s={config.num_stages}"


def parse_ptxas_log(text: str) -> tuple[int | None, int]:
    """(registers, spilled bytes) from ptxas -v output: the largest register count, and the spill stores
    plus spill loads of the worst function."""
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
    return (max(regs) if regs else None), (max(stores, default=0) + max(loads, default=0))


def verdict(row: dict, arch: int) -> str | None:
    """Why a compiled config fails the check, or None."""
    name, limit = ARCHS[arch]
    if row["shared"] > limit:
        return f"shared memory {row['shared']} B > {name} limit {limit} B"
    if row["spills"]:
        return f"register spills: {row['spills']} bytes"
    if row["regs"] is None:
        return "no ptxas register report (is the ptxas log captured?)"
    return None


def _compile_one(job):
    """Compiles one (case, config, arch); returns a result row. Runs in a worker process."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    mod_name, case_name, config_index, arch = job
    mod = importlib.import_module(f"llama_fast.kernels.{mod_name}")
    case = next(c for c in mod.compile_cases() if c.name == case_name)
    config = case.configs[config_index]
    row = {"kernel": case_name, "config": _config_text(config), "arch": f"sm_{arch}", "regs": None,
           "shared": None, "spills": None, "error": None}
    constexprs = {**case.constexprs, **config.kwargs}
    signature = dict(case.signature)
    for name in constexprs:
        signature[name] = "constexpr"
    missing = [n for n in case.fn.arg_names if n not in signature]
    if missing:
        row["error"] = f"signature lacks {missing}"
        return row
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(case.fn.arg_names)
             if signature[name].startswith("*") or (signature[name] in ("i32", "i64") and DIVISIBLE_INT.search(name))}
    log = io.StringIO()
    start = time.time()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(case.fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as e:  # noqa: BLE001 -- any compiler failure is a finding to report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return row
    row["regs"], row["spills"] = parse_ptxas_log(log.getvalue())
    row["shared"] = compiled.metadata.shared
    row["seconds"] = time.time() - start
    row["error"] = verdict(row, arch)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = parser.parse_args()
    _setup_env()
    start = time.time()
    jobs = _cases(args.filter)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(_compile_one, jobs))
    header = f"{'kernel':44} {'config':42} {'arch':6} {'regs':>4} {'shared':>7} {'spills':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(f"{r['kernel']:44} {r['config']:42} {r['arch']:6} {fmt(r['regs']):>4} {fmt(r['shared']):>7} "
              f"{fmt(r['spills']):>6}" + (f"  FAIL: {r['error']}" if r["error"] else ""))
    failed = [r for r in rows if r["error"]]
    for arch in ARCHS:
        ok = [r for r in rows if r["arch"] == f"sm_{arch}" and not r["error"]]
        if ok:
            print(f"sm_{arch} ({ARCHS[arch][0]}): {len(ok)} ok, max registers {max(r['regs'] for r in ok)}, "
                  f"max shared {max(r['shared'] for r in ok)} B of {ARCHS[arch][1]} B")
    print(f"{len(rows)} compilations, {len(failed)} failed, {time.time() - start:.0f} s")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
