"""tractfunc.maps.connectome: tck2connectome parity (exact counts, assignments; options to rounding), the soft
assignment's limit and gradients, ``tractfunc connectome``, bad parcellations."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import leftovers, require_tckgen, run_cli
from mapsdata import GRID_AFFINE, GRID_DIMS, mrtrix, parcellation, philips_tck, random_tracks  # noqa: F401
from tractfunc import TractfuncError
from tractfunc.io.tractogram import load_tractogram
from tractfunc.maps.connectome import assign, connectome, soft_connectome


def _inputs(files):
    tf = load_tractogram(files["tck"])
    pc = nib.load(parcellation(files))
    return (torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)), torch.from_numpy(
        np.asarray(pc.dataobj).astype(np.int64)), pc.affine


@pytest.mark.parametrize("mode", ["radial", "end_voxels"])
def test_tck2connectome_parity_counts_and_assignments(philips_tck, mode):
    require_tckgen("tck2connectome")
    out, pairs = (os.path.join(philips_tck["dir"], f"c_{mode}.{x}") for x in ("csv", "txt"))
    mrtrix("tck2connectome", philips_tck["tck"], parcellation(philips_tck), out, "-out_assignments", pairs,
           *(["-assignment_end_voxels"] if mode == "end_voxels" else []))
    tracks, nodes, A = _inputs(philips_tck)
    got = connectome(tracks, nodes, A, assignment=mode).numpy()
    assert np.array_equal(got, np.loadtxt(out, delimiter=","))                 # exact counts
    assert np.array_equal(assign(tracks, nodes, A, mode).numpy(), np.loadtxt(pairs, dtype=np.int64))


def test_tck2connectome_parity_options(philips_tck):
    require_tckgen("tck2connectome")
    out = os.path.join(philips_tck["dir"], "c_opts.csv")
    mrtrix("tck2connectome", philips_tck["tck"], parcellation(philips_tck), out, "-scale_length", "-scale_invnodevol",
           "-symmetric", "-zero_diagonal", "-keep_unassigned", "-tck_weights_in", philips_tck["weights"],
           "-assignment_radial_search", "3")
    tracks, nodes, A = _inputs(philips_tck)
    got = connectome(tracks, nodes, A, radius=3.0, weights=torch.tensor(np.loadtxt(philips_tck["weights"])),
                     scale_length=True, scale_invnodevol=True, symmetric=True, zero_diagonal=True,
                     keep_unassigned=True).numpy()
    ref = np.loadtxt(out, delimiter=",")
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_soft_tends_to_hard(philips_tck):
    tracks, nodes, A = _inputs(philips_tck)
    hard = connectome(tracks, nodes, A)
    errs = [float((soft_connectome(tracks, nodes, A, sigma=s) - hard).abs().sum() / hard.sum()) for s in (1.0, 0.1, 1e-3)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3     # what remains: ends equidistant to 1e-6 mm
    ev = connectome(tracks, nodes, A, assignment="end_voxels")
    soft_ev = soft_connectome(tracks, nodes, A, assignment="end_voxels", sigma=1e-6)
    assert float((soft_ev - ev).abs().max()) < 1e-6


def _small_parcellation():
    lab = torch.zeros(GRID_DIMS, dtype=torch.long)
    lab[:5, :, :4], lab[5:, :, :4], lab[:, :5, 4:], lab[:, 5:, 4:] = 1, 2, 3, 4
    lab[4:6, 4:6, 3:5] = 0
    return lab


@pytest.mark.parametrize("mode", ["radial", "end_voxels"])
def test_soft_gradcheck(mode):
    v, ln = random_tracks(2, seed=6)
    v = torch.cat([v[:4], v[int(ln[0]):int(ln[0]) + 3]]).clone().requires_grad_(True)
    ln = torch.tensor([4, 3])
    w = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    f = lambda a, b: soft_connectome((a, ln), _small_parcellation(), GRID_AFFINE, assignment=mode,  # noqa: E731
                                     weights=b, sigma=0.7, scale_length=True, symmetric=True)
    assert torch.autograd.gradcheck(f, (v, w), eps=1e-6, atol=1e-5)
    g = torch.func.grad(lambda a: f(a, w.detach()).sum())(v.detach())
    assert g.shape == v.shape


def test_bad_parcellations():
    v, ln = random_tracks(2)
    lab = _small_parcellation().double()
    lab[0, 0, 0] = 1.5
    with pytest.raises(TractfuncError, match="non-integer"):
        connectome((v, ln), lab, GRID_AFFINE)
    with pytest.raises(TractfuncError, match="negative"):
        connectome((v, ln), -_small_parcellation(), GRID_AFFINE)
    with pytest.raises(TractfuncError, match="3-D"):
        connectome((v, ln), torch.zeros(3, 3), GRID_AFFINE)


def test_cli_connectome(philips_tck, tmp_path):
    out, pairs = str(tmp_path / "c.csv"), str(tmp_path / "pairs.txt")
    run_cli("connectome", philips_tck["tck"], parcellation(philips_tck), out, "--out-assignments", pairs, "--quiet")
    ref = os.path.join(philips_tck["dir"], "c_radial.csv")
    if os.path.exists(ref):
        assert np.array_equal(np.loadtxt(out, delimiter=","), np.loadtxt(ref, delimiter=","))
    mrtrix("connectome2tck", philips_tck["tck"], pairs, str(tmp_path / "edge"), "-files", "single")  # MRtrix3 reads it
    bad = str(tmp_path / "bad.nii.gz")
    img = nib.load(parcellation(philips_tck))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * 0.5, img.affine), bad)
    p = run_cli("connectome", philips_tck["tck"], bad, str(tmp_path / "b.csv"), check=False)
    assert p.returncode != 0 and "non-integer" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "b.csv") and not leftovers(tmp_path)


def test_parcellation_on_another_grid(philips_tck, tmp_path):
    """A float parcellation of integer labels on a 1.5 mm grid (nearest-neighbour copy of the test parcellation):
    used on its own grid, in scanner space, as tck2connectome uses it."""
    require_tckgen("tck2connectome")
    src = nib.load(parcellation(philips_tck))
    lab = np.asarray(src.dataobj)
    A = src.affine.copy()
    A[:3, :3] = np.diag([-1.5, 1.5, 1.5])
    dims = (150, 150, 100)
    ijk = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), -1).reshape(-1, 3)
    old = np.rint((ijk @ A[:3, :3].T + A[:3, 3] - src.affine[:3, 3]) @ np.linalg.inv(src.affine[:3, :3]).T).astype(int)
    ok = ((old >= 0) & (old < lab.shape)).all(1)
    fine = np.zeros(len(ijk), np.float32)
    fine[ok] = lab[tuple(old[ok].T)]
    path, out = str(tmp_path / "parc15.nii.gz"), str(tmp_path / "c.csv")
    nib.save(nib.Nifti1Image(fine.reshape(dims), A), path)
    mrtrix("tck2connectome", philips_tck["tck"], path, out)
    tf = load_tractogram(philips_tck["tck"])
    got = connectome(tf, torch.from_numpy(fine.reshape(dims)), A).numpy()
    assert np.array_equal(got, np.loadtxt(out, delimiter=","))


@pytest.mark.parametrize("stat,opts", [("mean", ["-scale_invlength", "-tck_weights_in"]), ("min", ["-symmetric"]),
                                       ("max", ["-scale_length"])])
def test_tck2connectome_parity_stat_edge(philips_tck, stat, opts):
    require_tckgen("tck2connectome")
    out = os.path.join(philips_tck["dir"], f"c_stat_{stat}.csv")
    args = [o for o in opts for o in ([o, philips_tck["weights"]] if o == "-tck_weights_in" else [o])]
    mrtrix("tck2connectome", philips_tck["tck"], parcellation(philips_tck), out, "-stat_edge", stat, *args)
    tracks, nodes, A = _inputs(philips_tck)
    w = torch.tensor(np.loadtxt(philips_tck["weights"])) if "-tck_weights_in" in opts else None
    got = connectome(tracks, nodes, A, weights=w, stat_edge=stat, scale_invlength="-scale_invlength" in opts,
                     scale_length="-scale_length" in opts, symmetric="-symmetric" in opts).numpy()
    ref = np.loadtxt(out, delimiter=",")
    assert np.array_equal(np.isnan(got), np.isnan(ref))          # min / max: NaN where no streamline
    ok = ~np.isnan(ref)
    assert np.max(np.abs(got[ok] - ref[ok]) / np.maximum(np.abs(ref[ok]), 1e-12)) <= 1e-6
