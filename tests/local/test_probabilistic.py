"""Probabilistic getters (tractfunc.local.probabilistic): the sampled directions follow the FOD-derived PMF
(chi-square goodness of fit at significance 1e-3, with negative controls that the test rejects), DIPY's own
ProbabilisticDirectionGetter draws from the same distribution, same seed -> same directions, the cone is
respected, and both gradient estimators behave (REINFORCE unbiased within its standard error; Gumbel-softmax
finite, straight-through forward = an exact sample)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from tractfunc.local import probabilistic as pr
from tractfunc.core import sh

ALPHA = 1e-3          # significance level of the goodness-of-fit tests


def crossing_fod(lmax=8, scale=1.0):
    """SH (N,) of two crossing fibres (60 degrees apart, weights 0.6 / 0.4), band-limited deltas with a
    Gaussian roll-off: small negative lobes, like a CSD FOD."""
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0]], dtype=torch.float64)
    l = torch.tensor(sh._tables(lmax)[0], dtype=torch.float64)
    kernel = torch.exp(-l * (l + 1) / 40)
    return scale * (torch.tensor([0.6, 0.4], dtype=torch.float64)[:, None] * sh.basis(dirs, lmax)).sum(0) * kernel


def volume(c):
    return c.expand(3, 3, 3, -1).clone()


PREV = torch.nn.functional.normalize(torch.tensor([0.9, 0.3, 0.2], dtype=torch.float64), dim=0)
CENTRE = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)


def draw_many(getter, n, seed, chunk=10000):
    g = torch.Generator().manual_seed(seed)
    out = [getter(CENTRE.expand(m, 3), PREV.expand(m, 3), g) for m in [chunk] * (n // chunk)]
    d = torch.cat([o[0] for o in out])
    assert all(bool(o[1].all()) for o in out)
    return d


def vertex_index(d, verts):
    """The vertex each sampled direction is (up to sign; exact vertices, so |cos| = 1 picks it)."""
    return np.argmax(np.abs(d.numpy() @ verts.numpy().T), 1)


def gof_pvalue(idx, expected_p, min_expected=5.0):
    """Chi-square goodness of fit of vertex counts vs probabilities; bins with < min_expected expected
    counts pooled into one."""
    n = len(idx)
    obs = np.bincount(idx, minlength=len(expected_p)).astype(float)
    exp = n * np.asarray(expected_p)
    assert obs[exp == 0].sum() == 0, "a zero-probability vertex was drawn"
    big = exp >= min_expected
    o = np.append(obs[big], obs[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    return stats.chisquare(o[keep], e[keep]).pvalue


def reference_pmf(c, verts, max_angle, pmf_threshold=0.0, cutoff=0.0, power=1.0):
    """The PMF the getters should sample, computed directly in NumPy."""
    a = sh.basis(verts, sh.lmax_for(c.shape[-1])).numpy() @ c.numpy()
    cos = np.abs(verts.numpy() @ PREV.numpy())
    keep = (cos >= math.cos(math.radians(max_angle))) & (a >= pmf_threshold * max(a.max(), 0)) & (a > cutoff) & (a > 0)
    w = np.where(keep, np.abs(a) ** power, 0.0)
    return w / w.sum()


SPHERE = pr.fibonacci_sphere(400)
N_SAMPLES = 20000


@pytest.fixture(scope="module")
def dipy_like_samples():
    c = crossing_fod()
    getter = pr.probabilistic(volume(c), max_angle=40, sphere=SPHERE, pmf_threshold=0.1, sh_basis="mrtrix")
    return c, vertex_index(draw_many(getter, N_SAMPLES, seed=0), SPHERE.vertices)


def test_dipy_semantics_match_the_pmf(dipy_like_samples):
    c, idx = dipy_like_samples
    p = reference_pmf(c, SPHERE.vertices, 40, pmf_threshold=0.1)
    assert (p > 0).sum() > 30                    # a real distribution, not a few bins
    assert gof_pvalue(idx, p) > ALPHA


@pytest.mark.parametrize("wrong", ["no_threshold", "power_1.3", "uniform_in_cone"])
def test_goodness_of_fit_rejects_a_wrong_pmf(dipy_like_samples, wrong):
    """Negative controls: the same samples against nearby wrong PMFs are rejected (p < 1e-6)."""
    c, idx = dipy_like_samples
    if wrong == "no_threshold":
        p = reference_pmf(c, SPHERE.vertices, 40, pmf_threshold=0.0)
    elif wrong == "power_1.3":
        p = reference_pmf(c, SPHERE.vertices, 40, pmf_threshold=0.1, power=1.3)
    else:
        p = (reference_pmf(c, SPHERE.vertices, 40, pmf_threshold=0.1) > 0).astype(float)
        p /= p.sum()
    assert gof_pvalue(idx, p) < 1e-6             # (each wrong PMF's support covers the samples)


def test_ifod1_matches_the_pmf_and_the_cone():
    c = crossing_fod(scale=1.4)
    getter = pr.ifod1(volume(c), max_angle=35, cutoff=0.1, sphere=SPHERE, sh_basis="mrtrix")
    d = draw_many(getter, N_SAMPLES, seed=1)
    cos = d @ PREV
    assert float(cos.min()) >= math.cos(math.radians(35)) - 1e-12     # one-sided cone, forward
    p = reference_pmf(c, SPHERE.vertices, 35, cutoff=0.1)
    a = sh.basis(SPHERE.vertices, 8).numpy() @ c.numpy()
    in_cone = np.abs(SPHERE.vertices.numpy() @ PREV.numpy()) >= math.cos(math.radians(35))
    assert ((a <= 0.1) & (a > 0) & in_cone).any()            # the cutoff removes some candidates
    assert gof_pvalue(vertex_index(d, SPHERE.vertices), p) > ALPHA


def test_same_dipy_distribution_as_dipy():
    """Two-sample chi-square (homogeneity, 1e-3): DIPY 1.12's ProbabilisticDirectionGetter and ours, same
    SH, sphere, angle and threshold."""
    random = pytest.importorskip("random")
    dipy_dir = pytest.importorskip("dipy.direction")
    from dipy.data import default_sphere
    from tractfunc.local.peaks import make_sphere
    c = crossing_fod()
    vol = volume(c).numpy()
    dg = dipy_dir.ProbabilisticDirectionGetter.from_shcoeff(vol, 30, default_sphere, pmf_threshold=0.1,
                                                            basis_type="tournier07", legacy=False)
    verts = default_sphere.vertices
    random.seed(3)
    n = 15000
    theirs = np.empty(n, int)
    for i in range(n):
        d = PREV.numpy().copy()
        assert dg.get_direction(CENTRE.numpy().copy(), d) == 0
        assert d @ PREV.numpy() > 0
        theirs[i] = np.argmax(np.abs(verts @ d))
    getter = pr.probabilistic(torch.as_tensor(vol), 30, sphere=make_sphere(verts, default_sphere.edges),
                              sh_basis="mrtrix")
    ours = vertex_index(draw_many(getter, n, seed=3, chunk=n), torch.as_tensor(verts))
    cats = np.union1d(theirs, ours)
    table = np.array([[np.sum(x == k) for k in cats] for x in (theirs, ours)])
    table = table[:, table.sum(0) >= 10]
    assert table.shape[1] >= 10
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_same_seed_same_directions_and_one_draw_per_row():
    getter = pr.probabilistic(volume(crossing_fod()), 40, sphere=SPHERE, sh_basis="mrtrix")
    pos = torch.stack([CENTRE, CENTRE + 0.3, torch.tensor([9.0, 1, 1], dtype=torch.float64), CENTRE - 0.2] * 50)
    prev = PREV.expand(len(pos), 3)
    a = getter(pos, prev, torch.Generator().manual_seed(7))
    b = getter(pos, prev, torch.Generator().manual_seed(7))
    c = getter(pos, prev, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # row 2 is outside the image: not ok, prev returned; it still consumes its uniform, so the others
    # do not depend on which rows stop
    assert not a[1][2::4].any() and torch.equal(a[0][2::4], prev[2::4])
    inside = pos.clone()
    inside[2::4] = CENTRE
    d = getter(inside, prev, torch.Generator().manual_seed(7))
    keep = torch.ones(len(pos), dtype=torch.bool)
    keep[2::4] = False
    assert torch.equal(d[0][keep], a[0][keep])


def test_no_candidate_is_not_ok():
    c = crossing_fod()
    g = pr.ifod1(volume(c), max_angle=10, cutoff=0.1, sphere=SPHERE, sh_basis="mrtrix")
    across = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)       # no fibre along z
    d, ok = g(CENTRE[None], across, torch.Generator().manual_seed(0))
    assert not ok.any() and torch.equal(d, across)
    zero = pr.probabilistic(torch.zeros(3, 3, 3, 45, dtype=torch.float64), 30, sphere=SPHERE, sh_basis="mrtrix")
    assert not zero(CENTRE[None], PREV[None], torch.Generator())[1].any()


def test_inverse_cdf_never_draws_a_zero_weight_vertex():
    """u * total can round up to total (a float64 uniform just below 1 is 1.0 in float32): the draw is
    then the last positive-weight vertex, not the last vertex."""
    w = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.0, 0.5]])
    u = torch.tensor([1 - 2.0 ** -30], dtype=torch.float64).float().expand(3)
    assert bool((u == 1).all())
    idx, ok = pr.inverse_cdf(w, u)
    assert idx.tolist()[::2] == [1, 3] and ok.tolist() == [True, False, True]
    idx0, _ = pr.inverse_cdf(w, torch.zeros(3))
    assert idx0.tolist()[::2] == [0, 1]                               # first positive weight at u = 0


# ------------------------------------------------------------------------------------------- gradients

def tiny_problem():
    """Four-voxel-wide SH volume, one position inside a cell (the gradient spreads over 8 voxels),
    f(u) = |p + 0.5 u - target|^2 of the next position."""
    torch.manual_seed(0)
    base = volume(crossing_fod(lmax=4))
    vol = (base + 0.05 * torch.randn(base.shape, dtype=torch.float64)).requires_grad_(True)
    pos = torch.tensor([1.3, 0.6, 1.4], dtype=torch.float64)
    target = torch.tensor([1.6, 1.2, 1.0], dtype=torch.float64)
    return vol, pos, target


def f_of(pos, target, d):
    return ((pos + 0.5 * d - target) ** 2).sum(-1)


def exact_gradient(vol, pos, target, sph):
    """(iFOD1 getter, grid PMF (V,), d E[f] / d vol by enumerating the grid)."""
    g = pr.ifod1(vol, max_angle=50, cutoff=0.0, sphere=sph, sh_basis="mrtrix")
    w, _, _ = g.weights(pos[None], PREV[None])
    p = w[0] / w[0].sum()
    signed = torch.where((sph.vertices @ PREV > 0)[:, None], sph.vertices, -sph.vertices)
    return g, p, torch.autograd.grad((p * f_of(pos, target, signed)).sum(), vol)[0]


def test_reinforce_unbiased_within_standard_error():
    """Exact d E[f] / d SH by enumerating the grid vs the REINFORCE estimate (leave-one-out baseline, K
    draws): every component within 5 standard errors, and the surrogate's autograd gradient is that
    estimate."""
    vol, pos, target = tiny_problem()
    g, p, exact = exact_gradient(vol, pos, target, pr.fibonacci_sphere(150))
    K = 4000
    draw = g.draw(pos.expand(K, 3), PREV.expand(K, 3), torch.Generator().manual_seed(11))
    assert draw.ok.all()
    np.testing.assert_allclose(draw.log_prob.detach(), torch.log(p[draw.index]).detach(), rtol=1e-12)
    loss = f_of(pos, target, draw.dir)
    surrogate = pr.score_function_surrogate(loss, draw.log_prob, pr.leave_one_out_baseline(loss)).mean()
    est = torch.autograd.grad(surrogate, vol)[0]
    # per-sample estimates from the Jacobian of log p over the grid: mean must equal est; their spread
    # gives the standard error
    adv = (loss - pr.leave_one_out_baseline(loss)).detach()
    uniq, inv = torch.unique(draw.index, return_inverse=True)
    lp_u = pr.log_pmf(g.weights(pos[None], PREV[None])[0])[0][uniq]
    J = torch.stack([torch.autograd.grad(lp_u[j], vol, retain_graph=True)[0].reshape(-1)
                     for j in range(len(uniq))])
    per = adv[:, None] * J[inv]
    np.testing.assert_allclose(per.mean(0).numpy(), est.reshape(-1).numpy(), rtol=1e-9, atol=1e-12)
    se = per.std(0) / math.sqrt(K)
    big = se > 1e-3 * se.max()
    z = ((est.reshape(-1) - exact.reshape(-1)).abs() / se)[big]
    assert float(z.max()) < 5.0
    assert float(exact.norm()) > 0.1


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_gradients_finite_and_aligned(hard):
    """Gumbel-softmax: finite gradients (some rows without a candidate included); straight-through forward
    = a vertex; averaged over draws at low temperature the gradient points like the exact one."""
    vol, pos, target = tiny_problem()
    sph = pr.fibonacci_sphere(150)
    _, _, exact = exact_gradient(vol, pos, target, sph)
    g = pr.gumbel(vol, max_angle=50, temperature=0.1, hard=hard, cutoff=0.0, sphere=sph, sh_basis="mrtrix")
    K = 2000
    P = torch.cat([pos.expand(K, 3), torch.tensor([[0.0, 0.0, 50.0]], dtype=torch.float64)])   # last: outside
    d, ok = g(P, PREV.expand(K + 1, 3), torch.Generator().manual_seed(5))
    assert ok[:K].all() and not ok[K]
    if hard:
        assert torch.allclose((d[:K] @ sph.vertices.T).abs().max(-1).values, torch.ones(K, dtype=torch.float64))
    est = torch.autograd.grad(f_of(pos, target, d[:K]).mean() + d[K].sum(), vol)[0]
    assert torch.isfinite(est).all()
    cosine = float((est * exact).sum() / (est.norm() * exact.norm()))
    assert cosine > 0.8, cosine


def test_plugs_into_local_tracking():
    """The sampling getters drive tractfunc.local.tracker.local_tracking (DIPY's LocalTracking): same generator
    seed -> same streamlines, consecutive segments within the angle, another seed -> other streamlines."""
    local = pytest.importorskip("tractfunc.local.tracker")
    vol = crossing_fod().expand(12, 12, 6, -1).clone()
    crit = local.binary_criterion(torch.ones(12, 12, 6))
    seeds = torch.tensor([[5.0, 5.0, 2.5], [6.2, 4.1, 3.0], [4.4, 6.6, 2.2]], dtype=torch.float64)
    for getter, angle in [(pr.probabilistic(vol, 30, sphere=SPHERE, sh_basis="mrtrix"), 30),
                          (pr.ifod1(vol, 20, sphere=SPHERE, sh_basis="mrtrix"), 20)]:
        run = lambda s: local.local_tracking(getter, crit, seeds, np.eye(4), 0.5, maxlen=20,
                                             generator=torch.Generator().manual_seed(s)).streamlines()
        a, b = run(1), run(1)
        assert len(a) == len(b) >= 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
        if angle == 30:
            c = run(2)
            assert any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, c))
        for s in a:
            seg = np.diff(s, axis=0)
            seg /= np.linalg.norm(seg, axis=1, keepdims=True)
            assert (np.sum(seg[1:] * seg[:-1], 1) >= math.cos(math.radians(angle)) - 1e-9).all()


def test_cli_prob_and_ifod1_reproducible(tmp_path, phantom_files):
    """``tractfunc track --algorithm prob | ifod1``: same --rng-seed -> the same streamlines, another seed ->
    other streamlines; ifod1 runs."""
    import nibabel as nib
    from tractfunc.cli.commands import main
    _, paths = phantom_files

    def run(alg, seed, name):   # in-process: torch is loaded already (the subprocess route is test_cli's)
        out = tmp_path / name
        assert main(["track", paths["fod"], str(out), "--algorithm", alg, "--seed-image", paths["mask"], "--mask",
                     paths["mask"], "--seeds", "8", "--maxlen", "30", "--rng-seed", str(seed), "--quiet"]) == 0
        return list(nib.streamlines.load(str(out)).streamlines)

    a, b, c = run("prob", 1, "a.tck"), run("prob", 1, "b.tck"), run("prob", 2, "c.tck")
    assert len(a) == len(b) == 8 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sum(len(x) for x in a) > 8 * 5
    assert any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, c))
    d = run("ifod1", 1, "d.tck")
    assert len(d) == 8 and sum(len(x) for x in d) > 8 * 5
