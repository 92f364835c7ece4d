"""Install ei-kernels. The CUDA extension build is configured in csrc/build.py."""

import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _cuda_extension():
    """(ext_modules, cmdclass) for ei_kernels._C, or empty ones with the reason printed."""
    spec = importlib.util.spec_from_file_location(
        "ei_kernels_cuda_build", Path(__file__).resolve().parent / "csrc" / "build.py"
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    wanted, reason = build.build_decision()
    if not wanted:
        print(f"ei-kernels: not building the CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    print(f"ei-kernels: building the CUDA extension ({reason})", file=sys.stderr)
    without = build.sm90_gemm_skipped()
    if without is not None:
        print(f"ei-kernels: ... without the sm_90a TMA + wgmma GEMM: {without}", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension

    return [build.extension()], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="ei-kernels",
    version="0.1.0",
    description="Fused MoR (mixture of LoRA ranks) kernels and the EI pipeline for ViTs",
    packages=find_packages(include=["ei_kernels*", "ei*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "timm", "numpy", "pillow", "pyyaml", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-timeout"]},
    entry_points={"console_scripts": ["ei=ei.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
