"""The CUDA backend (csrc/cuda/).

Without a GPU: the torch-free kernel files compile with plain nvcc, the binding parses
against torch's headers, the host-side tensor table packs and looks up tiles correctly, and
the backend says why it is unavailable. With a GPU (-m gpu): the kernels against the noise
reference and the torch backend at full size, every dtype, seed and large offsets, and
against the Triton backend on the same inputs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo_opt
from zo_opt import backends, noise
from zo_opt.backends.cpu import as_int64

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_FILES = sorted(CUDA_DIR.glob("*.cu"))


def nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        found = str(Path(CUDA_HOME) / "bin" / "nvcc")
    return found


def compile_or_fail(cmd: list[str]) -> str:
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, " ".join(cmd) + "\n" + run.stdout + run.stderr
    return run.stdout + run.stderr


# --- CI, no GPU ------------------------------------------------------------------------------

def test_there_are_kernel_files():
    assert KERNEL_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_kernel_file_compiles_with_plain_nvcc(source, arch, tmp_path):
    """No torch include path: the kernel bodies must stay torch-free. They must also fit their
    register caps: a spill would add local-memory traffic to a bandwidth-bound pass (and a
    spilled load result stalls the thread until the load lands, before the noise work)."""
    if nvcc() is None:
        pytest.skip("nvcc not found (not on PATH, no CUDA_HOME)")
    log = compile_or_fail([nvcc(), f"-arch={arch}", "-std=c++17", "-O3", "-Xptxas", "-v", "-c",
                           str(source), "-o", str(tmp_path / "kernel.o")])
    spills = [line for line in log.splitlines()
              if "spill" in line and " 0 bytes spill stores, 0 bytes spill loads" not in line]
    assert not spills, log
    stacks = [line for line in log.splitlines()
              if "stack frame" in line and not line.strip().startswith("0 bytes stack frame")]
    assert not stacks, log


def test_no_fast_math_anywhere():
    """NOISE.md forbids fast-math approximations: no flag, no intrinsic. The CPU kernels too:
    no -ffast-math / -Ofast flag, and no fast-math optimize pragma or attribute in csrc/."""
    banned_flags = ("use_fast_math", "ftz=true", "prec-div=false", "prec-sqrt=false",
                    "-ffast-math", "-Ofast", "-funsafe-math-optimizations")
    for path in (ROOT / "setup.py", ROOT / "python" / "zo_opt" / "_extension.py"):
        text = path.read_text()
        assert not any(flag in text for flag in banned_flags), path
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")]
    assert any(p.parent.name == "cpu" for p in sources), "no CPU sources found under csrc/"
    banned_pragmas = ('"fast-math"', '"Ofast"', '"unsafe-math-optimizations"', "-ffast-math")
    for path in sources:
        text = path.read_text()
        assert not any(word in text for word in banned_pragmas), path
    banned_calls = ("__logf(", "__sinf(", "__cosf(", "__sincosf(", "__expf(", "__fdividef(")
    for path in [ROOT / "csrc" / "zo_noise.h", *CUDA_DIR.iterdir()]:
        text = path.read_text()
        assert not any(call in text for call in banned_calls), path


@pytest.mark.slow
def test_binding_parses_against_torch_headers():
    """The binding is compiled only where torch has CUDA; parse it here so CI catches API slips."""
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    cuda_include = Path(CUDA_HOME or "/usr/local/cuda") / "include"
    torch_include = Path(include_paths()[0])
    if not (cuda_include / "cuda_runtime.h").is_file():
        pytest.skip(f"CUDA headers not found ({cuda_include})")
    if not (torch_include / "c10" / "cuda" / "CUDAGuard.h").is_file():
        pytest.skip("this torch ships no c10/cuda headers")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    # a CPU torch lacks the header cmake generates for c10/cuda; it only sets export macros
    compile_or_fail([compiler, "-std=c++17", "-fsyntax-only", "-DC10_USING_CUSTOM_GENERATED_MACROS",
                     *[f"-I{p}" for p in include_paths()], f"-I{cuda_include}",
                     str(CUDA_DIR / "noise_axpby_binding.cpp")])


TABLE_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cuda/tensor_table.h"
using namespace zo::cuda;
// argv: q, then numels (tensor i has dtype i % 3). Packs a table with q of 3 fixed seeds;
// prints layout, round trip, tile owners, and which strides' forward walks disagree.
int main(int argc, char** argv) {
  const int64_t q = std::atoll(argv[1]);
  std::vector<TensorEntry> t;
  for (int i = 2; i < argc; ++i)
    t.push_back({nullptr, std::atoll(argv[i]), 128LL * (i - 2), (i - 2) % 3, (i - 2) % 2});
  const uint64_t seeds[3] = {0, 1, ~0ULL};
  const int64_t n = static_cast<int64_t>(t.size());
  const TableLayout l = table_layout(n, q);
  std::vector<uint64_t> buf(l.bytes / 8);
  const int64_t tiles = pack_table(t.data(), n, seeds, q, buf.data());
  const char* base = reinterpret_cast<const char*>(buf.data());
  const TensorEntry* e = reinterpret_cast<const TensorEntry*>(base);
  const int64_t* tb = reinterpret_cast<const int64_t*>(base + l.tile_begin);
  const uint64_t* s = reinterpret_cast<const uint64_t*>(base + l.seeds);
  std::printf("bytes %zu tiles %lld\n", l.bytes, (long long)tiles);
  for (int64_t k = 0; k < n; ++k)
    std::printf("entry %lld %lld %d %d\n", (long long)e[k].numel, (long long)e[k].offset, e[k].dtype, e[k].aligned);
  for (int i = 0; i < q; ++i) std::printf("seed %llu\n", (unsigned long long)s[i]);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t k = tensor_of_tile(tb, n, tile);
    std::printf("tile %lld %lld\n", (long long)k, (long long)((tile - tb[k]) * tile_elements(e[k].dtype)));
  }
  // the kernel's walk: each block searches once, then advances over its grid-stride tiles
  for (int64_t stride = 1; stride <= tiles + 1; ++stride)
    for (int64_t first = 0; first < stride && first < tiles; ++first) {
      int64_t k = tensor_of_tile(tb, n, first);
      for (int64_t tile = first; tile < tiles; tile += stride) {
        k = advance_tensor(tb, n, k, tile);
        if (k != tensor_of_tile(tb, n, tile)) std::printf("walk %lld %lld\n", (long long)stride, (long long)tile);
      }
    }
}
"""


