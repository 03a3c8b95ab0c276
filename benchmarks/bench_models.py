"""End-to-end training steps of the reference models with kernels on and off: time of one
forward + backward + optimizer step and its peak memory (GPU: "base" size, bf16 autocast;
CPU: "tiny" size, one untimed step per model as a smoke run)."""

from __future__ import annotations

import torch

from models import MODEL_NAMES, build_model


def _step_fn(model, batch, opt):
    def step():
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return step


def run(quick: bool, progress=print, rows=None) -> list[dict]:
    from benchmarks.common import environment, peak_mib, time_ms

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    size = "base" if gpu else "tiny"
    env = environment()
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    names = ("blip2", "flamingo", "coca") if quick else MODEL_NAMES
    for name in names:
        for kernels in (False, True):
            provider = "vlkernels" if kernels else "eager"
            progress(f"{name} ({size}) {provider}: training step")
            torch.manual_seed(0)
            model = build_model(name, size, kernels=kernels).to(device)
            batch = {k: v.to(device) for k, v in model.example_batch(8 if gpu else 2).items()}
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            step = _step_fn(model, batch, opt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                try:
                    p20, p50, p80 = time_ms(step, quick)
                    mem = peak_mib(step)
                except torch.OutOfMemoryError:
                    progress("    out of memory")
                    continue
            base = dict(
                op=f"train_step_{name}",
                provider=provider,
                mode="full",
                shape=f"{size} batch",
                dtype="bfloat16" if gpu else "float32",
                **env,
            )
            rows += [
                dict(base, metric="ms", p20=p20, p50=p50, p80=p80),
                dict(base, metric="peak_MiB", p20=mem, p50=mem, p80=mem),
            ]
            del model, opt
    return rows
