"""Backends and the one dispatcher that picks one for an op call, saying why the others cannot.

A backend is one implementation of an op family (``attention``, ``contrastive``,
``gated_residual``): ``"triton"`` (fused Triton kernels; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), ``"cuda"`` (the CUDA C++ kernels of ``vlkernels._C``) or ``"torch"`` (PyTorch
operations, any device). Each family registers its backends here; each backend answers
``not_supported_reasons(args)`` for the family's kernel argument tuple (xformers' idea), and
``choose`` walks them in priority order.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from vlkernels import _extension, _schema

BACKENDS = ("triton", "cuda", "torch")  # automatic choice walks them in this order
_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) can serve these inputs; the message says why."""


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


_INTERPRETER_AT_IMPORT = interpreter_on()  # Triton reads it when the kernels are defined


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for device types autocast has no notion
    of, such as "meta")."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_inputs(*tensors):
    """The floating-point ``tensors`` in autocast's lower-precision dtype when autocast is on for
    their device (the policy of SDPA and matmul), else as they are; None stays None."""
    device = tensors[0].device.type
    if not _autocast_on(device):
        return tensors
    low = torch.get_autocast_dtype(device)
    return tuple(t.to(low) if t is not None and t.dtype.is_floating_point else t for t in tensors)


def no_autocast(like: torch.Tensor):
    """Around a backend's forward or backward: it computes in its own precision (autocast off for
    ``like``'s device, when it is on)."""
    device = like.device.type
    return torch.autocast(device, enabled=False) if _autocast_on(device) else contextlib.nullcontext()


def device_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run on ``device`` at all (empty: it can)."""
    reasons = []
    if backend == "triton":
        if interpreter_on() != _INTERPRETER_AT_IMPORT:
            state = "set" if interpreter_on() else "unset"
            reasons.append(
                f"TRITON_INTERPRET was {state} after vlkernels was imported; Triton takes it when the "
                "kernels are defined: set it before importing vlkernels"
            )
        elif device.type == "cpu" and not interpreter_on():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before vlkernels is imported")
        elif device.type == "cuda" and interpreter_on():
            reasons.append("TRITON_INTERPRET=1 is set, so Triton cannot run on CUDA tensors")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"device type {device.type!r} is not supported by Triton here")
    elif backend == "cuda":
        ext = _extension.get()
        want = "cuda" if ext is None else ext.device_type
        if device.type != want:
            reasons.append(f"the CUDA C++ backend needs {want.upper()} tensors, got {device.type}")
        if ext is None:
            reasons.append(
                "vlkernels._C is not built (no CUDA toolkit at install time, or VLK_SKIP_CUDA_BUILD=1)"
            )
    return reasons


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class Backend:
    """One implementation of an op family: ``forward(args)`` and ``backward(grad_args)`` take the
    family's argument tuples (``vlkernels/<family>/args.py``); ``dtypes`` are the input dtypes it
    computes; ``prepare(args)`` (optional) adds what its kernels derive from the arguments once per
    call, before the forward (the backward gets the same). ``records_backward``: its forward is an
    op whose autograd kernel records the backward itself (C++, no Python in between; ``backward``
    is then None), so the family's autograd Function is not wrapped around it."""

    def __init__(
        self,
        name: str,
        forward,
        backward,
        dtypes: tuple = FLOATS,
        limits=None,
        prepare=None,
        records_backward: bool = False,
        **ops,
    ):
        self.name, self.forward, self.backward, self.dtypes = name, forward, backward, dtypes
        self.limits = limits  # optional: args -> reasons specific to this backend's kernels
        self.prepare = prepare or (lambda args: args)
        self.records_backward = records_backward
        self.ops = ops  # the family's further ops (attention: bias_grad)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def not_supported_reasons(self, args) -> list[str]:
        """Why this backend cannot serve the kernel argument tuple ``args`` (empty: it can)."""
        first = _schema.first_tensor(args)
        reasons = device_reasons(self.name, first.device)
        if first.dtype not in self.dtypes:
            reasons.append(
                f"the {self.name} backend computes in {', '.join(map(str, self.dtypes))}, got {first.dtype}"
            )
        if self.limits is not None:
            reasons += self.limits(args)
        return reasons


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(family: str, backend: Backend) -> Backend:
    """Add ``backend`` to ``family``'s backends (each family's package does it on import)."""
    _REGISTRY.setdefault(family, {})[backend.name] = backend
    return backend


def backends(family: str) -> dict[str, Backend]:
    return _REGISTRY[family]


_WARNED: set = set()


def _warn_if_kernels_declined(family: str, chosen: str, why: dict, device: torch.device) -> None:
    """Once per family and reason: the torch backend serves inputs that a kernel backend able to
    run on this device declined."""
    if chosen != "torch":
        return
    declined = {n: r for n, r in why.items() if r and not device_reasons(n, device) and n != "torch"}
    key = (family, tuple((n, tuple(r)) for n, r in declined.items()))
    if declined and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"vlkernels {family}: running on the torch backend (PyTorch operations), since "
            + "; ".join(f"{n}: {'; '.join(r)}" for n, r in declined.items()),
            stacklevel=4,
        )


def choose(family: str, backend: str | None, args) -> Backend:
    """The backend that serves ``family`` for the kernel arguments ``args``: ``backend`` (or the
    default set by ``set_backend``) if it can, else the first of BACKENDS that can."""
    _check_name(backend)
    backend = backend if backend is not None else get_backend()
    registered = _REGISTRY[family]
    if backend is not None:
        reasons = registered[backend].not_supported_reasons(args)
        if reasons:
            raise BackendUnavailableError(
                f"{family}: backend {backend!r} cannot serve these inputs: " + "; ".join(reasons)
            )
        return registered[backend]
    why = {}
    for name in BACKENDS:
        why[name] = registered[name].not_supported_reasons(args)
        if not why[name]:
            _warn_if_kernels_declined(family, name, why, _schema.first_tensor(args).device)
            return registered[name]
    raise BackendUnavailableError(
        f"{family}: no backend can serve these inputs: "
        + " | ".join(f"{n}: {'; '.join(r)}" for n, r in why.items())
    )
