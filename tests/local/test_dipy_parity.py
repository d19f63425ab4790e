"""DIPY-family deterministic getters (tractfunc.local.peaks / getters / local) against DIPY 1.12 itself.

Unit level: peak extraction vs ``dipy.direction.peak_directions``, the trilinear rule vs DIPY's
``trilinear_interpolate4d``, stopping criteria vs ``check_point``, getter choices vs ``get_direction`` /
``initial_direction`` on single points.  Tracking level: ``LocalTracking`` with the same seeds, SH field,
sphere, step, angle and stopping criterion on the Philips FOD (FA threshold) and on a CSD FOD of the
FiberCup phantom (binary mask): >= 99.5 % of streamlines within 0.1 mm (symmetric Hausdorff), float64.
``-m slow`` runs 2000 seeds per dataset and getter.
"""
import functools
import importlib
import os
import tempfile
import time

import numpy as np
import pytest
import torch

from conftest import PHILIPS, SHARED, _missing, require_philips

from tractfunc.local import getters as G, tracker as L, peaks as P
from tractfunc.tools.parity import hausdorff

FIBERCUP = os.path.join(SHARED, "fibercup_phantom_real")
BAR = 99.5


def _dipy():
    try:
        import dipy  # noqa: F401
        from dipy.data import default_sphere
    except ImportError:
        _missing("DIPY not installed (pip install dipy==1.12.0)")
    return default_sphere


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small per-step batches: one intra-op thread is faster (and steadier on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mirror_x_signs(lmax=8):
    """Per-coefficient signs turning an MRtrix3-basis series f(x, y, z) into f(-x, y, z)."""
    signs = []
    for l in range(0, lmax + 1, 2):
        for m in range(-l, l + 1):
            signs.append((-1.0) ** abs(m) * (1.0 if m >= 0 else -1.0))
    return np.array(signs)


def _random_sh(rng, shape, n=45):
    c = rng.normal(size=(*shape, n)) * 0.3
    c[..., 0] = 1.5 + rng.random(shape)
    return c


# -- unit level ------------------------------------------------------------------------------------------

def test_mirror_signs_reflect_x():
    """The helper used to hand DIPY the Philips FOD in its voxel frame is an exact x mirror."""
    from tractfunc.core import sh
    rng = np.random.default_rng(0)
    c = torch.as_tensor(_random_sh(rng, (4,)))
    u = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    flip = u * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    a = sh.amplitude(c * torch.as_tensor(_mirror_x_signs()), u)
    torch.testing.assert_close(a, sh.amplitude(c, flip), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rel,sep", [(0.5, 25.0), (0.2, 15.0), (0.8, 45.0), (0.0, 60.0)])
def test_peaks_match_dipy(rel, sep):
    sphere = _dipy()
    from dipy.direction.peaks import peak_directions
    from dipy.reconst.shm import sh_to_sf
    rng = np.random.default_rng(1)
    odf = sh_to_sf(_random_sh(rng, (300,)), sphere, sh_order_max=8, basis_type="tournier07", legacy=False)
    odf[:20] = np.where(odf[:20] < 0.3 * odf[:20].max(-1, keepdims=True), 0.0, odf[:20])   # pmf-threshold style
    pk = P.peak_directions(torch.as_tensor(odf), P.dipy_sphere("default"), rel, sep, max_peaks=24)
    assert not P.overflow(torch.as_tensor(odf), P.dipy_sphere("default"), rel, 24).any()
    for i in range(len(odf)):
        d, v, idx = peak_directions(odf[i], sphere, relative_peak_threshold=rel, min_separation_angle=sep)
        n = int(pk.valid[i].sum())
        assert n == len(idx), i
        np.testing.assert_array_equal(pk.indices[i, :n].numpy(), idx)
        np.testing.assert_array_equal(pk.dirs[i, :n].numpy(), d)
        np.testing.assert_array_equal(pk.values[i, :n].numpy(), v)
        assert not pk.valid[i, n:].any()


def test_peaks_edge_cases():
    sph = P.dipy_sphere("default")
    V = sph.vertices.shape[0]
    flat = torch.ones(2, V, dtype=torch.float64)
    assert not P.peak_directions(flat, sph).valid.any()                  # a plateau has no peak
    one = torch.zeros(1, V, dtype=torch.float64)
    one[0, 7] = -0.5                                                      # the lone maximum region is 0's plateau
    one[0, 3] = 2.0
    pk = P.peak_directions(one, sph)
    assert pk.valid[0, 0] and int(pk.indices[0, 0]) == 3 and pk.valid[0].sum() == 1
    wiggly = torch.as_tensor(np.random.default_rng(0).random((3, V)))    # many local maxima
    assert P.overflow(wiggly, sph, 0.0, max_peaks=2).all()
    assert P.peak_directions(wiggly, sph, 0.0, 0.0, max_peaks=2).valid.all()
    with pytest.raises(ValueError, match="edges"):
        P.make_sphere(np.eye(3), [[0, 5]])


def test_trilinear_and_criteria_match_dipy():
    _dipy()
    from dipy.core.interpolation import trilinear_interpolate4d
    from dipy.tracking.stopping_criterion import BinaryStoppingCriterion, ThresholdStoppingCriterion
    rng = np.random.default_rng(2)
    vol = rng.random((5, 6, 4, 3))
    fa = rng.random((5, 6, 4))
    mask = rng.random((5, 6, 4)) > 0.4
    hi = np.array([5, 6, 4]) - 0.5
    pts = rng.uniform(-1.0, hi + 0.5, size=(400, 3))
    pts[:30] = np.round(pts[:30] * 2) / 2                                # on cell faces and half-voxel borders
    pts[30:40] = np.where(rng.random((10, 3)) < 0.5, -0.5, hi)          # exactly on DIPY's boundary
    vals, inside = G.trilinear_dipy(torch.as_tensor(vol), torch.as_tensor(pts))
    thr = L.threshold_criterion(torch.as_tensor(fa), 0.5)(torch.as_tensor(pts))
    binary = L.binary_criterion(torch.as_tensor(mask))(torch.as_tensor(pts))
    sc_t, sc_b = ThresholdStoppingCriterion(fa, 0.5), BinaryStoppingCriterion(mask.astype(float))
    n_out = 0
    for i, p in enumerate(pts):
        try:
            ref = trilinear_interpolate4d(vol, p.copy())
            assert inside[i]
            np.testing.assert_allclose(vals[i].numpy(), ref, rtol=0, atol=1e-15)
        except IndexError:
            n_out += 1
            assert not inside[i]
        assert int(thr[i]) == int(sc_t.check_point(p.copy())), p
        assert int(binary[i]) == int(sc_b.check_point(p.copy())), p
    assert 20 < n_out < 300


def _synthetic_getters(kind, rng, **kw):
    sphere = _dipy()
    from dipy.direction import ClosestPeakDirectionGetter, DeterministicMaximumDirectionGetter
    sh = _random_sh(rng, (5, 5, 5))
    cls = ClosestPeakDirectionGetter if kind == "cp" else DeterministicMaximumDirectionGetter
    ref = cls.from_shcoeff(sh, max_angle=35.0, sphere=sphere, pmf_threshold=0.2, basis_type="tournier07", legacy=False,
                           **kw)
    fac = G.closest_peak if kind == "cp" else G.deterministic_maximum
    return sh, ref, fac(torch.as_tensor(sh), max_angle=35.0, pmf_threshold=0.2, **kw, sh_basis="mrtrix")


@pytest.mark.parametrize("kind", ["cp", "dm"])
def test_getter_choices_match_dipy(kind):
    """Single points: DIPY's get_direction (status and new direction) and initial_direction."""
    rng = np.random.default_rng(3 if kind == "cp" else 4)
    sh, ref, mine = _synthetic_getters(kind, rng, relative_peak_threshold=0.3, min_separation_angle=20)
    pts = rng.uniform(-0.7, 4.7, size=(300, 3))
    prev = rng.normal(size=(300, 3))
    prev /= np.linalg.norm(prev, axis=-1, keepdims=True)
    new, ok = mine(torch.as_tensor(pts), torch.as_tensor(prev), None)
    init = mine.initial_directions(torch.as_tensor(pts))
    n_ok = 0
    for i in range(len(pts)):
        d = prev[i].copy()
        status = ref.get_direction(pts[i].copy(), d)
        assert bool(ok[i]) == (status == 0), i
        if status == 0:
            n_ok += 1
            np.testing.assert_array_equal(new[i].numpy(), d)
        else:
            np.testing.assert_array_equal(new[i].numpy(), prev[i])
        peaks = ref.initial_direction(pts[i].copy())
        k = int(init.valid[i].sum())
        assert k == len(peaks)
        np.testing.assert_array_equal(init.dirs[i, :k].numpy(), peaks)
    assert 50 < n_ok < 300           # both outcomes exercised (points outside the image fail)


def test_getter_float32_and_validation():
    rng = np.random.default_rng(5)
    sh = torch.as_tensor(_random_sh(rng, (4, 4, 4)), dtype=torch.float32)
    g = G.deterministic_maximum(sh, max_angle=40.0, sh_basis="mrtrix")
    new, ok = g(torch.full((3, 3), 1.5), torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]]), None)
    assert new.dtype == torch.float32 and ok[:2].all() and not ok[2]    # a zero previous direction fails
    torch.testing.assert_close(new[:2].norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="mode"):
        G.deterministic_maximum(sh, mode="gumbel")
    with pytest.raises(ValueError, match="pmf_threshold"):
        G.closest_peak(sh, pmf_threshold=-1)
    with pytest.raises(ValueError, match="sh_frame"):
        G.closest_peak(sh, sh_frame="world")
    with pytest.raises(ValueError, match="shear"):
        L.local_tracking(g, L.binary_criterion(torch.ones(4, 4, 4)), torch.zeros(1, 3),
                         np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), 0.5)


