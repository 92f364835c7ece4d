"""Build configuration of the CUDA extension `ei_kernels._C`, shared by setup.py and the
just-in-time fallback in ei_kernels/cuda_extension.py (loaded by path: no package imports).

Environment switches:
  EI_KERNELS_SKIP_CUDA_BUILD=1   never build the extension
  EI_KERNELS_FORCE_CUDA_BUILD=1  build whenever nvcc and a CUDA build of torch are present, even
                                 with no GPU visible (CI builds this way)
  EI_KERNELS_CUDA_ARCHS          targets separated by ';', ',' or spaces: "80", "90a" give SASS
                                 for sm_80 / sm_90a, "compute_90" gives PTX (JIT-compiled by the
                                 driver on newer GPUs). Default: every NVIDIA architecture since
                                 Turing that CUDA 13 compiles for, "75;80;86;89;90a;compute_90"
                                 (T4; A100; A10/RTX 30xx; L4/RTX 40xx; H100/H200; PTX for newer);
                                 one target, e.g. "90a", builds several times faster.
  EI_KERNELS_CUTLASS_DIR         a CUTLASS include directory (holding cute/ and cutlass/) for
                                 the sm_90a TMA + wgmma GEMM; default: the headers of the
                                 nvidia-cutlass pip package when installed. Without either, or
                                 without a 90a target, the extension builds without that kernel
                                 (every GEMM then takes the portable one)
  EI_KERNELS_CUDA_WERROR=1       compile warnings are errors (CI sets it; off by default, so
                                 that a user's host compiler with other warnings still builds)
  MAX_JOBS                       parallel compile jobs (read by torch's ninja build)
  CUDA_HOME                      the CUDA toolkit; found from nvcc on PATH when unset
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent
SOURCES = ("mor_kernels.cu", "sm90_ext_gemm.cu", "sm90_routed_forward.cu", "sm90_routed_dgrad.cu",
           "binding.cpp")
DEFAULT_ARCHS = "75;80;86;89;90a;compute_90"


def _nvcc_bin_dir(nvcc: str) -> Path | None:
    """The real bin directory of nvcc, also when PATH holds a wrapper script (as on the CI
    image, where /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc)."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return Path(found.group(1).strip()) if found else None


def find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit that owns the nvcc on PATH, else
    /usr/local/cuda if it holds nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        # Where CUDA images install the toolkit without putting it on PATH.
        default = Path("/usr/local/cuda")
        return str(default) if (default / "bin" / "nvcc").is_file() else None
    candidates = [Path(nvcc).resolve().parent.parent]
    real_bin = _nvcc_bin_dir(nvcc)
    if real_bin is not None:
        candidates.append(real_bin.parent)
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file():
            return str(home)
    return None


def configure_cuda_home() -> str | None:
    """Export CUDA_HOME before torch.utils.cpp_extension is imported: it reads the variable
    once, and its own guess (the parent of nvcc's directory) is wrong for wrapper scripts."""
    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
        cpp_extension = sys.modules.get("torch.utils.cpp_extension")
        if cpp_extension is not None:  # imported earlier in this process: update its copy
            cpp_extension.CUDA_HOME = home
    return home


