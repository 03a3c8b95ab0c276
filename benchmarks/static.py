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
import inspect
import os
import re
import shutil
import subprocess
import tempfile
import types
from collections.abc import Callable
from typing import NamedTuple

import torch

from vlkernels.attention.plan import SMEM_PER_BLOCK

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
def recording(all_configs: bool = False, loadable: bool = False):
    """Record Triton launches (not run) and count PyTorch kernel launches and host syncs. An
    autotuned launch is recorded with its first config, or once per config (``all_configs``), or
    with the first config whose sm_90 build fits an H100's shared memory (``loadable``: what the
    autotuner can time; compiles)."""
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
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs)  # what the autotuner would try
        for config in configs if all_configs or loadable else configs[:1]:
            a = bound(self.fn, args, kwargs) | config.kwargs
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            launch = Launch(self.fn, grid(a) if callable(grid) else grid, a, options)
            if loadable and compile_launch(launch).metadata.shared > H100["smem_per_block"]:
                continue
            rec.launches.append(launch)
            if loadable:
                break

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _SYNC.match(str(func.name())):
                rec.host_syncs.append(str(func.name()))
            elif _launches_a_kernel(func):
                rec.torch_kernels.append(str(func.name()))
            return func(*args, **(kwargs or {}))

    from vlkernels._triton_utils import _Autotuner

    saved = JITFunction.run, Autotuner.run, _Autotuner.run
    JITFunction.run, Autotuner.run, _Autotuner.run = jit_run, tuned_run, tuned_run
    try:
        with Log():
            yield rec
    finally:
        JITFunction.run, Autotuner.run, _Autotuner.run = saved


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


class _HostOnlyDriver:
    """Triton's CUDA driver as far as its launch path asks: device 0 of an H100 (sm_90), stream 0,
    kernels loaded as nothing and launched by a launcher that does nothing (or that appends its
    arguments to ``launched`` when given a list)."""

    def __init__(self, launched: list | None = None):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = types.SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: (object(), 0, 0, 0, 1024),
            get_device_properties=lambda device: {
                "max_shared_mem": H100["smem_per_block"],
                "multiprocessor_count": H100["sms"],
            },
        )
        record = (lambda *args: launched.append(args)) if launched is not None else (lambda *args: None)
        self.launcher_cls = lambda src, metadata: record

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def host_launch_path(launched: list | None = None):
    """Triton launches on CPU tensors walk Triton's whole host path — argument binding and
    specialisation, the autotune and kernel caches (each kernel compiled for sm_90 on its first
    use), the launcher call — and stop short of the driver: nothing runs (``launched``: a list the
    launcher's arguments are appended to). Autotuning keeps the first config that fits the H100's
    shared memory (no timing)."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.errors import OutOfResources

    def fits(self, *args, config, **kwargs):  # the autotuner's time of one config
        try:
            self.fn.run(*args, **kwargs, **config.all_kwargs())  # compiles and loads: the smem check
        except OutOfResources:
            return [float("inf")]
        return [1.0]  # equal times: the first wins

    saved, active = Autotuner._bench, driver._active
    Autotuner._bench = fits
    driver.set_active(_HostOnlyDriver(launched))
    try:
        yield
    finally:
        Autotuner._bench = saved
        driver._active = active  # (reset_active() would look for a real driver)


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


_DIVISIBLE = [["tt.divisibility", 16]]


def _signature(value, path, constexprs, attrs):
    """Triton's signature type of ``value``, specialised as its JIT would: an int equal to 1 is a
    constant, an int divisible by 16 and a tensor 16-byte aligned get tt.divisibility 16 (in
    ``attrs``); constants go to ``constexprs`` under their path."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        if value.storage_offset() * value.element_size() % 16 == 0:
            attrs[path] = _DIVISIBLE
        return "*" + _DTYPES[value.dtype]
    if value is None or isinstance(value, (tl.constexpr, str)) or (type(value) is int and value == 1):
        constexprs[path] = value.value if isinstance(value, tl.constexpr) else value
        return "constexpr"
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        if value % 16 == 0:
            attrs[path] = _DIVISIBLE
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tuple):
        types = [_signature(v, (*path, i), constexprs, attrs) for i, v in enumerate(value)]
        return type(value)(*types) if hasattr(value, "_fields") else tuple(types)
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


def _constexpr_indices(fn) -> set:
    """The positions of a kernel's tl.constexpr parameters: a JITFunction's ``constexprs``; read
    from the annotations of an interpreted one's function."""
    if hasattr(fn, "constexprs"):
        return set(fn.constexprs)
    params = inspect.signature(fn.fn).parameters.values()
    return {i for i, p in enumerate(params) if "constexpr" in str(p.annotation)}


