"""Launch helpers shared by the Triton op families."""

from __future__ import annotations

import collections
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.compiler import CompiledKernel
from triton.runtime import driver

from vlkernels._dispatch import interpreter_on

# Kernel launches by name; tests read it to prove that a kernel (not an eager fallback) ran.
LAUNCHES: collections.Counter = collections.Counter()
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x · LOG2E); host code: LOG2E.value


@triton.jit
def tanh(x):
    """tanh in fp32 to a few ulps (the interpreter has no libdevice): the odd series below 0.25,
    (1 - e) / (1 + e) with e = exp(-2|x|) above."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))  # tensor first: a constexpr times a tensor is not one
    far = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < 0.25, series, tl.where(x < 0, -far, far))


def autotuned(configs: list[triton.Config], key: list[str], interpret_config: triton.Config, prune=None):
    """``triton.autotune`` over ``configs`` on a GPU; the single ``interpret_config`` under the
    interpreter, which has no device to benchmark on. VLK_AUTOTUNE=0 keeps only the first config
    ``prune(configs, args)`` leaves (test runs on a GPU: many shapes, each would be tuned)."""
    if interpreter_on():
        configs = [interpret_config]
    pruned = None
    if prune is not None or os.environ.get("VLK_AUTOTUNE", "1") == "0":
        first_only = os.environ.get("VLK_AUTOTUNE", "1") == "0"

        def pruned(configs, named_args, **kwargs):
            kept = prune(configs, named_args | kwargs) if prune else configs
            return kept[:1] if first_only else kept

    prune_by = {"early_config_prune": pruned} if pruned else None
    return lambda fn: _Autotuner(fn, configs, key, prune_by)


class _Compiled(NamedTuple):
    """A kernel as its first launch for one call signature compiled it: launched again directly."""

    kernel: object  # triton's CompiledKernel
    order: tuple  # (name, from the autotune config?) of each kernel parameter, in order
    config: dict  # the autotune config's parameters (BLOCK_M, ...)
    grid: tuple  # (x, y, z)


def launch(fn, grid, compiled: dict, name: str, dynamic: tuple, **args) -> None:
    """``fn[grid](**args)``: ``fn`` a @triton.jit kernel or an ``autotuned`` one, ``args`` every
    parameter but an autotune config's. Triton binds and specialises every argument and looks its
    caches up on each launch (tens of microseconds for attention's thirty arguments); here the
    first launch of ``name`` in ``compiled`` (a dict that belongs to one call signature: a plan,
    which fixes everything Triton specialises on but the ``dynamic`` values: the tensors' pointer
    alignment, an int's size class) goes that way and keeps the kernel it compiled, with its config
    and grid; a later launch whose ``dynamic`` values Triton specialises the same way calls that
    kernel's launcher with the arguments in order, as Triton's launch does. Under the interpreter
    every launch goes through Triton."""
    if _INTERPRETER:
        fn[grid](**args)
        return
    kept = compiled.setdefault(name, {})  # specialisation of the dynamic values -> _Compiled
    spec = native_specialize_impl(BaseBackend, dynamic, False, True, True) if kept else None
    c = kept.get(spec)
    if c is None:
        kernel = fn[grid](**args)
        if isinstance(kernel, CompiledKernel):  # (not a launch that was only recorded: benchmarks)
            config = getattr(fn, "last_config", {})
            jit = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
            order = tuple((n, n in config) for n in jit.arg_names)
            g = tuple(grid({**args, **config}) if callable(grid) else grid)
            spec = spec or native_specialize_impl(BaseBackend, dynamic, False, True, True)
            kept[spec] = _Compiled(kernel, order, config, (*g, 1, 1)[:3])
        return
    values = [c.config[n] if from_config else args[n] for n, from_config in c.order]
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    k, enter = c.kernel, knobs.runtime.launch_enter_hook
    metadata = k.launch_metadata(c.grid, stream, *values) if _hooked(enter) else None
    k.run(
        *c.grid,
        stream,
        k.function,
        k.packed_metadata,
        metadata,
        enter,
        knobs.runtime.launch_exit_hook,
        *values,
    )


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would call anything (a HookChain with calls, or a function)."""
    return bool(hook.calls) if isinstance(hook, knobs.HookChain) else hook is not None


_INTERPRETER = interpreter_on()  # Triton takes it when the kernels are defined: fixed at import


def _dtype(arg):
    """The dtype of a kernel's first argument (a tensor, or a tuple that starts with one)."""
    return arg.dtype if isinstance(arg, torch.Tensor) else _dtype(arg[0])


class _Autotuner(triton.runtime.Autotuner):
    """Triton's autotuner with a cheaper call once a key is tuned: the chosen config is launched
    directly (Autotuner.run walks every argument on each call, ~15 us for attention's). The key is
    the key arguments and the first argument's dtype (what changes shared memory per config)."""

    def __init__(self, fn, configs: list[triton.Config], key: list[str], prune_configs_by: dict | None):
        # what triton.autotune(configs, key, prune_configs_by) builds (Triton 3.6 to 3.8)
        super().__init__(fn, fn.arg_names, configs, key, None, None, prune_configs_by=prune_configs_by)
        self.chosen = {}
        self.key_index = [(k, fn.arg_names.index(k)) for k in key]

    def run(self, *args, **kwargs):
        first = args[0] if args else kwargs[self.arg_names[0]]
        key = (*(kwargs[k] if k in kwargs else args[i] for k, i in self.key_index), _dtype(first))
        chosen = self.chosen.get(key)
        if chosen is not None:
            self.last_config = chosen.kwargs
            return self.fn.run(*args, **kwargs, **chosen.all_kwargs())
        self.best_config = None
        out = triton.runtime.Autotuner.run(self, *args, **kwargs)  # benchmarks a new key
        if self.best_config is not None:  # (None where the run was replaced: benchmarks/static.py)
            self.chosen[key] = self.best_config
            self.last_config = self.best_config.kwargs
        return out


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints (triton.cdiv is a ConstexprFunction, whose call costs ~2.6 µs)."""
    return -(-a // b)


_POISON = os.environ.get("VLK_POISON", "0") == "1"  # read at import, as TRITON_INTERPRET


def poisoned(out: torch.Tensor) -> torch.Tensor:
    """A freshly allocated kernel output, filled with NaN (integers: their most negative value)
    when VLK_POISON=1 (the tests set it before importing vlkernels) so that an element a kernel
    forgets to write shows up."""
    if _POISON:
        out.fill_(float("nan") if out.dtype.is_floating_point else torch.iinfo(out.dtype).min)
    return out


def _interpreter_rounds_bf16_to_nearest_even() -> None:
    """Triton's interpreter converts fp32 to bf16 by dropping the low 16 bits (rounding toward
    zero: twice the error, and a bias) where a GPU rounds to nearest even (``x.to(tl.bfloat16)``
    compiles to cvt.rn.bf16.f32); its conversion is replaced by the GPU's rounding, so that the
    kernels run on CPU tensors compute what they compute on a GPU. Other conversions are left to
    the interpreter (fp32 -> fp16 already rounds to nearest even through numpy)."""
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    if getattr(convert, "rounds_to_nearest_even", False):
        return

    def to_nearest_even(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype != tl.bfloat16:
            return convert(input, input_dtype, output_dtype, rounding_mode)
        bits = np.frombuffer(np.ascontiguousarray(input, dtype=np.float32).tobytes(), dtype=np.uint32)
        wide = bits.astype(np.uint64)
        rounded = (wide + 0x7FFF + ((wide >> 16) & 1)) >> 16  # overflows to inf as the GPU does
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)  # NaN stays a (quiet) NaN
        return out.reshape(np.shape(input))

    to_nearest_even.rounds_to_nearest_even = True
    interpreter._convert_float = to_nearest_even


if interpreter_on():
    _interpreter_rounds_bf16_to_nearest_even()
