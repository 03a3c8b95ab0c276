"""Launch helpers shared by the Triton op families."""

from __future__ import annotations

import collections
import os

import torch
import triton

from vlkernels._dispatch import interpreter_on

# Kernel launches by name; tests read it to prove that a kernel (not an eager fallback) ran.
LAUNCHES: collections.Counter = collections.Counter()


def autotuned(configs: list[triton.Config], key: list[str], interpret_config: triton.Config):
    """``triton.autotune`` over ``configs`` on a GPU; the single ``interpret_config`` under the
    interpreter, which has no device to benchmark on. VLK_AUTOTUNE=0 keeps only ``configs[0]``
    (test runs on a GPU: many shapes, each would be tuned)."""
    if interpreter_on():
        configs = [interpret_config]
    elif os.environ.get("VLK_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key)


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def poisoned(out: torch.Tensor) -> torch.Tensor:
    """A freshly allocated kernel output, filled with NaN when VLK_POISON=1 (the tests set it) so
    that an element a kernel forgets to write shows up."""
    if os.environ.get("VLK_POISON", "0") == "1":
        out.fill_(float("nan"))
    return out
