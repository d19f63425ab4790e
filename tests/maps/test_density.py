"""tractfunc.maps.density: tckmap -template parity on tckgen streamlines (counts exact, lengths and DEC <= 1e-4),
the soft form's limit and gradients, bad inputs."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from mapsdata import GRID_AFFINE, GRID_DIMS, mrtrix, philips_tck, random_tracks  # noqa: F401 (fixture)
from tractfunc import TractfuncError
from tractfunc.io.tractogram import load_tractogram
from tractfunc.maps import density, soft_density
from conftest import require_tckgen

CASES = {"count": ([], {}), "precise": (["-precise"], dict(mode="length")), "ends": (["-ends_only"], dict(mode="ends")),
         "dec": (["-dec"], dict(dec=True)), "dec_precise": (["-dec", "-precise"], dict(mode="length", dec=True))}


# weighted -precise: tests/maps/test_cli_maps.py; every weighted case on 100k streamlines: test_maps_slow.py
@pytest.mark.parametrize("case,weighted", [(c, False) for c in CASES] + [("count", True)])
def test_tckmap_parity(philips_tck, case, weighted):
    require_tckgen("tckmap")
    opts, kw = CASES[case]
    out = os.path.join(philips_tck["dir"], f"tdi_{case}_{weighted}.nii.gz")
    extra = ["-tck_weights_in", philips_tck["weights"]] if weighted else []
    mrtrix("tckmap", philips_tck["tck"], out, "-template", philips_tck["fa"], *opts, *extra)
    ref = nib.load(out)
    expect = np.asarray(ref.dataobj, dtype=np.float64)
    tf = load_tractogram(philips_tck["tck"])
    tmpl = nib.load(philips_tck["fa"])
    np.testing.assert_allclose(ref.affine, tmpl.affine, atol=1e-4)   # tckmap writes the template's layout
    w = torch.tensor(np.loadtxt(philips_tck["weights"])) if weighted else None
    got = density((torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)), tmpl.affine, tmpl.shape,
                  weights=w, step_size=float(tf.header["step_size"]), **kw).numpy()
    assert got.shape == expect.shape
    if case in ("count", "ends") and not weighted:
        assert np.array_equal(got, expect)                           # exact per voxel
    else:
        assert np.abs(got - expect).max() <= 1e-4 * np.abs(expect).max()
        nz = expect != 0
        assert np.array_equal(got != 0, nz)
        assert np.max(np.abs(got[nz] - expect[nz]) / np.abs(expect[nz])) <= 1e-4


def test_density_accepts_tracks_and_trackfile(philips_tck):
    tf = load_tractogram(philips_tck["tck"])
    tmpl = nib.load(philips_tck["fa"])
    a = density(tf, tmpl.affine, tmpl.shape)
    b = density((torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)), tmpl.affine, tmpl.shape)
    assert torch.equal(a, b) and a.sum() > 0


@pytest.mark.parametrize("mode", ["count", "ends"])
@pytest.mark.parametrize("dec", [False, True])
def test_soft_tends_to_hard(mode, dec):
    v, ln = random_tracks(30)
    w = torch.rand(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    hard = density((v, ln), GRID_AFFINE, GRID_DIMS, mode=mode, dec=dec, weights=w)
    errs = [float((soft_density((v, ln), GRID_AFFINE, GRID_DIMS, mode=mode, dec=dec, weights=w, tau=t) - hard)
                  .abs().max()) for t in (1e-1, 1e-2, 1e-6)]
    assert errs[0] > errs[2] and errs[1] >= errs[2]
    assert errs[2] <= 1e-6 * float(hard.abs().max())


def test_soft_length_tends_to_precise():
    v, ln = random_tracks(30, jitter=0.005)
    hard = density((v, ln), GRID_AFFINE, GRID_DIMS, mode="length")
    soft = soft_density((v, ln), GRID_AFFINE, GRID_DIMS, mode="length", tau=1e-6, subdivide=16)
    assert float((soft - hard).abs().sum() / hard.abs().sum()) < 0.01     # chords split at sub-chord midpoints
    coarse = soft_density((v, ln), GRID_AFFINE, GRID_DIMS, mode="length", tau=1e-6, subdivide=1)
    assert float((coarse - hard).abs().sum()) > float((soft - hard).abs().sum())


@pytest.mark.parametrize("mode,dec", [("count", False), ("count", True), ("ends", False), ("length", False),
                                      ("length", True)])
def test_soft_gradcheck(mode, dec):
    v, ln = random_tracks(2, seed=3)
    v = torch.cat([v[:6], v[int(ln[0]):int(ln[0]) + 5]]).clone().requires_grad_(True)   # short: 6 + 5 vertices
    ln = torch.tensor([6, 5])
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    R = torch.randn(int(np.prod(GRID_DIMS)) * (3 if dec else 1), 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))     # 4 random projections of the map (fast check)
    f = lambda a, b: soft_density((a, ln), GRID_AFFINE, GRID_DIMS, mode=mode, dec=dec, weights=b,  # noqa: E731
                                  tau=0.2).reshape(-1) @ R
    assert torch.autograd.gradcheck(f, (v, w), eps=1e-6, atol=1e-5)


def test_soft_under_torch_func_and_survival_weights():
    from tractfunc import Tracks
    v, ln = random_tracks(4, seed=1)
    A = ln.numel()
    z = torch.zeros(A, dtype=torch.long)
    s = torch.linspace(1.0, 0.2, v.shape[0], dtype=torch.float64)
    tr = Tracks(v, ln, z, z, torch.zeros(A, 2, dtype=torch.long), torch.ones(A, dtype=torch.bool), s)
    full = soft_density(tr._replace(weights=None), GRID_AFFINE, GRID_DIMS, tau=0.1)
    damped = soft_density(tr, GRID_AFFINE, GRID_DIMS, tau=0.1)
    assert float(damped.sum()) < float(full.sum())
    loss = lambda x: soft_density(tr._replace(vertices=x), GRID_AFFINE, GRID_DIMS, tau=0.1).pow(2).sum()  # noqa
    g = torch.func.grad(loss)(v)
    v2 = v.clone().requires_grad_(True)
    loss(v2).backward()
    assert torch.allclose(g, v2.grad) and g.abs().sum() > 0
    sg = torch.func.grad(lambda w: soft_density(tr._replace(weights=w), GRID_AFFINE, GRID_DIMS, tau=0.1).sum())(s)
    assert sg.shape == s.shape and sg.abs().sum() > 0


def test_soft_follows_dtype():
    v, ln = random_tracks(3, dtype=torch.float32)
    out = soft_density((v, ln), GRID_AFFINE, GRID_DIMS)
    assert out.dtype == torch.float32 and out.shape == GRID_DIMS


def test_bad_inputs():
    v, ln = random_tracks(3)
    with pytest.raises(TractfuncError, match="weights for 3 streamlines"):
        density((v, ln), GRID_AFFINE, GRID_DIMS, weights=torch.ones(2))
    with pytest.raises(TractfuncError, match="NaN"):
        density((v, ln), GRID_AFFINE, GRID_DIMS, weights=torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(TractfuncError, match="do not add up"):
        density((v, ln + 1), GRID_AFFINE, GRID_DIMS)
    with pytest.raises(TractfuncError, match="mode"):
        density((v, ln), GRID_AFFINE, GRID_DIMS, mode="precise")
    with pytest.raises(TractfuncError, match="affine"):
        density((v, ln), np.zeros((4, 4)), GRID_DIMS)
    with pytest.raises(TractfuncError, match="tau"):
        soft_density((v, ln), GRID_AFFINE, GRID_DIMS, tau=0)


def test_empty_tractogram_is_zero_map():
    out = density((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), GRID_AFFINE, GRID_DIMS, mode="length")
    assert out.shape == GRID_DIMS and float(out.abs().sum()) == 0


def test_chunked_mapping_gives_the_same_map(monkeypatch):
    from tractfunc.maps import tdi
    v, ln = random_tracks(20, seed=7)
    w = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole = [density((v, ln), GRID_AFFINE, GRID_DIMS, mode=m, dec=d, weights=w) for m, d in
             (("count", True), ("length", True), ("ends", False))]
    monkeypatch.setattr(tdi, "CHUNK_VERTICES", 50)
    parts = [density((v, ln), GRID_AFFINE, GRID_DIMS, mode=m, dec=d, weights=w) for m, d in
             (("count", True), ("length", True), ("ends", False))]
    for a, b in zip(whole, parts):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    from tractfunc.maps import connectome, sample_stat
    v, ln = random_tracks(20, seed=8)
    vc, lc = v.cuda(), ln.cuda()
    for kw in (dict(), dict(mode="length", dec=True), dict(mode="ends")):
        assert torch.allclose(density((vc, lc), GRID_AFFINE, GRID_DIMS, **kw).cpu(),
                              density((v, ln), GRID_AFFINE, GRID_DIMS, **kw))
        assert torch.allclose(soft_density((vc, lc), GRID_AFFINE, GRID_DIMS, **kw).cpu(),
                              soft_density((v, ln), GRID_AFFINE, GRID_DIMS, **kw))
    img = torch.rand(GRID_DIMS, dtype=torch.float64)
    assert torch.allclose(sample_stat((vc, lc), img.cuda(), GRID_AFFINE).cpu(), sample_stat((v, ln), img, GRID_AFFINE))
    lab = (torch.rand(GRID_DIMS) * 4).long()
    assert torch.equal(connectome((vc, lc), lab.cuda(), GRID_AFFINE).cpu(), connectome((v, ln), lab, GRID_AFFINE))


@pytest.mark.parametrize("template,case", [("iso1.25", "precise"), ("permuted", "dec")])
def test_template_on_another_grid(philips_tck, tmp_path, template, case):
    """A template on its own grid (finer voxels, or axes permuted and flipped): mapped in scanner space as tckmap
    maps it (tckmap's upsampling ratio follows the template's voxel size, its frame the template's axes)."""
    require_tckgen("tckmap")
    fa = nib.load(philips_tck["fa"])
    if template == "iso1.25":
        A = fa.affine.copy()
        A[:3, :3] = np.diag([-1.25, 1.25, 1.25])
        img = nib.Nifti1Image(np.zeros((179, 179, 120), np.float32), A)
    else:   # file axes (y, -x, z) of the FA grid
        A = fa.affine[:, [1, 0, 2, 3]].copy()
        A[:, 1] *= -1
        A[:3, 3] = fa.affine[:3, 3] + fa.affine[:3, 0] * (fa.shape[0] - 1)
        img = nib.Nifti1Image(np.zeros((fa.shape[1], fa.shape[0], fa.shape[2]), np.float32), A)
    path, out = str(tmp_path / "template.nii.gz"), str(tmp_path / "ref.nii.gz")
    nib.save(img, path)
    opts, kw = CASES[case]
    mrtrix("tckmap", philips_tck["tck"], out, "-template", path, *opts)
    ref = np.asarray(nib.load(out).dataobj, dtype=np.float64)
    tf = load_tractogram(philips_tck["tck"])
    got = density(tf, A, img.shape, step_size=float(tf.header["step_size"]), **kw).numpy()
    nz = ref != 0
    assert np.array_equal(got != 0, nz) and np.max(np.abs(got[nz] - ref[nz]) / np.abs(ref[nz])) <= 1e-4