def test_soft_and_straight_through_gradients():
    """hard: no gradient through the chosen vertex; straight-through: hard forward, soft backward;
    soft: finite gradients to the SH and the position, tends to hard as the temperature falls."""
    rng = np.random.default_rng(6)
    sh = torch.as_tensor(_random_sh(rng, (4, 4, 4)))
    pos = torch.tensor([[1.3, 1.6, 2.2], [2.1, 1.2, 1.7]], dtype=torch.float64)
    prev = torch.nn.functional.normalize(torch.tensor([[1.0, 0.3, 0.2], [0.1, 1.0, -0.4]], dtype=torch.float64), dim=-1)
    hard, ok = G.deterministic_maximum(sh, max_angle=45.0, sh_basis="mrtrix")(pos, prev, None)
    assert ok.all()
    shp = sh.clone().requires_grad_(True)
    h2, _ = G.deterministic_maximum(shp, max_angle=45.0, sh_basis="mrtrix")(pos, prev, None)
    assert not h2.requires_grad
    outs = {}
    for mode in ("straight_through", "soft"):
        shp = sh.clone().requires_grad_(True)
        p = pos.clone().requires_grad_(True)
        new, _ = G.deterministic_maximum(shp, max_angle=45.0, mode=mode, temperature=0.05,
                                         sh_basis="mrtrix")(p, prev, None)
        (new * torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)).sum().backward()
        assert torch.isfinite(shp.grad).all() and shp.grad.abs().sum() > 0
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        outs[mode] = (new.detach(), shp.grad)
    torch.testing.assert_close(outs["straight_through"][0], hard, rtol=0, atol=0)
    torch.testing.assert_close(outs["straight_through"][1], outs["soft"][1])
    cold, _ = G.deterministic_maximum(sh, max_angle=45.0, mode="soft", temperature=1e-4,
                                      sh_basis="mrtrix")(pos, prev, None)
    assert ((cold * hard).sum(-1) > 0.999).all()
    soft = outs["soft"][0]
    assert ((soft * hard).sum(-1) < 1 - 1e-9).any()                     # warm soft mode really differs