def signature(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a recorded launch, as ``triton.compiler.ASTSource`` takes
    them. The interpreter's bf16 work-around (UPCAST) is off: this is the GPU path."""
    fn, args = launch.kernel, dict(launch.args)
    if "UPCAST" in args:
        args["UPCAST"] = False
    sig, constexprs, attrs = {}, {}, {}
    constant = _constexpr_indices(fn)
    for i, name in enumerate(fn.arg_names):
        if i in constant:
            sig[name] = "constexpr"
            constexprs[(i,)] = args[name]
        else:
            sig[name] = _signature(args[name], (i,), constexprs, attrs)
    return sig, constexprs, attrs


def compile_key(job: tuple) -> tuple:
    """What makes a recorded compile (module, kernel, signature, constants, attributes, the
    autotune keys' size classes) distinct, as a hashable key."""
    module, name, sig, constexprs, attrs, sizes = job
    return module, name, repr(sig), repr(sorted(constexprs.items())), repr(attrs), sizes


def record_compiles(directory: str) -> None:
    """From now on, under the interpreter, keep each distinct compile that a GPU run of the same
    launches would make (kernel, signature, constants, specialisation, the autotune keys' size
    classes; the interpreter's tile config) and write them to ``directory`` when the process
    exits (one pickle per process), for ``benchmarks/gpu_estimate.py``."""
    import atexit
    import pickle

    from triton.runtime.interpreter import InterpretedFunction

    jobs, run = {}, InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        a = dict(zip(self.arg_names, args, strict=False)) | kwargs
        sig, constexprs, attrs = signature(Launch(self, (), a, {}))
        # the autotune keys' size classes too: on the GPU each may take another first config
        sizes = tuple(a.get(k) for k in ("LQ_KEY", "LK_KEY", "M_KEY"))
        job = (self.fn.__module__, self.__name__, sig, constexprs, attrs, sizes)
        jobs.setdefault(compile_key(job), job)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def dump():
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"compiles-{os.getpid()}.pkl"), "wb") as f:
            pickle.dump(list(jobs.values()), f)

    InterpretedFunction.run = recorded
    atexit.register(dump)


def compile_signature(kernel, sig: dict, constexprs: dict, attrs: dict, options: dict, arch: int = 90):
    """``kernel`` (a @triton.jit function) compiled by Triton for ``sm_{arch}`` (90: Hopper, wgmma
    and TMA allowed) with this signature, these constants and attributes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
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
H100 = dict(
    sms=132,
    regs_per_sm=65536,
    smem_per_sm=228 * 1024,
    smem_per_block=SMEM_PER_BLOCK,
    warps_per_sm=64,
    blocks_per_sm=32,
)


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _instruction_mix(sass: str) -> dict:
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return {cls: sum(op.startswith(prefixes) for op in opcodes) for cls, prefixes in SASS_CLASSES.items()}


def _warps_per_sm(regs: int, smem_bytes: int, warps: int) -> int:
    blocks = min(
        H100["blocks_per_sm"],
        H100["warps_per_sm"] // warps,
        H100["regs_per_sm"] // max(1, regs * 32 * warps),
        H100["smem_per_sm"] // max(1, smem_bytes) if smem_bytes else H100["blocks_per_sm"],
    )
    return blocks * warps


def resources(compiled) -> dict:
    """Registers, stack bytes (spills), shared memory and local-memory instructions of a compiled
    Triton kernel, its matrix / async-copy instruction counts and the warps per SM it allows on an
    H100."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    out = dict(
        regs=field("REG"),
        stack_bytes=field("STACK"),
        smem_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
    )
    out.update(_instruction_mix(sass))
    out["warps_per_sm"] = _warps_per_sm(out["regs"], out["smem_bytes"], out["num_warps"])
    return out


def _kernel_names(mangled: list[str]) -> dict[str, str]:
    """``attn_dq_kernel<float, 256>`` for each mangled name of a csrc/ kernel (one c++filt call)."""
    demangled = subprocess.run(["c++filt", *mangled], capture_output=True, text=True).stdout.splitlines()
    out = {}
    for m, d in zip(mangled, demangled, strict=True):
        name = re.search(r"(\w+(?:<[^()]*>)?)\((?!anonymous)", d).group(1)
        out[m] = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return out


def cuda_resources(
    binary: str, arch: str = "sm_90a", mix: Callable[[str], bool] | None = None
) -> dict[str, dict]:
    """Per kernel of the CUDA C++ backend, its ``arch`` build in ``binary`` (the built
    ``vlkernels._C`` or a cubin): registers, stack bytes (spills), static shared memory (the
    kernels' tiles are dynamic shared memory, sized at launch) and the instruction mix of the
    kernels whose name ``mix`` accepts (default: every one; disassembling all of a full build takes
    ~30 s, one kernel ~0.5 s)."""
    run = lambda *a: (
        subprocess.run(
            [_cuobjdump(), "-arch", arch, *a, binary], capture_output=True, text=True, check=True
        ).stdout
    )
    usage = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+)", run("-res-usage"))
    if not usage:
        raise RuntimeError(f"{binary} has no {arch} code")
    names = _kernel_names([mangled for mangled, *_ in usage])
    wanted = [m for m in names if mix is None or mix(names[m])]
    sass = {}
    if wanted:
        listing = run("-sass", *([] if mix is None else ["-fun", ",".join(wanted)]))
        sass = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", listing, flags=re.S))
    out = {}
    for mangled, regs, stack, shared in usage:
        out[names[mangled]] = dict(regs=int(regs), stack_bytes=int(stack), static_smem_bytes=int(shared))
        if mangled in sass:
            out[names[mangled]].update(_instruction_mix(sass[mangled]))
    return out
