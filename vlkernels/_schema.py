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
    """The op schema ``(Tensor q, ..., float scale) -> returns`` of argument tuple ``cls`` (its
    flattener made with it)."""
    _flattener(cls)
    return "(" + ", ".join(f"{t} {n}" for n, t in fields(cls)) + f") -> {returns}"


@functools.cache
def _children(cls) -> tuple:
    """Per field of ``cls``: its argument tuple type when it nests one, else None."""
    hints = typing.get_type_hints(cls)
    return tuple(hints[n] if _is_args(hints[n]) else None for n in cls._fields)


_FLATTENERS: dict[type, Callable] = {}  # argument tuple type -> its flattener, made eagerly


def _flattener(cls) -> Callable:
    """``lambda a: (a[0], a[1][0], ...)`` for ``cls``: one tuple display, built once per type (a
    generic walk costs each call microseconds)."""
    if cls not in _FLATTENERS:

        def items(c, expr):
            out = []
            for i, sub in enumerate(_children(c)):
                out += items(sub, f"{expr}[{i}]") if sub is not None else [f"{expr}[{i}]"]
            return out

        _FLATTENERS[cls] = eval(f"lambda a: ({''.join(e + ', ' for e in items(cls, 'a'))})")  # indices only
    return _FLATTENERS[cls]


def _walk(args) -> tuple:
    out = []
    for v in args:
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            out.extend(_walk(v))
        else:
            out.append(v)
    return tuple(out)


def flatten(args) -> tuple:
    """The positional values of an op call with argument tuple ``args`` (nested tuples in place).
    Every op's argument type has its flattener from its definition (``schema``); under
    torch.compile, which cannot trace the type hints a new one is made from, other types are
    walked."""
    f = _FLATTENERS.get(type(args))
    if f is None:
        if torch.compiler.is_compiling():
            return _walk(args)
        f = _flattener(type(args))
    return f(args)


def unflatten(cls, values):
    """The ``cls`` tuple of the flat ``values`` (inverse of ``flatten``)."""
    it = iter(values)

    def build(c):
        return c(*(next(it) if sub is None else build(sub) for sub in _children(c)))

    return build(cls)


def first_tensor(args) -> torch.Tensor:
    """The first tensor of ``args`` (its device and dtype are the op's)."""
    if isinstance(args[0], torch.Tensor):
        return args[0]
    return next(v for v in flatten(args) if isinstance(v, torch.Tensor))


class Op(NamedTuple):
    """A torch.library op seen as a function of its argument tuple: ``op(args)``."""

    qualname: str
    args: type

    def __call__(self, args):
        return call(self.qualname, args)


def call(qualname: str, args):
    """Op ``qualname`` called with argument tuple ``args``."""
    return _overload(qualname)(*flatten(args))


@functools.cache
def _overload(qualname: str):
    """The op's one overload (an OpOverload: called directly, it skips the packet's lookup)."""
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


class PythonOp(NamedTuple):
    """A custom op implemented in Python (``impl`` launches the Triton kernels): ``op(args)``.
    Eagerly it calls ``impl`` directly, as the op's dispatch would once it unpacked the arguments
    (tens of microseconds less per call); under torch.compile it is the opaque op, fake kernel and
    all."""

    op: Op
    impl: Callable

    def __call__(self, args):
        return self.op(args) if torch.compiler.is_compiling() else self.impl(args)


def _positional(cls, fn: Callable) -> Callable:
    return lambda *values: fn(unflatten(cls, values))


def python_op(qualname: str, cls, returns: str, impl: Callable, fake: Callable) -> PythonOp:
    """A custom op implemented in Python: ``impl(args)`` and the fake kernel ``fake(args)`` take
    the ``cls`` tuple."""
    op = torch.library.custom_op(
        qualname, _positional(cls, impl), mutates_args=(), schema=schema(cls, returns)
    )
    op.register_fake(_positional(cls, fake))
    return PythonOp(Op(qualname, cls), impl)


def cpp_op(qualname: str, cls, returns: str, fake: Callable) -> Op:
    """An op whose kernels the C++ extension registered (TORCH_LIBRARY_IMPL): its schema, derived
    from ``cls``, and its fake kernel are defined here."""
    torch.library.define(qualname, schema(cls, returns))
    torch.library.register_fake(qualname)(_positional(cls, fake))
    return Op(qualname, cls)


_SAVED = object()  # in ``ctx.stashed``: the value is the next of ``ctx.saved_tensors``


def _split(args, tensors: list, rest: list):
    """Walk ``args`` once: tensors (and absent optional ones) to ``tensors``, other values to
    ``rest`` (``_SAVED`` in a tensor's place); returns the nesting that ``_join`` rebuilds."""
    children = []
    for v in args:
        if v is None or isinstance(v, torch.Tensor):
            tensors.append(v)
            rest.append(_SAVED)
            children.append(None)
        elif isinstance(v, tuple) and hasattr(v, "_fields"):
            children.append(_split(v, tensors, rest))
        else:
            rest.append(v)
            children.append(None)
    return type(args), tuple(children)


def _join(layout, rest, tensors):
    cls, children = layout
    return cls(
        *(
            _join(c, rest, tensors)
            if c is not None
            else (next(tensors) if (v := next(rest)) is _SAVED else v)
            for c in children
        )
    )


def stash(ctx, args) -> None:
    """Save the tensors of ``args`` (``None`` for an absent optional one) for the backward and
    keep the other fields on ``ctx``; ``unstash(ctx)`` gives ``args`` back."""
    tensors, rest = [], []
    layout = _split(args, tensors, rest)
    ctx.save_for_backward(*tensors)
    ctx.stashed = layout, rest


def unstash(ctx):
    layout, rest = ctx.stashed
    return _join(layout, iter(rest), iter(ctx.saved_tensors))


def first_order(op: str):
    """Decorates an autograd ``backward``: a double backward (``create_graph=True``) raises a
    clear error instead of differentiating kernel calls that have no derivative."""

    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{op}: double backward (create_graph=True) is not supported; its backward is "
                    "not differentiable"
                )
            return backward(ctx, *grads)

        return checked

    return wrap