def test_gradient_reaches_seeds_through_steps():
    """Hard getters: the step carries the seed's gradient (d vertex / d seed = identity)."""
    rng = np.random.default_rng(7)
    sh = torch.as_tensor(_random_sh(rng, (6, 6, 6)))
    g = G.deterministic_maximum(sh, max_angle=60.0, sh_basis="mrtrix")
    crit = L.binary_criterion(torch.ones(6, 6, 6))
    seeds = torch.tensor([[2.5, 2.4, 2.6]], dtype=torch.float64, requires_grad=True)
    res = L.local_tracking(g, crit, seeds, np.diag([2.0, 2.0, 2.0, 1.0]), 0.5, maxlen=10)
    res.points[0, res.lengths[0] - 1].sum().backward()
    torch.testing.assert_close(seeds.grad, torch.ones(1, 3, dtype=torch.float64))


def test_local_tracking_rules_synthetic():
    """Bookkeeping vs LocalTracking on a synthetic field: return_all False/True, maxlen, minlen, max_cross,
    anisotropic voxels and a rotated-flipped affine."""
    _dipy()
    from dipy.tracking.local_tracking import LocalTracking
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    rng = np.random.default_rng(8)
    sh, ref_dg, mine = _synthetic_getters("dm", rng)
    fa = rng.random((5, 5, 5)) * 0.5 + 0.3
    A = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -3], [0, 0, 1.2, 4], [0, 0, 0, 1]])
    seeds_vox = rng.uniform(0, 4, size=(40, 3))
    seeds = seeds_vox @ A[:3, :3].T + A[:3, 3]
    for kw in (dict(return_all=True), dict(return_all=False, maxlen=30, minlen=5), dict(max_cross=1, maxlen=8)):
        ref = list(LocalTracking(ref_dg, ThresholdStoppingCriterion(fa, 0.45), seeds, A, step_size=0.4, **kw))
        res = L.local_tracking(mine, L.threshold_criterion(torch.as_tensor(fa), 0.45), torch.as_tensor(seeds), A,
                               0.4, **kw)
        got = res.streamlines()
        assert len(got) == len(ref) > 0, kw
        for a, b in zip(ref, got):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)


