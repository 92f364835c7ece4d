"""Install ei-kernels. The CUDA extension build is configured in csrc/build.py."""

from setuptools import find_packages, setup

setup(
    name="ei-kernels",
    version="0.1.0",
    description="Fused MoR (mixture of LoRA ranks) kernels and the EI pipeline for ViTs",
    packages=find_packages(include=["ei_kernels*", "ei*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "timm", "numpy", "pillow", "pyyaml", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["ei=ei.cli:main"]},
)
