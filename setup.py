from setuptools import setup

setup(
    name="fastres",
    version="0.1.0",
    description="Fused Triton kernels for residual networks: conv + BatchNorm + ReLU + "
                "residual add in one kernel, drop-in ResNet blocks",
    # fastres/kernels is a symlink to the top-level kernels/ folder, so every install mode
    # (regular, PEP 660 editable, legacy develop of old setuptools) finds fastres.kernels.
    packages=["fastres", "fastres.ops", "fastres.kernels", "benchmarks"],
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "torchvision", "hypothesis", "timm"],
        "bench": ["pytest", "pytest-benchmark", "torchvision", "matplotlib"],
    },
)
