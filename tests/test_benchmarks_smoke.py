"""Smoke tests of benchmarks/: the baselines compute the update they claim, the GPT-2 shapes
count right, the memory probe sees what it should, report.py writes a table and a PNG, and
the GPU driver's CPU dry run works. Small sizes only: the suite itself is `make bench`."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import baselines, report, workloads  # noqa: E402
from benchmarks.gpt2 import GPT2, batch  # noqa: E402
from benchmarks.shapes import SIZES, GPT2Size, make_params, param_count, param_shapes  # noqa: E402
from zo_opt import ZOOptimizer, noise  # noqa: E402

TINY = GPT2Size("tiny", 32, 2, 2, 16, vocab=97)


# -- shapes -----------------------------------------------------------------------------------

def test_gpt2_parameter_counts():
    assert param_count("20M") == 17_735_936  # 17.6M without the 512 x 256 position table
    assert param_count("124M") == 124_439_808  # GPT-2 small, head tied to the embedding
    assert param_count("1.07B") == 1_065_758_400
    assert len(param_shapes("124M")) == 2 + 12 * 12 + 2


@pytest.mark.parametrize("size", ["20M", "124M"])
def test_shapes_match_transformers_gpt2(size):
    transformers = pytest.importorskip("transformers")
    c = SIZES[size]
    config = transformers.GPT2Config(vocab_size=c.vocab, n_positions=c.n_ctx, n_embd=c.n_embd,
                                     n_layer=c.n_layer, n_head=c.n_head)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == param_shapes(size)


def test_gpt2_forward_has_the_shapes_and_a_chance_level_loss():
    model = GPT2(TINY)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters_hf()] == param_shapes(TINY)
    x, y = batch(TINY, 2, 8)
    with torch.no_grad():
        assert model(x).shape == (2, 8, TINY.vocab)
        loss = model(x, y)
    assert abs(loss.item() - math.log(TINY.vocab)) < 0.5  # small init: near-uniform logits


# -- baselines --------------------------------------------------------------------------------

def zo_reference_draw(params, seed):
    """zo_opt's reference z (NOISE.md) per tensor, rounded to float32 as every backend has it:
    lets the loops use zo-opt's directions, so that their updates can be compared."""
    for p, o in zip(params, noise.offsets([p.numel() for p in params])):
        idx = torch.arange(p.numel(), dtype=torch.int64) + o
        yield noise.noise_at(idx, seed, "gaussian").to(torch.float32).to(p.dtype).view_as(p)


def quadratic(params, targets):
    return lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, targets))


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("loop", ["mezo-loop", "old-loop"])
def test_baseline_step_equals_zo_optimizer_with_the_same_directions(loop, q):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (13,), (3, 2, 4)]
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    base_seed, lr, eps = 77, 0.05, 1e-3
    ours = [t.clone() for t in theta]
    ZOOptimizer(ours, lr=lr, q=q, eps=eps, seed=base_seed, backend="torch").step(quadratic(ours, targets))
    theirs = [t.clone() for t in theta]
    cls = baselines.MezoLoop if loop == "mezo-loop" else baselines.OldLoop
    stepper = cls(theirs, lr, q=q, eps=eps, draw=zo_reference_draw)
    stepper.step(quadratic(theirs, targets), seeds=[noise.direction_seed(base_seed, 0, i) for i in range(q)])
    ours_step = torch.cat([(a - t).reshape(-1) for a, t in zip(ours, theta)])
    their_step = torch.cat([(b - t).reshape(-1) for b, t in zip(theirs, theta)])
    assert ours_step.norm() > 0.1
    # zo-opt sums its scaled directions in float32 (NOISE.md), the loops in float64
    assert (ours_step - their_step).norm() / ours_step.norm() < 1e-5


def test_mezo_pass_adds_eps_times_its_own_torch_normal_z():
    params = make_params(TINY, torch.float32)
    before = [p.clone() for p in params]
    baselines.mezo_perturb_(params, seed=5, scale=1e-2)
    zs = list(baselines.torch_normal(params, 5))
    for p, p0, z in zip(params, before, zs):
        assert p.shape == z.shape and p.dtype == z.dtype
        torch.testing.assert_close(p, p0 + 1e-2 * z)
    assert 0.9 < torch.cat([z.reshape(-1) for z in zs]).std().item() < 1.1
    baselines.mezo_perturb_(params, seed=5, scale=-1e-2)  # the restore of MeZO's step
    for p, p0 in zip(params, before):
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-6)


