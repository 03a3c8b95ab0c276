"""The CUDA C++ backend without a GPU: csrc/ built with g++ under csrc/emulate.h (a CPU emulation
of the execution model) and registered as ``vlkernels_emu::*`` for CPU tensors. The tests run the
kernels this way; the host-cost benchmark runs the C++ entry point this way with
VLK_EMULATE_LAUNCHES=0 (launches return at once: the host's work without the kernels')."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

import torch

from vlkernels import _extension

EXTENSION = _extension.Extension("vlkernels_emu", "cpu", "CPU emulation")
_STATE: dict = {}


def build() -> str | None:
    """Build csrc/ for the CPU emulation once per process and define its ops; their namespace, or
    None when it cannot be built (``why()`` says why)."""
    if "ns" in _STATE:
        return _STATE["ns"]
    root = pathlib.Path(__file__).resolve().parent.parent
    cuda_include = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if shutil.which("g++") is None or not (cuda_include / "cuda_fp16.h").exists():
        _STATE["ns"] = None
        _STATE["why"] = f"needs g++ and the CUDA headers (cuda_fp16.h) under {cuda_include}"
        return None
    from torch.utils import cpp_extension

    # one build per Python and torch (the rehearsal's environment builds beside the test venv's)
    py = f"{sys.version_info[0]}{sys.version_info[1]}"
    build_dir = root / "build" / f"emulated-py{py}-torch{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(root / "csrc" / "bindings.cpp")]
    for cu in sorted((root / "csrc").glob("*.cu")):
        wrapper = build_dir / f"emu_{cu.stem}.cpp"
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    flags = [
        "-DVLK_EMULATE",
        "-std=c++20",
        "-O1",
        "-Wno-unknown-pragmas",
        f"-I{cuda_include}",
        f"-I{root / 'csrc'}",
    ]
    cpp_extension.load(
        name="vlkernels_emu",
        sources=sources,
        extra_cflags=flags,
        build_directory=str(build_dir),
        is_python_module=False,
    )
    _extension.define(EXTENSION.ns)
    _STATE["ns"] = EXTENSION.ns
    return EXTENSION.ns


def why() -> str:
    """Why ``build()`` gave None."""
    return _STATE.get("why", "")
