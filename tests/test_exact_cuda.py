"""The CUDA exact pass (csrc/cuda/exact.cu, zo_opt::noise_axpby_exact_table_) against its
torch reference (zo_opt.exact.exact_pass_): Rademacher bit for bit (params and codes),
Gaussian close; central schedules back to the start bit for bit; stochastic rounding equal to
the reference; a CUDA-graph capture equal to eager.

Without a GPU: the kernel compiles with plain nvcc (test_cuda_backend.py covers every .cu for
sm_90/sm_80 with no spills), the binding parses, the schema is there, the runner's checks.
"""
import shutil
from pathlib import Path

import pytest
import torch

from zo_opt import backends, exact, noise
from zo_opt.backends.cpu import as_int64

import exact_pair
from exact_pair import EPS, bits, central_schedule, many_seeds_schedule, same_bits

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCHEMA = ("zo_opt::noise_axpby_exact_table_(Tensor table, int n_tensors, int n_tiles, Tensor seeds, "
          "Tensor scales, int n_old, Tensor(a!) codes, int code_base, Tensor chunk_base, "
          "Tensor table_bits, float tau, bool encode, bool rounding, str distribution) -> ()")


# --- CPU ---------------------------------------------------------------------------------------

def test_schema_present():
    from zo_opt import _extension

    if _extension.load() is not None:
        pytest.skip(f"extension not loadable here: {_extension.load()}")
    assert str(torch.ops.zo_opt.noise_axpby_exact_table_.default._schema) == SCHEMA


def test_kernel_is_in_the_compile_checks():
    assert (ROOT / "csrc" / "cuda" / "exact.cu") in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.slow
def test_exact_binding_parses_against_torch_headers():
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    cuda_include = Path(CUDA_HOME or "/usr/local/cuda") / "include"
    if not (cuda_include / "cuda_runtime.h").is_file():
        pytest.skip(f"CUDA headers not found ({cuda_include})")
    if not (Path(include_paths()[0]) / "c10" / "cuda" / "CUDAGuard.h").is_file():
        pytest.skip("this torch ships no c10/cuda headers")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    import subprocess

    run = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-DC10_USING_CUSTOM_GENERATED_MACROS",
                          *[f"-I{p}" for p in include_paths()], f"-I{cuda_include}",
                          str(ROOT / "csrc" / "cuda" / "exact_binding.cpp")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_runner_checks_without_a_gpu(monkeypatch):
    """Argument checks before any launch, and one launch with the table's counts."""
    from zo_opt.backends import cuda as cuda_mod

    launched = []

    class Ops:
        class zo_opt:  # noqa: N801
            @staticmethod
            def cuda_table(params, offsets):
                return torch.zeros(8, dtype=torch.uint8), 3

            class noise_axpby_exact_table_:  # noqa: N801
                default = staticmethod(lambda *args: launched.append(args))

            noise_axpby_table_ = noise_axpby_exact_table_

    monkeypatch.setattr(cuda_mod.torch, "ops", Ops)
    params = [torch.zeros(130), torch.zeros(5)]
    with pytest.raises(ValueError, match="offset 64 is not a multiple of 128"):
        cuda_mod.BACKEND.prepare_exact(params, [0, 64])
    run = cuda_mod.BACKEND.prepare_exact(params, [256, 512])
    table = exact.Table(chunk_base=torch.zeros(5, dtype=torch.int32), bits=torch.zeros(1, dtype=torch.int32),
                        tau=0.5, count=0)
    codes = torch.zeros(512, dtype=torch.int8)
    seeds, scales = torch.zeros(2, dtype=torch.int64), torch.zeros(3)
    # each check named by its message: a bare ValueError let another check stand in for a
    # missing one (code_base 3 also fails the codes' coverage)
    with pytest.raises(ValueError, match="encode needs round-to-nearest"):  # encode with rounding
        run(seeds, scales[:2], 0, codes, 256, table, True, True, "rademacher")
    with pytest.raises(ValueError, match="code_base 3 is not a multiple of 128"):
        run(seeds, scales, 1, codes, 3, table, True, False, "rademacher")
    with pytest.raises(ValueError, match="2 seeds and 3 scales do not fit n_old=1, rounding=True"):
        run(seeds, scales, 1, codes, 256, table, False, True, "rademacher")
    with pytest.raises(ValueError, match=r"codes cover global indices \[256, 356\); the params' "
                       r"are \[256, 640\)"):
        run(seeds, scales, 1, codes[:100], 256, table, True, False, "rademacher")
    with pytest.raises(ValueError, match=r"codes cover global indices \[384, 896\); the params' "
                       r"are \[256, 640\)"):
        run(seeds, scales, 1, codes, 384, table, True, False, "rademacher")
    with pytest.raises(ValueError, match="Invalid distribution: 'uniform'"):
        run(seeds, scales, 1, codes, 256, table, True, False, "uniform")
    assert not launched
    run(seeds, scales, 1, codes, 256, table, True, False, "rademacher")
    assert len(launched) == 1 and launched[0][1:3] == (2, 3) and launched[0][5:8] == (1, codes, 256)
    # a plain update with stochastic rounding touches no codes: a dummy buffer is fine
    run(seeds[:2], scales[:2], 0, codes[:1], 0, table, False, True, "gaussian")
    assert len(launched) == 2