# -- tracking parity on real data ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _philips():
    """Philips FOD, FA and seed mask, cropped to the brain mask's bounding box (+2 voxels; the same crop
    and its shifted affine go to both trackers), loaded once."""
    paths = require_philips()
    import nibabel as nib
    fod = nib.load(paths["fod"])
    brain = np.asarray(nib.load(paths["mask"]).dataobj) > 0
    nz = np.argwhere(brain)
    lo, hi = np.maximum(nz.min(0) - 2, 0), np.minimum(nz.max(0) + 3, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    A = fod.affine.copy()
    A[:3, 3] = A[:3, :3] @ lo + A[:3, 3]
    fa = np.asarray(nib.load(os.path.join(PHILIPS, "dwi_FA.nii.gz")).dataobj, dtype=np.float64)[box]
    return dict(sh=np.asarray(fod.dataobj[box], dtype=np.float64), affine=A,
                seed_mask=np.asarray(nib.load(paths["seed"]).dataobj)[box] > 0, stop=("fa", fa), frame="scanner")


@functools.lru_cache(maxsize=None)
def _fibercup():
    """CSD FOD (tractfunc.tools.csd, lmax 8) of the FiberCup b=1500 DWI in its b0 > 300 mask, cached in tmp."""
    dwi = os.path.join(FIBERCUP, "dwi_b1500.nii.gz")
    if not os.path.exists(dwi):
        _missing(f"FiberCup data not found at {FIBERCUP}")
    _dipy()
    import nibabel as nib
    from tractfunc.tools import csd
    img = nib.load(dwi)
    mask = np.asarray(nib.load(os.path.join(FIBERCUP, "mask_b0gt300.nii.gz")).dataobj) > 0
    cache = os.path.join(tempfile.gettempdir(), "tractfunc_fibercup_csd_lmax8_v1.npy")
    if os.path.exists(cache):
        fod = np.load(cache)
    else:
        data = np.asarray(img.dataobj, dtype=np.float64)
        bvals, bvecs = csd.read_gradients(os.path.join(FIBERCUP, "dwi_b1500.bval"),
                                          os.path.join(FIBERCUP, "dwi_b1500.bvec"), data.shape[-1])
        fod = csd.compute_fod(data, img.affine, bvals, bvecs, mask=mask, lmax=8).fod
        np.save(cache + ".tmp.npy", fod)
        os.replace(cache + ".tmp.npy", cache)
    return dict(sh=fod.astype(np.float64), affine=img.affine, seed_mask=mask, stop=("mask", mask), frame="voxel")


DATASETS = {"philips": _philips, "fibercup": _fibercup}


def _parity(dataset, kind, n_seeds, step=0.5, max_angle=30.0, seed=0, dtype=torch.float64):
    """Track the same seeds with DIPY LocalTracking and tractfunc.local.tracker -> (hausdorff (M,), counts)."""
    default_sphere = _dipy()
    from dipy.direction import ClosestPeakDirectionGetter, DeterministicMaximumDirectionGetter
    from dipy.tracking.local_tracking import LocalTracking
    from dipy.tracking.stopping_criterion import BinaryStoppingCriterion, ThresholdStoppingCriterion
    d = DATASETS[dataset]()
    A, sh = d["affine"], d["sh"]
    rng = np.random.default_rng(seed)
    vox = np.argwhere(d["seed_mask"])
    pts = vox[rng.integers(0, len(vox), n_seeds)] + rng.uniform(-0.5, 0.5, (n_seeds, 3))
    seeds = pts @ A[:3, :3].T + A[:3, 3]
    # the PMF DIPY uses: it reads SH directions in the array axes, so the Philips FOD (scanner frame, an x
    # mirror of its LAS voxel axes) is handed to DIPY mirrored; tractfunc evaluates it with sh_frame="scanner"
    sh_dipy = sh * _mirror_x_signs() if d["frame"] == "scanner" else sh
    assert d["frame"] == "voxel" or np.allclose(A[:3, :3] / np.abs(A[:3, :3]).sum(0), np.diag([-1.0, 1, 1]))
    cls = ClosestPeakDirectionGetter if kind == "cp" else DeterministicMaximumDirectionGetter
    dg = cls.from_shcoeff(sh_dipy, max_angle=max_angle, sphere=default_sphere, pmf_threshold=0.1,
                          basis_type="tournier07", legacy=False)
    what, vol = d["stop"]
    sc = ThresholdStoppingCriterion(vol, 0.2) if what == "fa" else BinaryStoppingCriterion(vol.astype(np.float64))
    t0 = time.perf_counter()
    ref = list(LocalTracking(dg, sc, seeds, A, step_size=step, return_all=True))
    t1 = time.perf_counter()
    fac = G.closest_peak if kind == "cp" else G.deterministic_maximum
    g = fac(torch.as_tensor(sh, dtype=dtype), max_angle=max_angle, affine=A, sh_frame=d["frame"], sh_basis="mrtrix")
    vol_t = torch.as_tensor(vol, dtype=dtype)
    crit = L.threshold_criterion(vol_t, 0.2) if what == "fa" else L.binary_criterion(vol_t)
    got = L.local_tracking(g, crit, torch.as_tensor(seeds, dtype=dtype), A, step).streamlines()
    print(f"\n  DIPY {t1 - t0:.1f} s, tractfunc {time.perf_counter() - t1:.1f} s (1 thread)", end="")
    assert len(got) == len(ref), (len(got), len(ref))
    return np.array([hausdorff(a, b) for a, b in zip(ref, got)]), len(ref)


@pytest.mark.parametrize("dataset", ["philips", "fibercup"])
@pytest.mark.parametrize("kind", ["cp", "dm"])
def test_local_tracking_parity(dataset, kind):
    h, n = _parity(dataset, kind, n_seeds=120 if dataset == "philips" else 200)
    pct = 100.0 * (h <= 0.1).mean()
    print(f"\n{dataset} {kind}: {pct:.2f} % of {n} streamlines within 0.1 mm (max {h.max():.3g} mm)")
    assert n > 100
    assert pct >= BAR


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["philips", "fibercup"])
@pytest.mark.parametrize("kind", ["cp", "dm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_tracking_parity_large(dataset, kind, dtype):
    h, n = _parity(dataset, kind, n_seeds=2000, seed=11, dtype=dtype)
    pct = 100.0 * (h <= 0.1).mean()
    print(f"\n{dataset} {kind} {dtype}: {pct:.2f} % of {n} streamlines within 0.1 mm, "
          f"{100.0 * (h == 0).mean():.1f} % identical, {100.0 * (h <= 1.0).mean():.2f} % within 1 mm")
    assert pct >= BAR          # float32 too (measured 99.80 % at worst: docs/dipy_getters.md)


def test_cli_det_max(tmp_path):
    """``tractfunc track --algorithm det_max | closest_peak`` writes what the API tracks from the same seeds."""
    import nibabel as nib
    cli = importlib.import_module("tractfunc.cli.commands")
    d = _fibercup()
    A = d["affine"]
    nib.save(nib.Nifti1Image(d["sh"].astype(np.float32), A), str(tmp_path / "fod.nii.gz"))
    nib.save(nib.Nifti1Image(d["seed_mask"].astype(np.uint8), A), str(tmp_path / "mask.nii.gz"))
    seeds = np.argwhere(d["seed_mask"])[::300][:6] @ A[:3, :3].T + A[:3, 3]
    np.savetxt(tmp_path / "seeds.txt", seeds)
    sh = torch.as_tensor(d["sh"].astype(np.float32).astype(np.float64))
    crit = L.binary_criterion(torch.as_tensor(d["seed_mask"]))
    for algo, fac in (("det_max", G.deterministic_maximum), ("closest_peak", G.closest_peak)):
        out = tmp_path / f"{algo}.tck"
        rc = cli.main(["track", str(tmp_path / "fod.nii.gz"), str(out), "--algorithm", algo, "--seed-points",
                       str(tmp_path / "seeds.txt"), "--mask", str(tmp_path / "mask.nii.gz"), "--step", "0.5",
                       "--angle", "30", "--dtype", "float64", "--sh-frame", "voxel", "--quiet"])
        assert rc == 0
        tck = nib.streamlines.load(str(out)).streamlines
        g = fac(sh, max_angle=30.0, sh_basis="mrtrix")
        ref = L.local_tracking(g, crit, torch.as_tensor(seeds), A, 0.5).streamlines()
        assert len(tck) == len(ref) >= 6
        for a, b in zip(tck, ref):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert cli.main(["track", str(tmp_path / "fod.nii.gz"), str(out), "--algorithm", "closest_peak", "--seed-points",
                     str(tmp_path / "seeds.txt"), "--quiet", "--force"]) == 2   # no stopping criterion: one-line error


def test_soft_tracking_jacobian_matches_finite_differences():
    """Fixed-shape half (early_exit=False) under torch.func.jacrev, soft mode: d(end point)/d(seed) equals
    central finite differences (the soft forward is smooth away from its hard masks)."""
    rng = np.random.default_rng(9)
    g = G.deterministic_maximum(torch.as_tensor(_random_sh(rng, (6, 6, 6))), max_angle=60.0, mode="soft",
                                temperature=0.1, sh_basis="mrtrix")
    crit = L.binary_criterion(torch.ones(6, 6, 6))
    vs = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    p0 = torch.tensor([[2.5, 2.4, 2.6], [3.1, 2.2, 2.9]], dtype=torch.float64)
    d0 = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.1], [0.0, 1.0, 0.3]], dtype=torch.float64), dim=-1)

    def end(p):
        return L.track_half(g, crit, p, d0, vs, 0.5, 8, early_exit=False).points[:, -1]
    J = torch.func.jacrev(end)(p0)                                         # (2, 3, 2, 3)
    eps = 1e-6
    for k in range(3):
        e = torch.zeros_like(p0)
        e[:, k] = eps
        fd = (end(p0 + e) - end(p0 - e)) / (2 * eps)                       # rows independent: one column each
        torch.testing.assert_close(torch.stack([J[0, :, 0, k], J[1, :, 1, k]]), fd, rtol=1e-5, atol=1e-6)
    assert (J[0, :, 0] - torch.eye(3, dtype=torch.float64)).abs().max() > 1e-3   # the field's pull is in it