def test_mezo_step_moves_along_minus_lr_g_z():
    p = [torch.randn(50, dtype=torch.float64)]
    t = [torch.zeros(50, dtype=torch.float64)]
    p0 = p[0].clone()
    loop = baselines.MezoLoop(p, lr=0.1, q=1, eps=1e-4, draw=lambda ps, s: baselines.torch_normal(ps, s))
    seed = loop.seeds()[0]
    loop.step(quadratic(p, t))
    z = next(baselines.torch_normal(p, seed))
    g = (2 * p0 * z).sum()  # the directional derivative of |p|^2 along z
    torch.testing.assert_close(p[0], p0 - 0.1 * g * z, rtol=1e-6, atol=1e-8)


# -- workloads --------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["copy", "zo-opt[cpu]", "mezo-loop", "old-loop"])
def test_every_cpu_pass_runs_and_moves_the_parameters(impl):
    params = make_params(TINY, torch.float32)
    before = [p.clone() for p in params]
    workloads.make_pass(impl, params)()
    moved = any(not torch.equal(p, p0) for p, p0 in zip(params, before))
    assert moved == (impl != "copy")


def test_triton_is_not_benchmarked_on_the_cpu():
    assert "triton" not in workloads.zo_backends("cpu")
    assert workloads.backend_skip_reason("triton", "cpu")


def test_memory_probe_sees_temporaries_and_zo_step_allocates_nothing_parameter_sized():
    n = 1 << 20
    assert workloads.peak_extra_bytes(lambda: lambda: torch.ones(n).mul(2).sum(), "cpu") >= 8 * n

    def step(impl, holder):
        def make():
            params = holder["p"] = make_params(TINY, torch.float32)
            stepper = workloads.make_stepper(impl, params, 2)
            closure = workloads.probe_closure(params)
            stepper.step(closure)
            return lambda: stepper.step(closure)
        return make

    shares = {}
    for impl in ("zo-opt[cpu]", "old-loop"):
        holder = {}
        peak = workloads.peak_extra_bytes(step(impl, holder), "cpu")
        shares[impl] = peak / workloads.param_bytes(holder["p"])
    assert shares["zo-opt[cpu]"] < 0.05  # a few scalars over a tiny model
    assert shares["old-loop"] > 2.0  # clone + accumulator + temporaries


# -- report.py --------------------------------------------------------------------------------

def fake_benchmark_json() -> dict:
    def bench(group, median, **info):
        return {"group": group, "name": f"test[{info.get('impl')}]", "extra_info": info,
                "stats": {"median": median, "min": median, "rounds": 1}}

    pb = 2 * 70_943_744
    return {
        "machine_info": {"python_version": "3.11.7", "zo_opt": {
            "cpu_model": "AMD EPYC 7B13 64-Core Processor", "cores": 2, "torch": "2.13.0+cpu",
            "torch_threads": 2, "cuda_device": None, "backends": ["cpu"], "zo_opt": "0.1.0",
            "skipped_backends": {"cuda": "torch has no CUDA"}}},
        "datetime": "2026-11-27T21:00:00.000000+00:00",
        "benchmarks": [
            bench("pass 20M float32", 0.030, impl="copy", distribution="gaussian", size="20M", dtype="float32", bytes=pb),
            bench("pass 20M float32", 0.050, impl="zo-opt[cpu]", distribution="gaussian", size="20M", dtype="float32", bytes=pb),
            bench("pass 20M float32", 0.010, impl="zo-opt[cpu]", distribution="rademacher", size="20M", dtype="float32", bytes=pb),
            bench("pass 20M float32", 0.400, impl="mezo-loop", distribution="gaussian", size="20M", dtype="float32", bytes=pb),
            bench("step q=4 (GPT-2 20M)", 8.4, impl="zo-opt[cpu]", q=4, forward_s_per_step=8.0,
                  outside_s_per_step=0.4, outside_share=0.4 / 8.4),
            bench("step q=4 (GPT-2 20M)", 12.0, impl="mezo-loop", q=4, forward_s_per_step=8.0,
                  outside_s_per_step=4.0, outside_share=4 / 12),
            bench("peak memory", 1.0, impl="zo-opt[cpu]", peak_extra_bytes=141, peak_extra_share=2e-6),
            bench("peak memory", 1.0, impl="old-loop", peak_extra_bytes=2.4e8, peak_extra_share=3.4),
        ],
    }


