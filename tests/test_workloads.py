"""benchmarks/workloads.py is the one declaration of the paper workloads: the budget, the attention
benchmark, the demo and README's budget table read or list exactly what it declares."""

import re
from pathlib import Path

import torch

from benchmarks import bench_attention, bench_budget, static
from benchmarks import workloads as W
from vlkernels import demo

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_budget_builds_each_declared_workload_at_its_shapes():
    costed = bench_budget.workloads()
    assert [w.decl for w in costed] == list(W.WORKLOADS.values())
    with static.fake_cuda():
        for w in costed:
            inp, d = w.make(torch.device("cuda")), w.decl
            if d.op == "attention":
                assert tuple(inp["q"].shape) == (d.Bq, d.H, d.Lq, d.D), d.name
                assert tuple(inp["k"].shape) == tuple(inp["v"].shape) == (d.B, d.Hk, d.Lk, d.D), d.name
                assert inp["q"].dtype == d.dtype and ("position" in inp) == (d.position is not None)
            elif d.op == "contrastive":
                assert tuple(inp["x"].shape) == ((d.N, d.Q, d.D) if d.Q > 1 else (d.N, d.D)), d.name
                assert tuple(inp["y"].shape) == (d.N, d.D) and inp["kind"] == d.kind
            else:
                assert tuple(inp["x"].shape) == d.shape
    assert set(W.DENSE_OF) | set(W.DENSE_OF.values()) <= set(W.WORKLOADS)


def test_the_attention_benchmark_runs_the_declared_workloads():
    gpu = torch.device("cuda")  # the sizes a GPU run takes (cases() builds no tensor)
    assert bench_attention.cases(False, gpu) == [W.WORKLOADS[n] for n in bench_attention.BENCHMARKED]
    for quick, w in zip(bench_attention.cases(True, gpu), bench_attention.cases(False, gpu), strict=True):
        assert quick == (w.at(B=w.quick_batch) if w.quick_batch else w)
    # on CPU (the interpreter's small cases, or the CPU sizes): declared workloads at other sizes
    assert all(w.name in W.WORKLOADS for w in bench_attention.cases(True, torch.device("cpu")))


def test_the_demo_runs_the_declared_workloads_on_a_gpu(monkeypatch):
    monkeypatch.setattr(demo, "GPU", True)
    cases = demo._cases(torch.float32, torch.device("meta"))
    for (name, _, _, inputs), task in zip(cases[:3], ("itm", "itg", "itc"), strict=True):
        w = W.WORKLOADS[f"qformer_self_{task}"]
        assert [tuple(t.shape) for t in inputs] == [(w.B, w.H, w.Lq, w.D)] * 3, name
    w = W.WORKLOADS["flamingo_immediate"]
    x, media = cases[3][3][:2]
    assert tuple(x.shape) == (w.B, w.Lq, w.H * w.D)
    assert tuple(media.shape) == (w.B, W.FLAMINGO_IMAGES, W.FLAMINGO_LATENTS, w.H * w.D)
    assert W.FLAMINGO_IMAGES * W.FLAMINGO_LATENTS == w.Lk
    w = W.WORKLOADS["coca_pooler_hd96"]
    img, query = cases[4][3][:2]
    assert tuple(img.shape)[:2] == (w.B, w.Lk) and tuple(query.shape) == (w.Lq, w.H * w.D)


def test_readme_budget_table_lists_the_declared_workloads():
    text = README.read_text()
    table = text[text.index("| workload | launches fwd+bwd |") :].split("\n\n")[0].splitlines()[2:]
    labels = [re.match(r"\| (.*?) \|", row).group(1) for row in table]
    assert sorted(labels) == sorted(w.label for w in W.WORKLOADS.values())
