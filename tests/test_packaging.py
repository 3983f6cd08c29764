"""The wheel ships the Triton kernels (kernels/ -> llama_fast.kernels) and the compiled extension, and works
from a non-editable install."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # In-tree build: reuses build/ so ninja only relinks what `make build` compiled.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(out), str(ROOT)], check=True, cwd=ROOT)
    (whl,) = out.glob("llama_fast-*.whl")
    return whl


def test_wheel_contains_kernels_and_extension(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "llama_fast/kernels/__init__.py" in names
    assert any(n.startswith("llama_fast/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "kernels/")) for n in names)
    # every module of the package, sub-packages included (setup.py lists them)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llama_fast").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))


def test_non_editable_install_imports_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    code = (
        "import llama_fast, llama_fast.kernels, llama_fast._native as n, torch\n"
        "print(llama_fast.__file__); print(llama_fast.kernels.__file__)\n"
        "assert n.missing_reason() is None, n.missing_reason()\n"
        "x = torch.randn(2, 8); w = torch.ones(8)\n"
        "err = torch.ops.llama_fast.rms_norm(x, w, 1e-6) - llama_fast.ops.rms_norm(x, w, backend='torch')\n"
        "print(float(err.abs().max()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pkg_file, kernels_file, err = res.stdout.split()
    assert pkg_file.startswith(str(target)), pkg_file
    assert kernels_file.startswith(str(target / "llama_fast" / "kernels")), kernels_file
    assert float(err) < 1e-5
