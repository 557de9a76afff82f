"""One pass over the parameters of GPT-2 20M and 124M: ``theta += eps * z`` in place.

Rows: each zo-opt backend (Gaussian; Rademacher too for compiled backends), the MeZO-style
loop, the old repo's loop, and a copy of the same bytes (the bandwidth ceiling). GB/s counts
``2 * parameter bytes`` (one read and one write of each element) for every row.
"""
import pytest
import torch

from zo_opt.backends import BACKENDS

from . import workloads
from .shapes import make_params

SIZES = ("20M", "124M")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (implementation, distribution); zo-opt's backends are listed even where unavailable, so
# that a skipped row says why.
IMPLS = ([("copy", "gaussian")]
         + [(f"zo-opt[{b}]", "gaussian") for b in ("cpu", "triton", "cuda", "torch")]
         + [(f"zo-opt[{b}]", "rademacher") for b in ("cpu", "triton", "cuda")]
         + [(b, "gaussian") for b in workloads.BASELINES])
ROUNDS = {"20M": 5, "124M": 3}


@pytest.fixture(scope="module", params=[(s, d) for s in SIZES for d in DTYPES],
                ids=lambda sd: f"{sd[0]}-{sd[1]}")
def params(request):
    size, dtype = request.param
    return size, dtype, make_params(size, DTYPES[dtype])


@pytest.mark.parametrize("impl,distribution", IMPLS, ids=[f"{i}-{d}" for i, d in IMPLS])
def test_pass(benchmark, params, impl, distribution):
    size, dtype, ps = params
    rounds, warmup = ROUNDS[size], 1
    if impl.startswith("zo-opt["):
        backend = impl[len("zo-opt["):-1]
        reason = workloads.backend_skip_reason(backend, "cpu")
        if reason:
            pytest.skip(reason)
        if not BACKENDS[backend].supports(ps[0]):
            pytest.skip(f"backend {backend!r} has no {dtype}")
        if backend == "torch":  # the reference: int64 Philox in plain torch ops
            if size != "20M" or dtype != "float32":
                pytest.skip("reference backend: about 30 s per pass at 20M; timed at 20M float32 only")
            rounds, warmup = 1, 0
    fn = workloads.make_pass(impl, ps, distribution)
    benchmark.group = f"pass {size} {dtype}"
    benchmark.extra_info.update(impl=impl, distribution=distribution, size=size, dtype=dtype,
                                bytes=2 * workloads.param_bytes(ps),
                                params=sum(p.numel() for p in ps))
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