@pytest.mark.parametrize("q", [3, 0], ids=["list-op", "prepared"])
def test_tensor_table_packs_and_finds_every_tile(tmp_path, q):
    """Tiles are 16 KB: 4096 float32 (dtype 0) or 8192 16-bit elements; a prepared table
    (q = 0) has no seeds part; the forward walk finds the owner the binary search finds."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / "table.cpp").write_text(TABLE_PROGRAM)
    exe = tmp_path / "table"
    compile_or_fail([compiler, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(tmp_path / "table.cpp"),
                     "-o", str(exe)])
    numels = [0, 0, 3, 4096, 4097, 0, 1, 3 * 4096 + 5, 0, 128, 0, 8192, 8193, 16385, 2 * 8192]
    lines = subprocess.run([str(exe), str(q), *map(str, numels)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    n = len(numels)

    def tile(k):
        return 4096 if k % 3 == 0 else 8192

    want_tiles = [(k, i * tile(k)) for k, m in enumerate(numels) for i in range(-(-m // tile(k)))]
    assert lines[0] == f"bytes {32 * n + 8 * (n + 1) + 8 * q} tiles {len(want_tiles)}"
    assert lines[1:1 + n] == [f"entry {m} {128 * k} {k % 3} {k % 2}" for k, m in enumerate(numels)]
    assert lines[1 + n:1 + n + q] == ["seed 0", "seed 1", f"seed {2**64 - 1}"][:q]
    assert lines[1 + n + q:] == [f"tile {k} {start}" for k, start in want_tiles]


def test_unavailable_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible; the gpu tests below cover the available case")
    cuda = backends.BACKENDS["cuda"]
    reason = cuda.unavailable_reason()
    assert reason and "\n" not in reason
    if torch.version.cuda is None:
        assert "torch.version.cuda is None" in reason
    assert "cuda" not in zo_opt.available_backends()
    assert backends.unavailable_backends()["cuda"] == reason
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        backends.check_name("cuda")
    assert not cuda.supports(torch.zeros(3))


def test_prepared_ops_have_schemas():
    """The prepared path's ops are defined in every build (their kernels only with CUDA)."""
    from zo_opt import _extension

    if _extension.load() is not None:
        pytest.skip(f"extension not loadable here: {_extension.load()}")
    assert str(torch.ops.zo_opt.cuda_table.default._schema) == (
        "zo_opt::cuda_table(Tensor[] params, int[] offsets) -> (Tensor, int)")
    assert str(torch.ops.zo_opt.noise_axpby_table_.default._schema) == (
        "zo_opt::noise_axpby_table_(Tensor table, int n_tensors, int n_tiles, Tensor seeds, "
        "Tensor scales, str distribution) -> ()")


