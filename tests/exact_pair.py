"""What the exact-pass kernel tests share (test_exact_triton.py, test_exact_cuda.py): weights
with the awkward values planted, bitwise comparisons, and a kernel run pass by pass beside
the torch reference (zo_opt.exact.exact_pass_) on copies of the same parameters."""
import torch

from zo_opt import exact
from zo_opt.backends.cpu import as_int64

EPS = 2.0**-10
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_params(sizes, dtypes, device, seed=0, specials=True):
    """N(0, 0.02) weights; with ``specials``, zeros, -0, tiny, subnormal, NaN, inf and huge
    values scattered over each tensor (several in one 128-chunk, at chunk ends too)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, dt in zip(sizes, dtypes):
        x = torch.randn(n, generator=gen) * 0.02
        if specials:
            big = torch.finfo(dt).max
            vals = torch.tensor([0.0, -0.0, 1e-8, -3e-6, 1e-40, float("nan"), float("inf"),
                                 -float("inf"), big, -big * 0.75, big * 0.4, EPS, -EPS / 40,
                                 1.0, -2.5])
            vals = vals[torch.randperm(len(vals), generator=gen)]
            m = min(n, len(vals))
            x[torch.randperm(n, generator=gen)[:m]] = vals[:m]
        out.append(x.to(dt).to(device))
    return out


def bits(t):
    return t.view(INT[t.dtype])


def same_bits(a, b):
    """Bit-equal, except that any NaN equals any NaN (GPUs canonicalize NaN payloads)."""
    nan = torch.isnan(a.float()) & torch.isnan(b.float())
    return bool(((bits(a) == bits(b)) | nan).all())


def close(a, b, dt):
    """Gaussian: the same up to a few ulps of the stored dtype (z differs by float32 rounding)."""
    af, bf = a.float().cpu(), b.float().cpu()
    nan = torch.isnan(af) & torch.isnan(bf)
    tol = 4 * torch.finfo(dt).eps * bf.abs() + 8 * EPS * 2e-5 + 1e-30
    return bool((nan | (af == bf) | ((af - bf).abs() <= tol)).all())


class Pair:
    """A backend's exact runner on ``params`` and the reference on copies, pass by pass.
    ``code_slack``: with Gaussian noise and 16-bit params, how far the codes may differ
    (None: only the ESC sets are compared; z's last-bit differences move codes)."""

    def __init__(self, run, params, offsets, distribution, code_slack=None):
        self.k, self.r = params, [p.clone() for p in params]
        self.offsets, self.dist, self.run, self.code_slack = offsets, distribution, run, code_slack
        self.device = params[0].device
        self.base, n = exact.span(params, offsets)
        self.kc = torch.zeros(n, dtype=torch.int8, device=self.device)
        self.rc = self.kc.clone()
        self.table = None

    def new_table(self):
        """Built at the start of a step from theta (the two sides hold the same theta)."""
        self.table = exact.build_table(self.k, self.offsets, exact.tau(EPS, self.dist))

    def step(self, seeds, scales, n_old, encode, rounding_seed=None):
        scales = torch.tensor(scales, dtype=torch.float32, device=self.device)
        all_seeds = list(seeds) + ([rounding_seed] if rounding_seed is not None else [])
        dev_seeds = torch.tensor([as_int64(s) for s in all_seeds], dtype=torch.int64,
                                 device=self.device)
        self.run(dev_seeds, scales, n_old, self.kc, self.base, self.table, encode,
                 rounding_seed is not None, self.dist)
        exact.exact_pass_(self.r, self.offsets, list(seeds), scales, n_old, self.rc, self.base,
                          self.table, encode=encode, rounding_seed=rounding_seed,
                          distribution=self.dist)

    def check(self, what=""):
        for i, (a, b) in enumerate(zip(self.k, self.r)):
            if self.dist == "rademacher":
                assert same_bits(a, b), f"{what}: tensor {i} ({a.dtype})"
            else:
                assert close(a, b, a.dtype), f"{what}: tensor {i} ({a.dtype})"
        if self.dist == "rademacher":
            assert torch.equal(self.kc, self.rc), f"{what}: codes"
            return
        assert torch.equal(self.kc == exact.ESC, self.rc == exact.ESC), f"{what}: ESC"
        if self.code_slack is not None and all(p.element_size() == 2 for p in self.k):
            diff = (self.kc.int() - self.rc.int()).abs().max()
            assert diff <= self.code_slack, f"{what}: codes differ by {diff}"


def central_schedule(pair, seeds, lr_g=(), alpha=1.0, rounding_seed=None, check=True):
    """a=0 -> +eps z_1 -> -eps z_1 -> +eps z_2 -> ... -> -eps z_q -> the update."""
    pair.new_table()
    pair.step([seeds[0]], [1.0, EPS], 0, True)
    check and pair.check("first")
    for i, s in enumerate(seeds):
        pair.step([s, s], [1.0, EPS, -EPS], 1, True)
        check and pair.check(f"+- {i}")
        if i + 1 < len(seeds):
            pair.step([s, seeds[i + 1]], [1.0, -EPS, EPS], 1, True)
            check and pair.check(f"-+ {i}")
    pair.step([seeds[-1], *seeds[:len(lr_g)]], [alpha, -EPS, *lr_g], 1, False, rounding_seed)
    check and pair.check("last")


def many_seeds_schedule(pair):
    """Passes with two old and three new seeds (a general pass, not the optimizer's pairs),
    then back to theta: every pass checked against the reference."""
    pair.new_table()
    pair.step([1, 2], [1.0, EPS, EPS / 2], 0, True)
    pair.check("first")
    pair.step([1, 2, 3, 4, 5], [1.0, EPS, EPS / 2, EPS, -EPS / 4, EPS / 8], 2, True)
    pair.check("middle")
    pair.step([3, 4, 5], [1.0, EPS, -EPS / 4, EPS / 8], 3, False)
    pair.check("restore")
