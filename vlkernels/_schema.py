"""Kernel argument lists, declared once.

Each op's arguments are a ``typing.NamedTuple`` in schema order; a field whose type is another such
NamedTuple is flattened in place (the lowered mask inside the attention arguments). Everything
else is derived from the declaration:

- ``schema(Args, returns)``: the torch.library schema of the op, for the Triton ops (Python) and
  the CUDA C++ ops (defined from Python; the C++ kernels read their arguments by name) alike;
- ``flatten(args)`` / ``unflatten(Args, values)``: the positional values of an op call and back;
- ``python_op`` and ``cpp_op``: ops that take and give the NamedTuple, fake kernel included;
- ``stash`` / ``unstash``: an autograd context that saves the tensors of an argument tuple.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import NamedTuple

import torch

_SCHEMA_TYPES = {
    torch.Tensor: "Tensor",
    torch.Tensor | None: "Tensor?",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
}


def _is_args(t) -> bool:
    return isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields")


@functools.cache
def fields(cls) -> tuple[tuple[str, str], ...]:
    """(name, schema type) of every flattened field of ``cls``, in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for name in cls._fields:
        t = hints[name]
        if _is_args(t):
            out += fields(t)
        elif t in _SCHEMA_TYPES:
            out.append((name, _SCHEMA_TYPES[t]))
        else:
            raise TypeError(f"{cls.__name__}.{name}: {t} has no torch.library schema type")
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TypeError(f"{cls.__name__}: argument names must be unique once flattened, repeated: {dup}")
    return tuple(out)


def schema(cls, returns: str) -> str:
    """The op schema ``(Tensor q, ..., float scale) -> returns`` of argument tuple ``cls``."""
    return "(" + ", ".join(f"{t} {n}" for n, t in fields(cls)) + f") -> {returns}"


def flatten(args) -> tuple:
    out = []
    for v in args:
        out += flatten(v) if _is_args(type(v)) else [v]
    return tuple(out)


@functools.cache
def _children(cls) -> tuple:
    """Per field of ``cls``: its argument tuple type when it nests one, else None."""
    hints = typing.get_type_hints(cls)
    return tuple(hints[n] if _is_args(hints[n]) else None for n in cls._fields)


def unflatten(cls, values):
    """The ``cls`` tuple of the flat ``values`` (inverse of ``flatten``)."""
    it = iter(values)

    def build(c):
        return c(*(next(it) if sub is None else build(sub) for sub in _children(c)))

    return build(cls)


def first_tensor(args) -> torch.Tensor:
    """The first tensor of ``args`` (its device and dtype are the op's)."""
    return next(v for v in flatten(args) if isinstance(v, torch.Tensor))


class Op(NamedTuple):
    """A torch.library op seen as a function of its argument tuple: ``op(args)``."""

    qualname: str
    args: type

    def __call__(self, args):
        ns, name = self.qualname.split("::")
        return getattr(getattr(torch.ops, ns), name)(*flatten(args))


def _positional(cls, fn: Callable) -> Callable:
    return lambda *values: fn(unflatten(cls, values))


def python_op(qualname: str, cls, returns: str, impl: Callable, fake: Callable) -> Op:
    """A custom op implemented in Python (it launches the Triton kernels): ``impl(args)`` and the
    fake kernel ``fake(args)`` take the ``cls`` tuple."""
    op = torch.library.custom_op(
        qualname, _positional(cls, impl), mutates_args=(), schema=schema(cls, returns)
    )
    op.register_fake(_positional(cls, fake))
    return Op(qualname, cls)


def cpp_op(qualname: str, cls, returns: str, fake: Callable) -> Op:
    """An op whose kernels the C++ extension registered (TORCH_LIBRARY_IMPL): its schema, derived
    from ``cls``, and its fake kernel are defined here."""
    torch.library.define(qualname, schema(cls, returns))
    torch.library.register_fake(qualname)(_positional(cls, fake))
    return Op(qualname, cls)


def _layout(args):
    """The nesting of an argument tuple, from its values (what ``unstash`` rebuilds)."""
    return type(args), tuple(_layout(v) if _is_args(type(v)) else None for v in args)


def _rebuild(layout, values):
    cls, children = layout
    return cls(*(next(values) if c is None else _rebuild(c, values) for c in children))


def stash(ctx, args) -> None:
    """Save the tensors of ``args`` (``None`` for an absent optional one) for the backward and
    keep the other fields on ``ctx``; ``unstash(ctx)`` gives ``args`` back."""
    flat = flatten(args)
    is_tensor = [v is None or isinstance(v, torch.Tensor) for v in flat]
    ctx.save_for_backward(*(v for v, t in zip(flat, is_tensor, strict=True) if t))
    ctx.stashed = (
        _layout(args),
        tuple(None if t else v for v, t in zip(flat, is_tensor, strict=True)),
        is_tensor,
    )


def unstash(ctx):
    layout, rest, is_tensor = ctx.stashed
    tensors = iter(ctx.saved_tensors)
    return _rebuild(layout, iter([next(tensors) if t else v for v, t in zip(rest, is_tensor, strict=True)]))