def test_report_writes_a_named_table_and_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(fake_benchmark_json()))
    md, png = report.main([str(src), "--out-dir", str(tmp_path / "results")])
    assert md.name == "cpu-2core-epyc-7b13-2026-11-27.md" and png.suffix == ".png"
    text = md.read_text()
    assert "AMD EPYC 7B13" in text and "torch 2.13.0+cpu" in text
    assert "| 20M | float32 | zo-opt[cpu] | 50.0 | 2.84 | 60% | 8.0x |" in text
    assert "**8.0x** (target >= 4x: met)" in text
    assert "**4.8%** of the step outside the forwards (target < 10%: met)" in text
    assert "old loop: **340%**" in text
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_keeps_an_earlier_table_of_the_same_day(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(fake_benchmark_json()))
    first, _ = report.main([str(src), "--out-dir", str(tmp_path / "results")])
    first.write_text("the first run's table")
    second, png = report.main([str(src), "--out-dir", str(tmp_path / "results")])
    assert second.name == "cpu-2core-epyc-7b13-2026-11-27-run2.md" and png.stem == second.stem
    assert first.read_text() == "the first run's table"
    third, _ = report.main([str(src), "--out-dir", str(tmp_path / "results")])
    assert third.name.endswith("-run3.md")


def test_report_rejects_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="pytest-benchmark"):
        report.load(bad)


# -- the GPU driver ---------------------------------------------------------------------------

def test_gpu_driver_sweep_under_the_interpreter(monkeypatch):
    """The rows of --sweep-s: the plain pass at each tiling and the exact cycle at each
    of its configurations, per dtype and distribution, timed against the copy; each plain pass
    launched at its tiling while it is timed (a first version restored the default before
    timing, so every row timed it), and TILINGS and the exact kernel's CONFIG left as they
    were (the interpreter stands in for the GPU: two of each, one dtype, a 20K-parameter
    model, to keep it short)."""
    from benchmarks.gpu import driver

    pytest.importorskip("triton")
    from zo_kernels import noise_axpby

    if not noise_axpby.INTERPRETED:
        pytest.skip("a GPU is here: the driver's real run sweeps on it")
    from zo_kernels import exact

    launched, launch = set(), noise_axpby._launch

    def recorded(*args):
        launched.add(args[-1])  # the tiling
        return launch(*args)

    monkeypatch.setattr(noise_axpby, "_launch", recorded)
    tilings = {"rademacher": ((1024, 4), (2048, 8, 2, 64, True)),
               "gaussian": ((1024, 4), (1024, 4, 1, None, False, 1))}
    configs = ((1024, 4, 1, False), (2048, 4, 1, True))
    before = (dict(noise_axpby.TILINGS), exact.CONFIG)
    micro = GPT2Size("micro", 32, 1, 1, 32, vocab=128)
    rows = driver.sweep_rows(micro, "cpu", 1, driver.Budget(600), tilings, configs, ("bfloat16",))
    assert len(rows) == 2 * 2 + 2 * len(configs)  # distributions x (plain, exact)
    assert all(r["seconds"] > 0 and r["pct_copy"] > 0 for r in rows)
    assert [r["distribution"] for r in rows] == ["rademacher"] * 4 + ["gaussian"] * 4
    assert {r["impl"] for r in rows} == {
        "zo-opt[triton] BLOCK=1024 warps=4",
        "zo-opt[triton] BLOCK=2048 warps=8 halves=2 maxnreg=64 lazy masks",
        "zo-opt[triton] BLOCK=1024 warps=4 persistent=1",
        "zo-opt[triton] BLOCK=2048 warps=4 lazy masks"}
    assert {noise_axpby.Tiling(*t) for ts in tilings.values() for t in ts} <= launched
    assert (noise_axpby.TILINGS, exact.CONFIG) == before


