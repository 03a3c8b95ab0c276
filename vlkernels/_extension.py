"""The CUDA C++ extension ``vlkernels._C`` (csrc/): loading it, and the schemas of its ops.

The C++ side registers kernels only (``TORCH_LIBRARY_IMPL``; each kernel reads its arguments by
name from the op's schema, csrc/bindings.cpp). The schemas come from the op families' argument
declarations: each family's ``cuda.py`` declares its ops here with ``declare``, which defines
them, with their fake kernels, in the extension's namespace when the extension is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from vlkernels import _schema


class Extension(NamedTuple):
    """A loaded build of csrc/: its ``torch.ops`` namespace, the device type its kernels are
    registered for, and the GPU architectures it was compiled for."""

    ns: str
    device_type: str
    archs: str


class CppOp(NamedTuple):
    """An op of the extension, called with its argument tuple: ``op(args)``."""

    name: str
    args: type
    returns: str
    fake: Callable

    def __call__(self, args):
        return _schema.call(f"{get().ns}::{self.name}", args)


def _load() -> Extension | None:
    try:
        from vlkernels import _C
    except ImportError:
        return None
    return Extension("vlkernels", "cuda", _C.ARCHS)


# Probed once, at import: calls from traced code (torch.compile) then only read it.
_BUILT = _load()
_DECLARED: list[CppOp] = []


def declare(name: str, args: type, returns: str, fake: Callable) -> CppOp:
    """Declare the C++ op ``name`` (its kernels are in csrc/) with argument tuple ``args``; with
    the extension built, its schema and fake kernel are defined in ``vlkernels`` right away."""
    op = CppOp(name, args, returns, fake)
    _DECLARED.append(op)
    if _BUILT is not None:
        _schema.cpp_op(f"{_BUILT.ns}::{name}", args, returns, fake)
    return op


def define(ns: str) -> None:
    """Define every declared op's schema and fake kernel in namespace ``ns`` (the tests' CPU
    emulation of csrc/ registers its kernels as ``vlkernels_emu``)."""
    for op in _DECLARED:
        _schema.cpp_op(f"{ns}::{op.name}", op.args, op.returns, op.fake)


def get() -> Extension | None:
    """The loaded extension, or None when it was not built."""
    return _BUILT