# --- GPU ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda():
    """Skips only where the backend cannot be built (as test_cuda_backend.py's fixture): on a
    GPU with torch's CUDA and nvcc an unavailable backend is a failure, not a quiet skip."""
    backend = backends.BACKENDS["cuda"]
    reason = backend.unavailable_reason()
    if reason is not None:
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = shutil.which("nvcc") or (CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file())
        if torch.version.cuda is None or not nvcc or not torch.cuda.is_available():
            pytest.skip(f"cuda backend unavailable: {reason}")
        pytest.fail(f"a GPU and nvcc are here, but the cuda backend is unavailable: {reason}")
    return backend


def make_params(sizes, dtypes, **kw):
    return exact_pair.make_params(sizes, dtypes, "cuda", **kw)


def Pair(cuda, params, offsets, distribution):  # noqa: N802  (builds an exact_pair.Pair)
    return exact_pair.Pair(cuda.prepare_exact(params, offsets), params, offsets, distribution)


# sizes around vectors, chunks, 16-bit and float32 tiles (8192 / 4096 elements)
SIZES = (1, 3, 129, 4096 + 300, 8192 + 7, 20_000)


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_schedule_matches_reference_and_restores(cuda, dtype, distribution):
    params = make_params(SIZES, [dtype] * len(SIZES))
    start = [p.clone() for p in params]
    pair = Pair(cuda, params, noise.offsets(SIZES), distribution)
    central_schedule(pair, [5, 2**64 - 1])
    for p, s in zip(params, start):
        assert same_bits(p, s)  # NaN as NaN: GPU arithmetic returns the canonical NaN
    assert (pair.kc == exact.ESC).sum() >= 15


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_mixed_dtypes_large_offsets_and_update(cuda, distribution):
    """Three dtypes in one launch, counters past 2^32 (offsets from 2^41), two directions and an
    update with weight decay; a view of codes off 8-byte alignment (byte accesses)."""
    sizes = (130, 7, 300, 513, 9000, 4100)
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float32)
    params = make_params(sizes, dtypes, seed=1)
    offsets = [2**41 + 256 + o for o in noise.offsets(sizes)]
    pair = Pair(cuda, params, offsets, distribution)
    pair.kc = torch.zeros(pair.kc.numel() + 1, dtype=torch.int8, device="cuda")[1:]
    central_schedule(pair, [11, 2**33 + 1], lr_g=[-1e-3, 2.5e-4], alpha=1 - 1e-4)


