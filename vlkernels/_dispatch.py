"""Backends and the one dispatcher that picks one for an op call, saying why the others cannot.

A backend is one implementation of an op family (``attention``, ``contrastive``,
``gated_residual``): ``"triton"`` (fused Triton kernels; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), ``"cuda"`` (the CUDA C++ kernels of ``vlkernels._C``) or ``"torch"`` (PyTorch
operations, any device). Each family registers its backends here, each with its
``Capabilities`` as data (devices, dtypes, head dims, launch grid, features: xformers' idea), and
the family's ``needs(args)`` (what one call asks of a backend); one ``not_supported_reasons``
reads both, and ``choose`` walks the backends in priority order.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


@contextlib.contextmanager
def any_device():
    """Inside the block, the device rules let every tensor through: the host-path timings run a
    kernel backend's Python and launch path on CPU tensors, with a driver that launches nothing."""
    old = getattr(_state, "any_device", False)
    _state.any_device = True
    try:
        yield
    finally:
        _state.any_device = old


def device_reasons(runs_on: str, device: torch.device) -> list[str]:
    """Why a backend that runs on ``runs_on`` (``Capabilities.runs_on``) cannot run on ``device`` at
    all (empty: it can)."""
    reasons = []
    if getattr(_state, "any_device", False):
        return reasons
    if runs_on == "triton":
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
    elif runs_on == "extension":
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


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend serves, as data (read by ``not_supported_reasons``).

    runs_on: whose device rule applies: "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1
    set before import), "extension" (vlkernels._C's device: CUDA, or CPU under its emulation) or
    "any". dtypes: the input dtypes it computes. head_dims: (smallest, largest, multiple of), None
    for any. max_grid_axis: the most batch entries or heads its launches take (a grid axis each),
    None for any. without: the features (as the family's ``needs`` names them) it does not take.
    kernels: how its reasons name its kernels."""

    runs_on: str
    dtypes: tuple = FLOATS
    head_dims: tuple[int, int, int] | None = None
    max_grid_axis: int | None = None
    without: tuple[str, ...] = ()
    kernels: str = ""


# each language's capabilities before a family's limits (dataclasses.replace adds them)
TRITON = Capabilities("triton", kernels="the Triton kernels")
EXTENSION = Capabilities("extension", kernels="the CUDA C++ kernels")
TORCH = Capabilities("any", kernels="PyTorch operations")


@dataclasses.dataclass(frozen=True)
class Needs:
    """What one call asks of a backend beyond its device and dtype (a family's ``needs(args)``):
    its head dim, the sizes its launches put on grid axes ({"batch": B, "q heads": H, ...}) and
    the features it uses."""

    head_dim: int | None = None
    grid_axes: dict = dataclasses.field(default_factory=dict)
    features: tuple[str, ...] = ()


def _head_dims_text(lo: int, hi: int, multiple: int) -> str:
    return f"that are multiples of {multiple} in [{lo}, {hi}]" if multiple > 1 else f"up to {hi}"


class Backend:
    """One implementation of an op family: ``forward(args)`` and ``backward(grad_args)`` take the
    family's argument tuples (``vlkernels/<family>/args.py``); ``caps`` says what it serves;
    ``prepare(args)`` (optional) adds what its kernels derive from the arguments once per call,
    before the forward (the backward gets the same). ``records_backward``: its forward is an op
    whose autograd kernel records the backward itself (C++, no Python in between; ``backward`` is
    then None), so the family's autograd Function is not wrapped around it."""

    def __init__(
        self,
        name: str,
        forward,
        backward,
        caps: Capabilities,
        prepare=None,
        records_backward: bool = False,
        **ops,
    ):
        self.name, self.forward, self.backward, self.caps = name, forward, backward, caps
        self.prepare = prepare or (lambda args: args)
        self.records_backward = records_backward
        self.ops = ops  # the family's further ops (attention: bias_grad)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def not_supported_reasons(family: str, backend: Backend, args) -> list[str]:
    """Why ``backend`` cannot serve ``family``'s kernel argument tuple ``args`` (empty: it can):
    its capabilities against the call's device, dtype and needs."""
    caps, first = backend.caps, _schema.first_tensor(args)
    reasons = device_reasons(caps.runs_on, first.device)
    if first.dtype not in caps.dtypes:
        reasons.append(
            f"the {backend.name} backend computes in {', '.join(map(str, caps.dtypes))}, got {first.dtype}"
        )
    needs = _NEEDS[family](args) if family in _NEEDS else Needs()
    if caps.head_dims is not None and needs.head_dim is not None:
        lo, hi, multiple = caps.head_dims
        if not (lo <= needs.head_dim <= hi and needs.head_dim % multiple == 0):
            reasons.append(
                f"{caps.kernels} take head dims {_head_dims_text(*caps.head_dims)}, got {needs.head_dim}"
            )
    if caps.max_grid_axis is not None:
        big = {axis: n for axis, n in needs.grid_axes.items() if n > caps.max_grid_axis}
        if big:
            got = ", ".join(f"{axis} {n}" for axis, n in big.items())
            reasons.append(
                f"{caps.kernels} take at most {caps.max_grid_axis} batch entries and heads (a grid axis "
                f"each), got {got}"
            )
    reasons += [f"{caps.kernels} take no {feature}" for feature in needs.features if feature in caps.without]
    return reasons


_REGISTRY: dict[str, dict[str, Backend]] = {}
_NEEDS: dict = {}


def register(family: str, backend: Backend, needs=None) -> Backend:
    """Add ``backend`` to ``family``'s backends (each family's package does it on import);
    ``needs(args) -> Needs``: what a call of the family asks of a backend (default: nothing beyond
    its device and dtype)."""
    _REGISTRY.setdefault(family, {})[backend.name] = backend
    if needs is not None:
        _NEEDS[family] = needs
    return backend


def backends(family: str) -> dict[str, Backend]:
    return _REGISTRY[family]


_WARNED: set = set()


def _warn_if_kernels_declined(family: str, chosen: str, why: dict, device: torch.device) -> None:
    """Once per family and reason: the torch backend serves inputs that a kernel backend able to
    run on this device declined."""
    if chosen != "torch":
        return
    runs_on = {n: b.caps.runs_on for n, b in _REGISTRY[family].items()}
    declined = {n: r for n, r in why.items() if r and not device_reasons(runs_on[n], device) and n != "torch"}
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
        reasons = not_supported_reasons(family, registered[backend], args)
        if reasons:
            raise BackendUnavailableError(
                f"{family}: backend {backend!r} cannot serve these inputs: " + "; ".join(reasons)
            )
        return registered[backend]
    why = {}
    for name in BACKENDS:
        why[name] = not_supported_reasons(family, registered[name], args)
        if not why[name]:
            _warn_if_kernels_declined(family, name, why, _schema.first_tensor(args).device)
            return registered[name]
    raise BackendUnavailableError(
        f"{family}: no backend can serve these inputs: "
        + " | ".join(f"{n}: {'; '.join(r)}" for n, r in why.items())
    )
