"""The executable noise spec (zo_opt.noise) against the known answers of NOISE.md and a
direct scalar implementation written from the contract's text."""
import math

import pytest
import torch

from zo_opt import noise

M32 = 0xFFFFFFFF


def scalar_philox(c, key):
    """Philox4x32-10 on Python ints, one counter at a time (Random123's definition)."""
    c0, c1, c2, c3 = c
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32)
    return c0, c1, c2, c3


def scalar_z(g, seed, distribution):
    key = (seed & M32, seed >> 32)
    if distribution == "gaussian":
        j, lane = g >> 2, g & 3
        w = scalar_philox((j & M32, j >> 32, 0, 0), key)
        u = [((x >> 9) + 0.5) * 2.0**-23 for x in w]
        ur, ut = (u[0], u[1]) if lane < 2 else (u[2], u[3])
        r, t = math.sqrt(-2 * math.log(ur)), 2 * math.pi * ut
        return r * math.cos(t) if lane % 2 == 0 else r * math.sin(t)
    j, b = g >> 7, g & 127
    w = scalar_philox((j & M32, j >> 32, 0, 0), key)
    return 1.0 if (w[b >> 5] >> (b & 31)) & 1 else -1.0


def test_philox_random123_known_answers():
    zero = noise.philox4x32(torch.tensor([0]), torch.tensor([0]), 0)
    assert [int(w) for w in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = noise.philox4x32(torch.tensor([M32]), torch.tensor([M32]), 2**64 - 1, M32, M32)
    assert [int(w) for w in ones] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_scalar_philox_matches_random123():
    assert scalar_philox((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def test_noise_kat_file(kat):
    idx = torch.tensor(kat["indices"])
    for case in kat["cases"]:
        seed = int(case["seed"])
        words = noise.philox4x32(torch.tensor([0]), torch.tensor([0]), seed)
        assert [f"{int(w):08x}" for w in words] == case["philox_words_of_counter_index_0"]
        gauss = noise.noise_at(idx, seed, "gaussian")
        torch.testing.assert_close(gauss, torch.tensor(case["gaussian"], dtype=torch.float64),
                                   rtol=0, atol=1e-8)
        signs = noise.noise_at(idx, seed, "rademacher")
        assert signs.tolist() == [float(v) for v in case["rademacher"]]
    assert noise.offsets(kat["offsets_example"]["numels"]) == kat["offsets_example"]["offsets"]


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("seed", [0, 7, 2**33 + 5, 2**64 - 1])
def test_reference_matches_scalar_implementation(distribution, seed):
    idx = [0, 1, 2, 3, 4, 31, 32, 127, 128, 129, 511, 2**32 - 1, 2**32, 2**34 + 3, 2**40 + 77]
    got = noise.noise_at(torch.tensor(idx), seed, distribution)
    want = torch.tensor([scalar_z(g, seed, distribution) for g in idx], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_offsets_are_128_aligned_and_cumulative():
    assert noise.offsets([]) == []
    assert noise.offsets([0, 0, 1]) == [0, 0, 0]
    assert noise.offsets([128, 129, 1]) == [0, 128, 384]


def test_direction_uses_the_offsets():
    numels = [3, 130, 0, 5]
    z = noise.direction(numels, 11, "gaussian")
    assert [t.numel() for t in z] == numels and all(t.dtype == torch.float32 for t in z)
    flat = noise.noise_at(torch.arange(512), 11, "gaussian").float()
    for t, o in zip(z, noise.offsets(numels)):
        assert torch.equal(t, flat[o:o + t.numel()])


def test_gaussian_statistics():
    z = noise.noise_at(torch.arange(400_000), 3, "gaussian")
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.05  # the kurtosis of a normal
    # the four lanes of one Philox call are uncorrelated
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 0.02


def test_rademacher_is_balanced_and_bits_independent():
    z = noise.noise_at(torch.arange(256_000), 9, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.01
    per_bit = z.view(-1, 128).mean(0)  # each bit position is balanced across counters
    assert per_bit.abs().max() < 0.05


def test_direction_seed_is_pure_and_spread():
    a = noise.direction_seed(1, 0, 0)
    assert a == noise.direction_seed(1, 0, 0)
    seeds = {noise.direction_seed(1, t, i) for t in range(200) for i in range(64)}
    assert len(seeds) == 200 * 64  # no repeats across steps and queries (the old repo cycled)
    assert noise.direction_seed(2, 0, 0) != a
    assert all(0 <= s < 2**64 for s in seeds)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", True])
def test_bad_seeds_are_rejected(bad):
    with pytest.raises(ValueError, match="seed"):
        noise.check_seed(bad)


def test_bad_distribution_is_rejected():
    with pytest.raises(ValueError, match="distribution"):
        noise.direction([4], 0, "uniform")


def test_integer_like_seeds_are_accepted():
    """numpy integers and 0-d integer tensors are integers (operator.index), a tensor's as
    uint64 bits (a capturable record's seeds); bools are not. They were refused as not ints."""
    import numpy as np

    for good in (np.int64(5), np.uint64(2**64 - 1), torch.tensor(5), torch.tensor(-1)):
        want = int(good) & noise.MASK64
        assert noise.check_seed(good) == want and type(noise.check_seed(good)) is int
    for bad in (np.bool_(True), torch.tensor(True), np.int64(-1), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="seed"):
            noise.check_seed(bad)


def test_direction_seeds_take_integers_of_other_types():
    """numpy steps and indices, a Python int step for direction_seeds and an int32 step tensor
    give the same seeds (they failed with OverflowError, full_like()'s TypeError and an
    overflow); a float step and a negative q are named."""
    import numpy as np

    want = [noise.direction_seed(1, 5, i) for i in range(3)]
    assert [noise.direction_seed(np.uint64(1), np.int64(5), np.int64(i)) for i in range(3)] == want
    for step in (5, np.int64(5), torch.tensor(5, dtype=torch.int32), torch.tensor(5)):
        got = noise.direction_seeds(1, step, 3)
        assert got.dtype == torch.int64 and [s & noise.MASK64 for s in got.tolist()] == want
    with pytest.raises(ValueError, match="step"):
        noise.direction_seeds(1, torch.tensor(5.0), 3)
    with pytest.raises(ValueError, match="step"):
        noise.direction_seed(1, 1.5, 0)
    with pytest.raises(ValueError, match="q"):
        noise.direction_seeds(1, torch.tensor(5), -1)


def test_sizes_and_base_offsets_out_of_range_are_refused():
    """The reference took a negative base_offset (indices below 0, which the functional ops
    refuse) and a negative or fractional size (offsets([-5]) was [0], direction([3.5]) three
    elements) without a word."""
    for bad in ([-5], [3.5], [True]):
        with pytest.raises(ValueError, match=r"numels\[0\]"):
            noise.offsets(bad)
    with pytest.raises(ValueError, match="base_offset"):
        noise.direction([3], 1, base_offset=-1)
    assert noise.offsets([torch.tensor(3), 0, 129]) == [0, 128, 128]
