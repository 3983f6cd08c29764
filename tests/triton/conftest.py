"""The Triton kernels run on CPU tensors under the interpreter, which triton reads once, when first
imported: this suite runs in its own pytest process with TRITON_INTERPRET=1 in the environment
(`make test-triton`). Every kernel launch of the suite is bounds-checked (_memcheck.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.exit("tests/triton needs TRITON_INTERPRET=1 in the environment before triton is imported: "
                "run `make test-triton`", returncode=4)

import _memcheck  # noqa: E402

_memcheck.install()