def _missing_prerequisite() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not importable here (install with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if configure_cuda_home() is None:
        return "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    return None


def build_decision() -> tuple[bool, str]:
    """(build?, why) for setup.py, from the switches and what this machine has. A forced
    build that cannot happen is an error, not a silent skip."""
    if os.environ.get("EI_KERNELS_SKIP_CUDA_BUILD") == "1":
        return False, "EI_KERNELS_SKIP_CUDA_BUILD=1"
    missing = _missing_prerequisite()
    if os.environ.get("EI_KERNELS_FORCE_CUDA_BUILD") == "1":
        if missing is not None:
            raise RuntimeError(f"EI_KERNELS_FORCE_CUDA_BUILD=1 but {missing}")
        return True, "EI_KERNELS_FORCE_CUDA_BUILD=1"
    if missing is not None:
        return False, missing
    import torch

    if torch.cuda.is_available():
        return True, "a CUDA GPU is visible"
    return False, "no CUDA GPU visible; set EI_KERNELS_FORCE_CUDA_BUILD=1 to build anyway"


def _targets() -> list[str]:
    archs = os.environ.get("EI_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS).strip()
    return [t for t in re.split(r"[;,\s]+", archs) if t]


def gencode_flags() -> list[str]:
    flags = []
    for target in _targets():
        if re.fullmatch(r"compute_\d+a?", target):
            flags.append(f"-gencode=arch={target},code={target}")
        elif re.fullmatch(r"\d+a?", target):
            flags.append(f"-gencode=arch=compute_{target},code=sm_{target}")
        else:
            raise ValueError(
                f"EI_KERNELS_CUDA_ARCHS: {target!r} is neither NN[a] (SASS) nor compute_NN[a] (PTX)"
            )
    if not flags:
        raise ValueError("EI_KERNELS_CUDA_ARCHS: no targets given")
    return flags


def cutlass_include_dir() -> Path | None:
    """EI_KERNELS_CUTLASS_DIR, else the headers inside the nvidia-cutlass pip package (found
    without importing it: its Python side needs packages we do not)."""
    if os.environ.get("EI_KERNELS_CUTLASS_DIR"):
        path = Path(os.environ["EI_KERNELS_CUTLASS_DIR"])
        if not (path / "cute" / "tensor.hpp").is_file():
            raise ValueError(f"EI_KERNELS_CUTLASS_DIR={path}: no cute/tensor.hpp there")
        return path
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "source" / "include"
        if (path / "cute" / "tensor.hpp").is_file():
            return path
    return None


def sm90_gemm_skipped() -> str | None:
    """Why the build leaves out the sm_90a GEMM (None: it is built)."""
    if "90a" not in _targets():
        return "EI_KERNELS_CUDA_ARCHS has no 90a target"
    if cutlass_include_dir() is None:
        return "no CUTLASS headers (pip install nvidia-cutlass, or set EI_KERNELS_CUTLASS_DIR)"
    return None


def _sm90_flags() -> list[str]:
    # -isystem: warnings inside CUTLASS's headers are theirs, not errors of ours.
    if sm90_gemm_skipped() is not None:
        return []
    return ["-DEI_KERNELS_SM90A", "-isystem", str(cutlass_include_dir())]


def _torch_system_includes() -> list[str]:
    # torch's own headers warn under -Wextra (unused parameters): naming their directories
    # -isystem as well silences warnings from them only, not from csrc/.
    from torch.utils.cpp_extension import include_paths

    return [flag for path in include_paths() for flag in ("-isystem", path)]


def compile_args() -> dict[str, list[str]]:
    """All warnings on for both compilers; errors with EI_KERNELS_CUDA_WERROR=1."""
    werror = os.environ.get("EI_KERNELS_CUDA_WERROR", "0") == "1"
    host_warnings = ["-Wall", "-Wextra", *(["-Werror"] if werror else [])]
    return {
        "cxx": ["-O3", *host_warnings, *_torch_system_includes()],
        "nvcc": [
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",  # CuTe's constexpr helpers run on the device too
            *_sm90_flags(),
            *(["-Werror", "all-warnings"] if werror else []),
            "-Xcompiler", ",".join(host_warnings),
            "-lineinfo",
            *gencode_flags(),
        ],
    }


def sources(relative: bool) -> list[str]:
    """setup.py wants paths relative to the project root; the JIT build absolute ones."""
    root = CSRC.parent
    return [str((CSRC / name).relative_to(root) if relative else CSRC / name) for name in SOURCES]


def extension():
    """The setuptools extension `ei_kernels._C` (call from the project root)."""
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension("ei_kernels._C", sources(relative=True),
                         extra_compile_args=compile_args())


def jit_load(build_directory: Path, verbose: bool = False) -> Path:
    """Compile and load the same sources with torch.utils.cpp_extension.load; returns the
    library path. Only the op registrations matter, so it is loaded as a plain library."""
    configure_cuda_home()
    from torch.utils.cpp_extension import load

    name = "ei_kernels_cuda_jit"
    build_directory.mkdir(parents=True, exist_ok=True)
    args = compile_args()
    load(name, sources(relative=False), extra_cflags=args["cxx"],
         extra_cuda_cflags=args["nvcc"], build_directory=str(build_directory),
         is_python_module=False, verbose=verbose)
    return build_directory / f"{name}.so"