@pytest.mark.gpu
def test_many_old_and_new_seeds(cuda):
    sizes = (200, 1000, 9000)
    params = make_params(sizes, [torch.bfloat16, torch.float16, torch.float32], seed=3)
    start = [p.clone() for p in params]
    pair = Pair(cuda, params, noise.offsets(sizes), "rademacher")
    many_seeds_schedule(pair)
    for p, s in zip(params, start):
        assert same_bits(p, s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_matches_reference(cuda, dtype):
    sizes = (8192 + 5, 77)
    params = make_params(sizes, [dtype] * 2, seed=4)
    start = [p.clone() for p in params]
    pair = Pair(cuda, params, noise.offsets(sizes), "rademacher")
    ulp = float(torch.finfo(dtype).eps)
    central_schedule(pair, [9], lr_g=[0.3 * ulp * 0.02], rounding_seed=noise.direction_seed(7, 3, 2**64 - 1))
    if dtype != torch.float32:
        assert (bits(params[0]) != bits(start[0])).float().mean() > 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_stochastic_rounding_without_old_seeds(cuda, dtype):
    """n_old = 0 with a rounding seed (zo_update_'s path: a one-byte dummy codes buffer)."""
    gen = torch.Generator().manual_seed(5)
    fin = torch.finfo(dtype)
    x = torch.cat([torch.randn(600, generator=gen), torch.tensor(
        [0.0, -0.0, fin.tiny, -fin.tiny, fin.max, -fin.max, float("inf"), float("nan")])])
    params = [x.to(dtype).cuda()]
    want = [params[0].clone()]
    run = cuda.prepare_exact(params, [128])
    table = exact.build_table(params, [128], exact.tau(EPS, "rademacher"))
    seeds = torch.tensor([3, as_int64(2**63 + 17)], dtype=torch.int64, device="cuda")
    scales = torch.tensor([0.999, fin.eps / 3], device="cuda")
    run(seeds, scales, 0, torch.zeros(1, dtype=torch.int8, device="cuda"), 0, table, False, True, "rademacher")
    exact.exact_pass_(want, [128], [3], scales, 0, torch.zeros(1, dtype=torch.int8, device="cuda"), 0, table,
                      encode=False, rounding_seed=2**63 + 17, distribution="rademacher")
    assert same_bits(params[0], want[0])


@pytest.mark.gpu
def test_graph_capture_matches_eager(cuda):
    """The +-/-+ passes captured once in a CUDA graph and replayed: the same bits and codes as
    eager passes, and the schedule still restores theta."""
    sizes = (1, 129, 3 * 768 * 768 + 5, 1 << 18)
    dtypes = (torch.bfloat16, torch.float16, torch.bfloat16, torch.float32)
    params = make_params(sizes, dtypes, seed=8)
    eager = [p.clone() for p in params]
    start = [p.clone() for p in params]
    offsets = noise.offsets(sizes)
    base, n = exact.span(params, offsets)
    table = exact.build_table(params, offsets, exact.tau(EPS, "rademacher"))
    run, run_e = cuda.prepare_exact(params, offsets), cuda.prepare_exact(eager, offsets)
    codes, codes_e = (torch.zeros(n, dtype=torch.int8, device="cuda") for _ in range(2))
    seeds = torch.tensor([1, 1], dtype=torch.int64, device="cuda")
    scales = torch.tensor([1.0, EPS], device="cuda")
    for r, c in ((run, codes), (run_e, codes_e)):
        r(seeds[:1], scales, 0, c, base, table, True, False, "rademacher")
    s2 = torch.tensor([1.0, EPS, -EPS], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up launch off the capture (occupancy query)
        run_e(seeds, s2, 1, codes_e, base, table, True, False, "rademacher")
        run_e(seeds, s2 * torch.tensor([1.0, -1.0, -1.0], device="cuda"), 1, codes_e, base, table, True,
              False, "rademacher")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(seeds, s2, 1, codes, base, table, True, False, "rademacher")
    for step in range(2):
        s2.copy_(torch.tensor([1.0, EPS, -EPS], device="cuda"))
        graph.replay()
        s2.copy_(torch.tensor([1.0, -EPS, EPS], device="cuda"))
        graph.replay()
    for _ in range(1):  # eager: the warm-up did one +-/-+ round already
        run_e(seeds, torch.tensor([1.0, EPS, -EPS], device="cuda"), 1, codes_e, base, table, True, False,
              "rademacher")
        run_e(seeds, torch.tensor([1.0, -EPS, EPS], device="cuda"), 1, codes_e, base, table, True, False,
              "rademacher")
    torch.cuda.synchronize()
    for a, b in zip(params, eager):
        assert same_bits(a, b)
    assert torch.equal(codes, codes_e)
    for r, c, ps in ((run, codes, params), (run_e, codes_e, eager)):
        r(seeds[:1], torch.tensor([1.0, EPS], device="cuda"), 1, c, base, table, False, False, "rademacher")
        for p, s in zip(ps, start):
            assert same_bits(p, s)


@pytest.mark.gpu
def test_exact_run_does_not_sync(cuda):
    sizes = (4097, 768 * 3072)
    params = make_params(sizes, [torch.bfloat16, torch.float32], seed=9)
    offsets = noise.offsets(sizes)
    base, n = exact.span(params, offsets)
    table = exact.build_table(params, offsets, exact.tau(EPS, "gaussian"))
    run = cuda.prepare_exact(params, offsets)
    codes = torch.zeros(n, dtype=torch.int8, device="cuda")
    seeds = torch.tensor([5, 5], dtype=torch.int64, device="cuda")
    one, two = torch.tensor([1.0, EPS], device="cuda"), torch.tensor([1.0, EPS, -EPS], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(seeds[:1], one, 0, codes, base, table, True, False, "gaussian")
        run(seeds, two, 1, codes, base, table, True, False, "gaussian")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
