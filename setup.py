"""Build of vlkernels.

``pip install -e .`` needs no CUDA compiler: the CUDA C++ extension ``vlkernels._C`` is built
only when csrc/ has sources, a CUDA toolkit and a CUDA build of torch are present, and
VLK_SKIP_CUDA_BUILD is not set. Targets: VLK_CUDA_ARCHS (default "80;90a": Ampere, and Hopper with
its arch-specific features); MAX_JOBS and NVCC_THREADS are respected.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup


def cuda_extensions():
    kernels = sorted(glob.glob("csrc/*.cu"))
    if os.environ.get("VLK_SKIP_CUDA_BUILD", "0") not in ("", "0") or not kernels:
        return [], {}
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        print("vlkernels: no CUDA toolkit found, skipping vlkernels._C")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        print("vlkernels: torch has no CUDA build, skipping vlkernels._C")
        return [], {}
    archs = [a for a in os.environ.get("VLK_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # kernels: plain .cu files (no torch headers, seconds each); bindings.cpp: the torch side
    nvcc = ["-O3", "-std=c++17", *gencode, f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    cxx = ["-O3", f"-DVLK_ARCH_LIST={','.join(archs)}"]
    ext = CUDAExtension(
        "vlkernels._C", [*kernels, "csrc/bindings.cpp"], extra_compile_args={"cxx": cxx, "nvcc": nvcc}
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="vlkernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for vision-language models",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vlkernels", "vlkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton>=3.2", "numpy"],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "ruff",
            "open-clip-torch",
            "einops",
            "einops-exts",
            "transformers>=5.17,<6",  # the range `make test` checks: its oldest and its newest release
            "expecttest",  # PyTorch's own SDPA sample inputs (torch.testing._internal)
            "parameterized",
        ],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
