from setuptools import setup

setup(
    name="fastres",
    version="0.1.0",
    description="Fused Triton kernels for residual networks: conv + BatchNorm + ReLU + "
                "residual add in one kernel, drop-in ResNet blocks",
    packages=["fastres", "fastres.kernels", "benchmarks"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels", "benchmarks": "benchmarks"},
    python_requires=">=3.10",
    install_requires=["torch", "triton", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "torchvision", "hypothesis", "timm"],
        "bench": ["pytest", "pytest-benchmark", "torchvision", "matplotlib"],
    },
)