class _FakeOps:
    """Stands in for torch.ops.zo_opt in the prepared object's plumbing test (CPU tensors)."""

    def __init__(self):
        self.built, self.launched = [], []

        def launch(*args):
            self.launched.append(args)

        self.noise_axpby_table_ = type("Op", (), {"default": staticmethod(launch)})()

    def cuda_table(self, params, offsets):
        self.built.append(([p.data_ptr() for p in params], list(offsets)))
        return torch.zeros(8, dtype=torch.uint8), 7 * len(params)


def test_prepared_plumbing_without_a_gpu(monkeypatch):
    """Empty tensors left out of the table (with their offsets), one launch per run with the
    table's counts, nothing launched for an all-empty list, and the storages the table points
    at kept alive when a parameter's .data is replaced."""
    from zo_opt.backends import cuda as cuda_mod

    fake = _FakeOps()
    monkeypatch.setattr(cuda_mod.torch, "ops", type("Ops", (), {"zo_opt": fake})())
    params = [torch.zeros(5), torch.empty(0), torch.zeros(3), torch.empty(0)]
    prepared = cuda_mod.BACKEND.prepare(params, [0, 128, 128, 256])
    assert fake.built == [([params[0].data_ptr(), params[2].data_ptr()], [0, 128])]
    assert (prepared.n_tensors, prepared.n_tiles) == (2, 14)
    seeds, scales = torch.zeros(2, dtype=torch.int64), torch.zeros(3)
    prepared(seeds, scales, "gaussian")
    assert len(fake.launched) == 1 and fake.launched[0][1:] == (2, 14, seeds, scales, "gaussian")
    old_ptr = params[2].data_ptr()
    params[2].data = torch.ones(3)
    assert any(t.data_ptr() == old_ptr for t in prepared._storages)  # old storage kept alive
    none = cuda_mod.BACKEND.prepare([torch.empty(0)], [0])
    none(seeds[:0], scales[:1], "rademacher")
    assert len(fake.built) == 1 and len(fake.launched) == 1


# --- GPU (-m gpu) ----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [0, 1, 2**32 + 17, 2**64 - 1]
# ragged sizes around vectors, Philox blocks and tiles, and a GPT-2 sized matrix
SHAPES = [(1,), (3,), (127,), (128,), (129,), (4095,), (4097,), (33, 129), (768, 3072),
          (1_000_003,)]
# global index bases: 0; straddling 2^34 (Gaussian counters past 2^32); past 2^41 (Rademacher
# counters past 2^32)
BASES = [0, 2**34 - 2048, 2**41 + 128]


@pytest.fixture(scope="module")
def cuda():
    backend = backends.BACKENDS["cuda"]
    reason = backend.unavailable_reason()
    if reason is not None:
        if torch.version.cuda is None or nvcc() is None:
            pytest.skip(f"cuda backend cannot be built here: {reason}")
        pytest.fail(f"a GPU and nvcc are here, but the cuda backend is unavailable: {reason}")
    return backend


