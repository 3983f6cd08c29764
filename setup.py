"""Builds llama_fast and its one torch extension, llama_fast._C.

The CPU sources are always built, for x86-64-v3 (AVX2/FMA) with AVX-512 paths chosen at run time; never
-march=native, so a wheel runs on any x86-64-v3 machine. The CUDA sources are built when nvcc and a
CUDA-enabled torch are present; LLAMA_FAST_CUDA=0/1 overrides the detection (1 makes a missing toolkit an
error). Build with `pip install --no-build-isolation -e .` so the extension links against the installed torch.
"""
import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Without CUDA_HOME torch guesses /usr/local and the link fails; prefer the standard toolkit location.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda():
    flag = os.environ.get("LLAMA_FAST_CUDA")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            raise RuntimeError(
                "LLAMA_FAST_CUDA=1 but no CUDA build is possible: torch.version.cuda=%r, CUDA_HOME=%r "
                "(export CUDA_HOME=/usr/local/cuda)" % (torch.version.cuda, CUDA_HOME))
        return True
    return have


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # torch 2.14 headers need C++20; the kernel sources themselves stay C++17. -ffp-contract=off: GCC contracts
    # a * b + c into an fma in C++ whatever -std says (only ISO C modes turn that off), and the CPU code's
    # dequantization (code * scale + offset) is defined as one multiply then one add (common/quant_format.h,
    # cpu/ggml_dequant.h); the kernels' intended fmas are written as intrinsics / std::fma.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Baseline AVX2/FMA; AVX-512 kernels use function-level target attributes and run-time dispatch.
        cxx += ["-march=x86-64-v3"]
    link = ["-fopenmp"]
    if os.environ.get("LLAMA_FAST_SANITIZE") == "1":
        # `make sanitize-cpu`: AddressSanitizer + UndefinedBehaviorSanitizer, any UB report fatal. Built into
        # its own directory, never in place (see .ci/sanitize_cpu.py).
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f not in ("-O3", "-DNDEBUG")] + ["-O1"] + sanitize
        link += sanitize
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                   + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        import torch

        nvidia_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(nvidia_inc):  # cuBLAS etc. headers for c10/ATen CUDA includes; the toolkit lacks them
            include_dirs.append(os.path.abspath(nvidia_inc))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DNDEBUG", "--expt-relaxed-constexpr"]
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to detect the arch from: build the archs CI checks (Ampere, Hopper) instead of all.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension("llama_fast._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx + ["-DLLAMA_FAST_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=link)
    return CppExtension("llama_fast._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    # llama_fast/kernels is a symlink to the top-level kernels/ so the Triton kernels ship inside the wheel
    # and every checkout imports its own kernels. Not package_dir={"llama_fast.kernels": "kernels"}: that
    # works in a wheel and in an editable install, but in the latter the mapping lives in the installed
    # import finder, not in the tree, so a checkout run without installing it (PYTHONPATH=.) has no
    # llama_fast.kernels, and a second checkout (a git worktree) on the same environment silently imports
    # the installed checkout's kernels. See docs/DESIGN.md, "Packaging".
    packages=["llama_fast", "llama_fast.formats", "llama_fast.kernels", "llama_fast.ops", "llama_fast.parallel",
              "llama_fast.serve", "llama_fast.tokenization", "llama_fast.tools"],
    package_data={"llama_fast": ["data/*"]},
    ext_modules=[_extension()],
    cmdclass=_cmdclass(),
)
