"""Backend selection: which implementation serves an op call, and why the others cannot.

Backends: ``"triton"`` (fused kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
``"cuda"`` (hand-written CUDA C++ in ``vlkernels._C``), ``"torch"`` (the eager reference).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("triton", "cuda", "torch")
_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve these inputs; the message says why."""


def _check_name(backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def set_backend(backend: str | None) -> None:
    """Set the backend used when an op is called with ``backend=None`` (None = automatic)."""
    _check_name(backend)
    _state.backend = backend


def get_backend() -> str | None:
    return getattr(_state, "backend", None)


@contextlib.contextmanager
def use_backend(backend: str | None):
    """``with vlkernels.use_backend("torch"): ...`` — set the default backend inside a block."""
    _check_name(backend)
    old = get_backend()
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = old


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def cuda_extension():
    """The compiled ``vlkernels._C`` module, or None when it was not built (probed once: a failed
    import would otherwise search the path again on every op call). Importing it registers the
    ``vlkernels::attention_*`` / ``contrastive_*`` ops; their fake kernels and autograd are then
    registered from Python."""
    try:
        from vlkernels import _C
    except ImportError:
        return None
    register_cuda_ops("vlkernels")
    return _C


def register_cuda_ops(ns: str) -> None:
    """Fake kernels and autograd of the CUDA C++ ops in namespace ``ns`` (``vlkernels``; the tests
    register the CPU emulation's ``vlkernels_emu`` the same way)."""
    for family in ("attention", "gated", "contrastive"):
        importlib.import_module(f"vlkernels.{family}").register_cuda_ops(ns)


def cuda_ops():
    """The ``torch.ops`` namespace that serves backend "cuda"."""
    cuda_extension()
    return torch.ops.vlkernels


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run on ``device`` (empty list: it can)."""
    reasons = []
    if backend == "triton":
        if not _triton_installed():
            reasons.append("triton is not installed")
        elif device.type == "cpu" and not interpreter_on():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before vlkernels is imported")
        elif device.type == "cuda" and interpreter_on():
            reasons.append("TRITON_INTERPRET=1 is set, so Triton cannot run on CUDA tensors")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"device type {device.type!r} is not supported by Triton here")
    elif backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"the CUDA C++ backend needs CUDA tensors, got {device.type}")
        if cuda_extension() is None:
            reasons.append(
                "vlkernels._C is not built (no CUDA toolkit at install time, or VLK_SKIP_CUDA_BUILD=1)"
            )
    return reasons


def choose(backend: str | None, device: torch.device, op: str) -> str:
    """Resolve ``backend`` (or the default) to one that can serve ``op`` on ``device``."""
    _check_name(backend)
    backend = backend if backend is not None else get_backend()
    if backend is not None:
        reasons = unavailable_reasons(backend, device)
        if reasons:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot serve tensors on {device}: " + "; ".join(reasons)
            )
        return backend
    # Triton before the CUDA C++ kernels until a GPU session has measured where those are faster.
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("triton", "torch")
    for name in order:
        if not unavailable_reasons(name, device):
            return name
    return "torch"
