"""What a call costs, read without a GPU: the kernel launches it makes and its compiled kernels.

- ``recording()``: inside it, Triton launches are recorded instead of run (kernel, grid, arguments,
  the first autotune config) and PyTorch operations that would launch a GPU kernel are counted;
  run the ops on fake CUDA tensors (``fake_cuda()``) and nothing needs a device.
- ``compile_launch(launch, arch)``: the recorded launch compiled for a GPU target (Triton's own
  compiler, the signature and constants the launcher passed).
- ``resources(kernel)``: registers, stack (spills), shared memory, local-memory instructions and
  the matrix / async-copy instruction mix of the cubin (``cuobjdump``, shipped with Triton), and
  the occupancy this
  allows on an H100.

Used by ``benchmarks/bench_budget.py`` and ``tests/test_kernels_compile.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from typing import NamedTuple

import torch

_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
}


class Launch(NamedTuple):
    """A recorded Triton launch: the @triton.jit function, its grid, every argument by name (the
    autotune config's included) and the compile options."""

    kernel: object
    grid: tuple
    args: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclasses.dataclass
class Recording:
    """What ran inside ``recording()``: Triton launches, and the PyTorch ops that launch a kernel
    on a GPU (names, in order) or synchronise with the host."""

    launches: list = dataclasses.field(default_factory=list)
    torch_kernels: list = dataclasses.field(default_factory=list)
    host_syncs: list = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches) + len(self.torch_kernels)


# PyTorch ops that launch no GPU kernel: allocation, views, metadata
_NO_KERNEL = re.compile(
    r"aten::(empty|empty_like|empty_strided|new_empty|new_empty_strided|detach|alias|lift_fresh|"
    r"_to_copy_meta|sym_.*|is_same_size|_has_compatible_shallow_copy_type|set_)\b"
)
_SYNC = re.compile(r"aten::(_local_scalar_dense|item|is_nonzero|equal|nonzero)\b")


def _launches_a_kernel(func) -> bool:
    name = str(func.name())
    if _NO_KERNEL.match(name) or not name.startswith("aten::"):
        return False
    returns = func._schema.returns
    is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return not is_view


@contextlib.contextmanager
def recording():
    """Record Triton launches (not run) and count PyTorch kernel launches and host syncs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    rec = Recording()

    def bound(fn, args, kwargs):
        return dict(zip(fn.arg_names, args, strict=False)) | kwargs

    def jit_run(self, *args, grid, warmup, **kwargs):
        a = bound(self, args, kwargs)
        options = {k: a.pop(k) for k in ("num_warps", "num_stages") if k in a}
        rec.launches.append(Launch(self, grid(a) if callable(grid) else grid, a, options))

    def tuned_run(self, *args, grid, warmup, **kwargs):
        config = self.configs[0]
        a = bound(self.fn, args, kwargs) | config.kwargs
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        rec.launches.append(Launch(self.fn, grid(a) if callable(grid) else grid, a, options))

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _SYNC.match(str(func.name())):
                rec.host_syncs.append(str(func.name()))
            elif _launches_a_kernel(func):
                rec.torch_kernels.append(str(func.name()))
            return func(*args, **(kwargs or {}))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        with Log():
            yield rec
    finally:
        JITFunction.run, Autotuner.run = saved


@contextlib.contextmanager
def counting_dots():
    """Under the interpreter: the kernels run, each launch is recorded as ``recording()`` records
    it, and the FLOPs of every ``tl.dot`` they execute are added up: yields (launches, [flops])."""
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

    launches, flops = [], [0]
    run, dot = InterpretedFunction.run, InterpreterBuilder.create_dot

    def counted_run(self, *args, grid, warmup, **kwargs):
        a = dict(zip(self.arg_names, args, strict=False)) | kwargs
        launches.append(Launch(self, grid(a) if callable(grid) else grid, a, {}))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def counted_dot(self, a, b, d, *rest):
        m, k = a.data.shape[-2:]
        flops[0] += 2 * m * k * b.data.shape[-1]
        return dot(self, a, b, d, *rest)

    InterpretedFunction.run, InterpreterBuilder.create_dot = counted_run, counted_dot
    try:
        yield launches, flops
    finally:
        InterpretedFunction.run, InterpreterBuilder.create_dot = run, dot


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors (shapes, strides and dtypes only) on a machine without a GPU."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    sms = mock.Mock(multi_processor_count=132, name="NVIDIA H100 80GB HBM3")
    with (
        FakeTensorMode(allow_non_fake_inputs=True),
        mock.patch("torch.cuda.get_device_properties", return_value=sms),
    ):
        yield


def _signature(value, path, constexprs):
    """Triton's signature type of ``value``; constants go to ``constexprs`` under their path."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if value is None or isinstance(value, (tl.constexpr, str)):
        constexprs[path] = value.value if isinstance(value, tl.constexpr) else value
        return "constexpr"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tuple):
        types = [_signature(v, (*path, i), constexprs) for i, v in enumerate(value)]
        return type(value)(*types) if hasattr(value, "_fields") else tuple(types)
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


def signature(launch: Launch) -> tuple[dict, dict]:
    """(signature, constexprs) of a recorded launch, as ``triton.compiler.ASTSource`` takes them.
    The interpreter's bf16 work-around (UPCAST) is off: this is the GPU path."""
    fn, args = launch.kernel, dict(launch.args)
    if "UPCAST" in args:
        args["UPCAST"] = False
    sig, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            sig[name] = "constexpr"
            constexprs[(i,)] = args[name]
        else:
            sig[name] = _signature(args[name], (i,), constexprs)
    return sig, constexprs


def compile_signature(kernel, sig: dict, constexprs: dict, options: dict, arch: int = 90):
    """``kernel`` (a @triton.jit function) compiled by Triton for ``sm_{arch}`` (90: Hopper, wgmma
    and TMA allowed) with this signature and these constants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))


def compile_launch(launch: Launch, arch: int = 90):
    """The recorded launch compiled for ``sm_{arch}``."""
    return compile_signature(launch.kernel, *signature(launch), launch.options, arch)


# Instruction classes of the SASS, by opcode prefix
SASS_CLASSES = {
    "wgmma": ("HGMMA",),
    "mma": ("HMMA",),
    "cp_async": ("LDGSTS",),
    "tma": ("UTMALDG", "UBLKCP"),
    "local_mem": ("LDL", "STL"),
}
H100 = dict(sms=132, regs_per_sm=65536, smem_per_sm=228 * 1024, warps_per_sm=64, blocks_per_sm=32)


def resources(compiled) -> dict:
    """Registers, stack bytes (spills), shared memory and local-memory instructions of a compiled
    kernel, its matrix / async-copy instruction counts and the warps per SM it allows on an H100."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    out = dict(
        regs=field("REG"),
        stack_bytes=field("STACK"),
        smem_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
    )
    for cls, prefixes in SASS_CLASSES.items():
        out[cls] = sum(op.startswith(prefixes) for op in opcodes)
    warps = out["num_warps"]
    blocks = min(
        H100["blocks_per_sm"],
        H100["warps_per_sm"] // warps,
        H100["regs_per_sm"] // max(1, out["regs"] * 32 * warps),
        H100["smem_per_sm"] // max(1, out["smem_bytes"]) if out["smem_bytes"] else H100["blocks_per_sm"],
    )
    out["warps_per_sm"] = blocks * warps
    return out
