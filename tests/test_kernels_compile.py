"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 (fp16, bf16, fp32; every mask
flag on, and off): the CPU counterpart of the GPU test run, which the interpreter cannot replace
(it does not type-check the way the compiler does). Runs in a subprocess without
TRITON_INTERPRET, so that the kernels are real JIT functions."""

import os
import subprocess
import sys
import time

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _compile(fn, target, ptrs, floats, constexprs):
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    if isinstance(fn, Autotuner):
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [n for i, n in enumerate(fn.arg_names) if i in fn.constexprs and n not in constexprs]
    assert not missing, f"{fn.__name__}: no value for constexpr {missing}"
    return fn.__name__, triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target)


# (arch, dtype, mask flags, contrastive variant): every flag value is compiled at least once.
ALL_ON = dict(CAUSAL=True, HAS_KLEN=True, QF_MODE=2, HAS_PREFIX=True, MEDIA=1, HAS_MASK=True)
OFF = dict(CAUSAL=False, HAS_KLEN=False, QF_MODE=0, HAS_PREFIX=False, MEDIA=0, HAS_MASK=False)
MIXED = dict(CAUSAL=True, HAS_KLEN=False, QF_MODE=1, HAS_PREFIX=False, MEDIA=2, HAS_MASK=False)
VARIANTS = [
    (90, "bf16", ALL_ON, dict(KIND=0, HAS_BIAS=True, DISTILL=True, OWN=True, OTHER=False)),
    (90, "bf16", OFF, dict(KIND=1, HAS_BIAS=True, DISTILL=False, OWN=True, OTHER=False)),
    (80, "fp16", MIXED, dict(KIND=0, HAS_BIAS=False, DISTILL=False, OWN=True, OTHER=True)),
    (90, "fp32", OFF, dict(KIND=0, HAS_BIAS=False, DISTILL=False, OWN=False, OTHER=True)),
]


def _jobs():
    import importlib

    from triton.backends.compiler import GPUTarget

    # the modules (the package exports functions named like some of them)
    A, C, G = (importlib.import_module(f"vlkernels.{m}") for m in ("attention", "contrastive", "gated"))
    jobs = []
    for arch, dt, mask_flags, ctr in VARIANTS:
        target = GPUTarget("cuda", arch, 32)
        prec = "ieee" if dt == "fp32" else "tf32"
        flags = dict(
            mask_flags,
            PRECISION=prec,
            UPCAST=False,
            BLOCK_D=128 if mask_flags is ALL_ON else 64,
            BLOCK_M=64,
            BLOCK_N=64,
        )
        mask_ptrs = dict(MASK="u8", KLEN="i32", PREFIX="i32", T2M="i32")
        io = {n: dt for n in ("Q", "K", "V", "O", "DO", "DK", "DV")}
        stats = {"LSE": "fp32", "DELTA": "fp32"}
        jobs += [
            (A._attn_fwd, target, {**io, **mask_ptrs, "LSE": "fp32"}, {"qk_scale"}, flags),
            (A._attn_bwd_dkdv, target, {**io, **mask_ptrs, **stats}, {"qk_scale", "sm_scale"}, flags),
            (
                A._attn_bwd_dq,
                target,
                {**io, **mask_ptrs, **stats, "DQ": "fp32"},
                {"qk_scale", "sm_scale"},
                flags,
            ),
            (
                A._attn_bwd_delta,
                target,
                {"O": dt, "DO": dt, "DELTA": "fp32"},
                set(),
                dict(BLOCK_M=32, BLOCK_D=64),
            ),
        ]
        cblk = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, PRECISION=prec, UPCAST=False)
        cptrs = dict(R=dt, RM=dt, C=dt, NEG=dt, SCALE="fp32", BIAS="fp32")
        fwd_flags = {k: ctr[k] for k in ("KIND", "HAS_BIAS", "DISTILL")}
        jobs += [
            (C._ctr_fwd, target, {**cptrs, "OUT": "fp32"}, set(), {**cblk, **fwd_flags}),
            (
                C._ctr_bwd,
                target,
                {**cptrs, "LSE_ROW": "fp32", "LSEM_ROW": "fp32", "LSE_COL": "fp32", "DR": dt, "DSB": "fp32"},
                {"w_own", "w_other", "smooth", "alpha"},
                {**cblk, **ctr, "BLOCK_DO": 256},
            ),
            (G._gated_fwd, target, {"X": dt, "Y": dt, "G": "fp32", "OUT": dt}, set(), dict(BLOCK=1024)),
            (
                G._gated_bwd,
                target,
                {"DOUT": dt, "Y": dt, "G": "fp32", "DY": dt, "PARTIAL": "fp32"},
                set(),
                dict(BLOCK=1024),
            ),
        ]
    return jobs


def _run(i):
    fn, target, ptrs, floats, constexprs = _jobs()[i]
    t0 = time.perf_counter()
    name, k = _compile(fn, target, ptrs, floats, constexprs)
    assert k.asm.get("cubin"), name
    return f"{name} sm_{target.arch}: {time.perf_counter() - t0:.1f} s"


def main():
    from concurrent.futures import ProcessPoolExecutor

    n = len(_jobs())
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for line in pool.map(_run, range(n)):
            print(line, flush=True)
    print(f"compiled {n} kernels")


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "compiled 32 kernels" in out.stdout, out.stdout


if __name__ == "__main__":
    main()
