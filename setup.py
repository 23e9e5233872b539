"""Builds the compiled SparseK kernels (sparsek_hf._C) with torch's cpp_extension.

Install with ``pip install --no-build-isolation -e .`` so the build sees the torch you run with
(as flash-attn does). The CPU kernels are always built; the CUDA kernels (sm_90a) are added when
torch was built with CUDA and nvcc is found, unless SPARSEK_BUILD_CUDA=0. SPARSEK_BUILD_CUDA=1
makes a missing CUDA toolchain an error instead of a CPU-only build.
"""

import glob
import os
import shutil

from setuptools import setup


def _locate_cuda_toolkit() -> None:
    """Point CUDA_HOME at a toolkit that has the CUDA headers when the environment does not say.

    torch guesses CUDA_HOME as the parent of the directory holding ``nvcc``; an ``nvcc`` symlink or
    wrapper script in /usr/local/bin makes that /usr/local, which has no headers. The resolved nvcc's
    toolkit, then the conventional /usr/local/cuda, are tried instead.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_toolkit()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit(
        "sparsek-hf builds its kernels against the installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .`"
    ) from exc


def _want_cuda() -> bool:
    flag = os.environ.get("SPARSEK_BUILD_CUDA")
    available = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    )
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise SystemExit("SPARSEK_BUILD_CUDA=1 but torch has no CUDA, or no CUDA toolkit (nvcc and its headers) was "
                         "found: set CUDA_HOME")
    if torch.version.cuda is not None and not available and flag != "0":
        print("sparsek-hf: torch has CUDA but no CUDA toolkit with headers was found (set CUDA_HOME); "
              "building the CPU kernels only")
    return available


def _cxx_standard() -> str:
    """The C++ standard torch's headers need: C++17 up to torch 2.13, C++20 from the releases whose
    ATen.h says so (torch 2.14 refuses to compile as C++17)."""
    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(header) as f:
            return "c++20" if "C++20" in f.read() else "c++17"
    except OSError:
        return "c++17"


cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
std = _cxx_standard()
cxx_flags = ["-O3", f"-std={std}"]
if _want_cuda():
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc_flags = [
        "-O3",
        f"-std={std}",
        "-gencode=arch=compute_90a,code=sm_90a",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-lineinfo",
    ]
    ext = CUDAExtension(
        "sparsek_hf._C",
        cpu_sources + cuda_sources,
        define_macros=[("SPARSEK_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-DSPARSEK_WITH_CUDA=1"], "nvcc": nvcc_flags},
    )
else:
    ext = CppExtension("sparsek_hf._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
