"""``python -m vlkernels.info``: versions, GPU, and which backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

from vlkernels import _dispatch, _extension


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


def main() -> None:
    import vlkernels

    print(f"vlkernels {vlkernels.__version__}   python {platform.python_version()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda})   triton {_version('triton')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                f"{p.multi_processor_count} SMs"
            )
    else:
        print("GPU: none visible (torch.cuda.is_available() is False)")
    print(f"TRITON_INTERPRET={'1' if _dispatch.interpreter_on() else 'unset'}")
    ext = _extension.get()
    print(f"vlkernels._C: {'built for ' + ext.archs if ext is not None else 'not built'}")
    print("\nbackend   device  usable  why not")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    runs_on = {name: b.caps.runs_on for name, b in _dispatch.backends("attention").items()}
    for backend in _dispatch.BACKENDS:
        for dev in devices:
            reasons = _dispatch.device_reasons(runs_on[backend], dev)
            print(f"{backend:<9} {dev.type:<7} {'no' if reasons else 'yes':<7} {'; '.join(reasons)}")
    for dev in devices:
        first = next(b for b in _dispatch.BACKENDS if not _dispatch.device_reasons(runs_on[b], dev))
        print(f"automatic choice for {dev.type} tensors: {first}")


if __name__ == "__main__":
    main()