@pytest.mark.gpu
def test_auto_picks_per_distribution_and_triton_for_exact_passes(cuda):
    if "triton" not in zo_opt.available_backends():
        pytest.skip("triton is not available here")
    t = torch.zeros(4, device="cuda")
    assert backends.resolve("auto", t, "gaussian").name == "triton"
    assert backends.resolve("auto", t, "rademacher").name == "cuda"
    for distribution, name in (("gaussian", "triton"), ("rademacher", "cuda")):
        plan = zo_opt.functional.Prepared([t], distribution=distribution)
        assert [b.name for b, *_ in plan.work] == [name]
        exact = zo_opt.functional.Prepared([t], distribution=distribution, exact=True)
        assert [b.name for b, *_ in exact.work] == ["triton"]  # exact passes: EXACT_AUTO_ORDER


def call(backend, params, seeds, scales, distribution, base=0):
    offsets = [base + o for o in noise.offsets([p.numel() for p in params])]
    scales = torch.tensor(scales, dtype=torch.float32, device=params[0].device)
    backend.noise_axpby_(params, offsets, seeds, scales, distribution)


def random_params(dtype, shapes=SHAPES, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, generator=g, device="cuda").to(dtype) for s in shapes]


def assert_same(got, want, distribution, coeff_sum):
    for g, w in zip(got, want):
        if distribution == "rademacher":
            assert torch.equal(g, w)  # same float32 operations in the same order
        else:  # z within 2e-5 of each other, then one rounding to the dtype
            tol = coeff_sum * 2e-5 + torch.finfo(g.dtype).eps * w.float().abs()
            assert ((g.float() - w.float()).abs() <= tol).all(), (g.dtype, (g.float() - w.float()).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base", BASES)
def test_direction_matches_reference_at_full_size(cuda, distribution, seed, base):
    """z itself: scales [0, 1] on float32 zeros leaves exactly z in every element."""
    params = [torch.zeros(s, device="cuda") for s in SHAPES]
    call(cuda, params, [seed], [0.0, 1.0], distribution, base)
    for p, o in zip(params, noise.offsets([p.numel() for p in params])):
        idx = torch.arange(p.numel(), device="cuda") + (base + o)
        want = noise.noise_at(idx, seed, distribution)
        err = (p.reshape(-1).double() - want).abs().max().item()
        assert err <= (2e-5 if distribution == "gaussian" else 0.0), (p.shape, err)


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_known_answers(cuda, kat, distribution):
    """Each KAT index g as the last element of a tensor placed at offset 128 * (g // 128)."""
    for case in kat["cases"]:
        params = [torch.zeros(g % 128 + 1, device="cuda") for g in kat["indices"]]
        offsets = [g - g % 128 for g in kat["indices"]]
        scales = torch.tensor([0.0, 1.0], device="cuda")
        cuda.noise_axpby_(params, offsets, [int(case["seed"])], scales, distribution)
        got = torch.stack([p[-1] for p in params]).double().cpu()
        want = torch.tensor(case[distribution], dtype=torch.float64)
        assert (got - want).abs().max() <= (2e-5 if distribution == "gaussian" else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_axpby_matches_torch_backend(cuda, distribution, dtype, seed):
    """The full primitive, alpha != 1 and two seeds, against the reference backend."""
    params = random_params(dtype)
    want = [p.clone() for p in params]
    seeds, scales = [seed, seed ^ 0x5DEECE66D], [0.75, 1e-3, -2.5e-3]
    call(cuda, params, seeds, scales, distribution, base=2**34 - 2048)
    call(backends.BACKENDS["torch"], want, seeds, scales, distribution, base=2**34 - 2048)
    assert_same(params, want, distribution, sum(map(abs, scales[1:])))


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_views_empty_tensors_and_many_seeds(cuda, distribution, dtype):
    """Scalar paths (views off 16-byte alignment), empty tensors, q = 0 and q = 40."""
    storage = torch.randn(10_001, device="cuda").to(dtype)
    params = [storage[1:4098], torch.empty(0, device="cuda", dtype=dtype), storage[4099:],
              *random_params(dtype, [(4097,), (129,)])]
    assert params[0].data_ptr() % 16 != 0
    want = [p.clone() for p in params]
    for q in (0, 40):
        seeds = [noise.direction_seed(7, 3, i) for i in range(q)]
        scales = [0.5] + [(-1) ** i * 1e-2 for i in range(q)]
        call(cuda, params, seeds, scales, distribution)
        call(backends.BACKENDS["torch"], want, seeds, scales, distribution)
        assert_same(params, want, distribution, sum(map(abs, scales[1:])))


@pytest.mark.gpu
def test_no_host_sync(cuda):
    """Scales stay on the device and the table upload is asynchronous."""
    params = random_params(torch.bfloat16, [(4097,), (768, 3072)])
    scales = torch.tensor([1.0, 1e-3], device="cuda")
    offsets = noise.offsets([p.numel() for p in params])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda.noise_axpby_(params, offsets, [2**64 - 1], scales, "gaussian")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_triton_backend(cuda, distribution, dtype):
    """Same z, and the same perturbation p + c z. One seed and alpha = 1 make the Rademacher
    result a single rounding of p +- c, so it is exact whatever order or FMA use each backend
    chose for the general axpby."""
    triton = backends.BACKENDS.get("triton")
    if triton is None or triton.unavailable_reason() is not None:
        pytest.skip(f"triton backend unavailable: {backends.unavailable_backends().get('triton')}")
    if not triton.supports(torch.zeros(1, device="cuda", dtype=dtype)):
        pytest.skip("triton backend does not take CUDA tensors here (interpreter mode)")
    for seed in (2**64 - 1, 2**32 + 17):
        zs = {b.name: [torch.zeros(s, device="cuda") for s in SHAPES] for b in (cuda, triton)}
        for b in (cuda, triton):
            call(b, zs[b.name], [seed], [0.0, 1.0], distribution, base=2**34 - 2048)
        assert_same(zs["cuda"], zs["triton"], distribution, 1.0)
        params = random_params(dtype, seed=1)
        want = [p.clone() for p in params]
        call(cuda, params, [seed], [1.0, -1e-3], distribution, base=2**34 - 2048)
        call(triton, want, [seed], [1.0, -1e-3], distribution, base=2**34 - 2048)
        assert_same(params, want, distribution, 1e-3)


def prepared_call(cuda, params, seeds, scales, distribution, base=0):
    offsets = [base + o for o in noise.offsets([p.numel() for p in params])]
    run = cuda.prepare(params, offsets)
    run(torch.tensor([as_int64(s) for s in seeds], dtype=torch.int64, device="cuda"),
        torch.tensor(scales, dtype=torch.float32, device="cuda"), distribution)
    return run


def ragged_mixed(dtype=None, seed=0):
    """Every dtype in one list unless one is given (tiles are 4096 float32 or 8192 16-bit
    elements), unaligned views, empty tensors, and more than 32 tensors in a row smaller than
    a tile (the kernel's tile walk advances 32 tensors per round)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtypes = [dtype] if dtype else DTYPES
    # two storages: .to() of a float32 view is the view itself, and the views must not overlap
    storage = [torch.randn(20_001, generator=g, device="cuda") for _ in range(2)]
    out = []
    for i, n in enumerate([1, 3, 127, 129, 4095, 4097, 8191, 8193, 16385, 768 * 3072 + 5]):
        out.append(torch.randn(n, generator=g, device="cuda").to(dtypes[i % len(dtypes)]))
    out += [storage[0][1:8194].to(dtypes[-1])[1:], storage[1][2:4100].to(dtypes[0])[1:]]  # off 16 B
    out += [torch.empty(0, device="cuda", dtype=dtypes[0])] * 40
    out += [torch.randn(1 + 37 * i % 300, generator=g, device="cuda").to(dtypes[i % len(dtypes)])
            for i in range(70)]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [None, *DTYPES], ids=["mixed", "f32", "f16", "bf16"])
@pytest.mark.parametrize("q", [1, 3])
def test_prepared_matches_list_op_and_reference(cuda, distribution, dtype, q):
    """The prepared launch, the list op and the torch backend on the same ragged list: the
    two CUDA paths bit for bit (one kernel), the reference as in the other tests."""
    params = ragged_mixed(dtype)
    assert any(p.data_ptr() % 16 for p in params)
    for seed in (0, 2**64 - 1):  # the second round starts from the first's result
        listed, want = [p.clone() for p in params], [p.clone() for p in params]
        seeds = [seed ^ (0x9E3779B97F4A7C15 * i % 2**64) for i in range(q)]
        scales = [0.75] + [(-1) ** i * 1e-2 * (i + 1) for i in range(q)]
        prepared_call(cuda, params, seeds, scales, distribution, base=2**34 - 2048)
        call(cuda, listed, seeds, scales, distribution, base=2**34 - 2048)
        call(backends.BACKENDS["torch"], want, seeds, scales, distribution, base=2**34 - 2048)
        for got, lst in zip(params, listed):
            assert torch.equal(got, lst)
        assert_same(params, want, distribution, sum(map(abs, scales[1:])))


@pytest.mark.gpu
def test_prepared_run_does_not_sync(cuda):
    """A prepared pass: metadata checks and one launch; sync debug mode would raise on a
    blocking copy or a device->host read."""
    params = random_params(torch.bfloat16, [(4097,), (768, 3072)]) + random_params(torch.float32, [(129,)])
    run = cuda.prepare(params, noise.offsets([p.numel() for p in params]))
    seeds = torch.tensor([as_int64(2**64 - 1), 5], dtype=torch.int64, device="cuda")
    scales = torch.tensor([1.0, 1e-3, -1e-3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dist in noise.DISTRIBUTIONS:
            run(seeds, scales, dist)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_prepared_runs_replay_in_a_cuda_graph(cuda, distribution):
    """Two prepared passes (perturb +eps z, then -2 eps z with another alpha) captured once and
    replayed with new seeds and scales written into the captured buffers: the same bits as
    the same passes run eagerly."""
    params = ragged_mixed(seed=3)
    eager = [p.clone() for p in params]
    offsets = noise.offsets([p.numel() for p in params])
    run, run_eager = cuda.prepare(params, offsets), cuda.prepare(eager, offsets)
    seeds = torch.zeros(2, dtype=torch.int64, device="cuda")
    s1, s2 = torch.zeros(3, device="cuda"), torch.zeros(3, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (first launch, occupancy query) off the capture
        for r in (run, run_eager):
            r(seeds, torch.tensor([0.5, 1e-3, 0.0], device="cuda"), distribution)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(seeds, s1, distribution)
        run(seeds, s2, distribution)
    for step in range(3):
        values = [as_int64(noise.direction_seed(11, step, i)) for i in range(2)]
        a = [1.0, 1e-3 * (step + 1), -5e-4]
        b = [0.999, -2e-3 * (step + 1), 1e-3]
        seeds.copy_(torch.tensor(values, device="cuda"))
        s1.copy_(torch.tensor(a, device="cuda"))
        s2.copy_(torch.tensor(b, device="cuda"))
        graph.replay()
        sd = torch.tensor(values, dtype=torch.int64, device="cuda")
        run_eager(sd, torch.tensor(a, device="cuda"), distribution)
        run_eager(sd, torch.tensor(b, device="cuda"), distribution)
        torch.cuda.synchronize()
        for got, want in zip(params, eager):
            assert torch.equal(got, want), (step, got.dtype, got.shape)


SANITIZED = """
import torch
from zo_opt import backends, noise
cuda = backends.BACKENDS["cuda"]
# unavailable_reason() loads the extension (registers torch.ops.zo_opt) before any op call
reason = cuda.unavailable_reason()
assert reason is None, reason
storage = torch.randn(20000, device="cuda")
seeds = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
scales = torch.tensor([1.0, 0.1, 0.2], device="cuda")
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # a view off 16-byte alignment, tiles' ragged ends, a tensor of less than one vector
    params = [storage[1:8195].to(dtype)[1:], torch.randn(8193, device="cuda").to(dtype),
              storage[5001:5128].to(dtype), torch.randn(3, device="cuda").to(dtype)]
    offsets = noise.offsets([p.numel() for p in params])
    run = cuda.prepare(params, offsets)
    for dist in noise.DISTRIBUTIONS:
        cuda.noise_axpby_(params, offsets, [1, 2], scales, dist)
        run(seeds, scales, dist)
torch.cuda.synchronize()
print("sanitized run ok")
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_compute_sanitizer_clean(cuda, tmp_path):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    run = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
                          "-c", SANITIZED], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    assert run.returncode == 0 and "sanitized run ok" in run.stdout, run.stdout + run.stderr