def test_gpu_driver_sweep_names_a_variant_that_leaves_wrong_bits(capsys):
    """A swept variant whose run leaves other bits than the kind's reference is timed but
    named WRONG BITS and is never the best: what keeps a broken kernel out of TILINGS. Here,
    on the cpu backend, the wrong one's setting doubles eps (the reference must be made
    outside a variant's setting, or the check passes whatever the variant does) and another
    makes its pass twice."""
    from contextlib import nullcontext
    from unittest import mock

    from benchmarks.gpu import driver

    def variants(params, dist):
        right = lambda ps: workloads.make_pass("zo-opt[cpu]", ps, dist)

        def twice(ps):
            run = right(ps)
            return lambda: (run(), run())
        listed = [("right", 1, nullcontext(), right),
                  ("eps x2", 1, mock.patch.object(workloads, "EPS", 2 * workloads.EPS), right),
                  ("twice", 1, nullcontext(), twice)]
        return (("plain pass", lambda ps: right(ps)(), listed),)

    rows = driver._variant_rows("sweep", TINY, "cpu", 1, driver.Budget(600), ("float32",),
                                variants)
    assert [r["impl"] for r in rows] == ["zo-opt[triton] right",
                                         "zo-opt[triton] eps x2 WRONG BITS",
                                         "zo-opt[triton] twice WRONG BITS"] * 2
    assert all(r["seconds"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert out.count("WRONG BITS: plain pass float32") == 4
    assert out.count("best zo-opt[triton] right ") == 2


def test_gpu_driver_dry_run_on_the_cpu(tmp_path):
    from benchmarks.gpu import driver

    md = driver.main(["--device", "cpu", "--dry-run", "--sweep-s", "5", "--out", str(tmp_path)])
    assert md.name.startswith("gpu-cpu-drivernone-torch") and md.name.endswith("-dry-run.md")
    text, _, profiled = md.read_text().partition("Eager steps under torch.profiler")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    impls = {line.split(" | ")[3] for line in table[1:]}
    assert {"copy", "zo-opt[cpu]", "mezo-loop", "old-loop"} <= impls
    assert any(i.startswith("zo-opt[cpu] table: ") for i in impls)  # the side table's row
    # q=1,2 x (zo-opt[cpu], its steps back to back, two loops), then the bf16 step: round to
    # nearest vs exact + SR
    assert sum("step q=" in line for line in table) == 2 * 4 + 2
    assert "zo-opt[cpu] back to back" in impls
    assert {"zo-opt[cpu] round to nearest", "zo-opt[cpu] exact + SR"} <= impls
    assert sum("before the 1st forward" in line for line in table) == 2 * 3  # eager f32 steps
    assert any(line.startswith("| 3 passes out and back") and "exact" in line for line in table)
    assert "rademacher" in text and "bfloat16" in text
    rows = json.loads(md.with_suffix(".json").read_text())["rows"]
    assert all("seconds" in r or "skipped" in r for r in rows)
    # one profiled step per eager zo-opt row (q=1, 2): busy within its span, a gap named
    timelines = [r["timeline"] for r in rows if r.get("timeline")]
    assert len(timelines) == 2 and profiled.count("| step q=") == 2
    assert all(0 < t["busy_s"] <= t["span_s"] and t["gaps"] for t in timelines)


@pytest.mark.parametrize("exact", [False, True])
def test_pass_cycle_goes_out_and_back(exact):
    """The exact-overhead benchmark's three passes return to theta: bit for bit when exact."""
    ps = make_params(TINY, torch.bfloat16)
    before = [p.clone() for p in ps]
    workloads.make_pass_cycle("torch", ps, "gaussian", exact=exact)()
    same = all(torch.equal(p.view(torch.int16), b.view(torch.int16)) for p, b in zip(ps, before))
    moved = max(float((p.float() - b.float()).abs().max()) for p, b in zip(ps, before))
    assert same if exact else moved < 1e-2


def test_timeline_merges_overlaps_and_names_the_gaps():
    from benchmarks.timeline import summarize

    # (start, end, name) in microseconds; the step began at 100
    t = summarize([(150, 200, "a"), (180, 260, "b"), (300, 310, "c"), (900, 1000, "d")], 100, top=2)
    assert t.lead_s == pytest.approx(50e-6) and t.span_s == pytest.approx(900e-6)
    assert t.busy_s == pytest.approx((260 - 150 + 10 + 100) * 1e-6)
    assert [(round(g * 1e6), name) for g, name in t.gaps] == [(590, "d"), (40, "c")]
    assert summarize([], 0.0).busy_s == 0.0


def test_timeline_counts_kernels_not_annotations():
    """The profiler puts a record_function's span on the GPU timeline too: it is not work."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.timeline import _device_work

    def event(name, device, **kw):
        return SimpleNamespace(name=name, device_type=device, **kw)

    assert _device_work(event("noise_axpby_kernel", DeviceType.CUDA, activity_type="kernel"))
    assert _device_work(event("Memcpy HtoD", DeviceType.CUDA))  # an older torch: no such fields
    assert not _device_work(event("aten::add", DeviceType.CPU))
    assert not _device_work(event("Optimizer.step#ZOOptimizer.step", DeviceType.CUDA,
                                  activity_type="gpu_user_annotation"))
    assert not _device_work(event("zo_bench::measured", DeviceType.CUDA, is_user_annotation=True))
