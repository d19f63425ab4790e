"""tractfunc.maps.sample: tcksample -stat_tck parity (<= 1e-5 relative), the soft statistics' limit and
gradients, ``tractfunc sample``."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import require_tckgen, run_cli
from mapsdata import GRID_AFFINE, GRID_DIMS, mrtrix, philips_tck, random_tracks  # noqa: F401 (fixture)
from tractfunc import TractfuncError
from tractfunc.io.tractogram import load_tractogram
from tractfunc.maps.sample import sample_stat, sample_vertices, soft_stat


@pytest.mark.parametrize("stat,nointerp", [("mean", False), ("median", False), ("min", False), ("max", False),
                                           ("mean", True)])
def test_tcksample_parity(philips_tck, stat, nointerp):
    require_tckgen("tcksample")
    out = os.path.join(philips_tck["dir"], f"sample_{stat}_{nointerp}.txt")
    mrtrix("tcksample", philips_tck["tck"], philips_tck["fa"], out, "-stat_tck", stat, *(["-nointerp"] * nointerp))
    ref = np.loadtxt(out).ravel()
    tf = load_tractogram(philips_tck["tck"])
    fa = nib.load(philips_tck["fa"])
    got = sample_stat((torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)),
                      torch.from_numpy(np.asarray(fa.dataobj, dtype=np.float32)), fa.affine, stat,
                      "nearest" if nointerp else "linear").numpy()
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-6)) <= 1e-5


def _image(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(GRID_DIMS, dtype=dtype, generator=g)


def test_soft_min_max_tend_to_hard():
    v, ln = random_tracks(20)
    img = _image()
    for stat in ("min", "max"):
        hard = sample_stat((v, ln), img, GRID_AFFINE, stat)
        errs = [float((soft_stat((v, ln), img, GRID_AFFINE, stat, temperature=t) - hard).abs().max())
                for t in (0.1, 0.01, 1e-4)]
        assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3
    mean = sample_stat((v, ln), img, GRID_AFFINE, "mean")
    assert torch.allclose(soft_stat((v, ln), img, GRID_AFFINE, "mean"), mean)


def test_float64_mean_equals_float32_route():
    v, ln = random_tracks(10)
    img = _image()
    a = sample_stat((v, ln), img, GRID_AFFINE, "mean")
    b = sample_stat((v.float(), ln), img.float(), GRID_AFFINE, "mean")
    assert a.dtype == torch.float64 and b.dtype == torch.float32
    assert torch.allclose(a.float(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stat", ["mean", "max"])
def test_gradcheck(stat):
    v, ln = random_tracks(2, seed=4)
    v = torch.cat([v[:5], v[int(ln[0]):int(ln[0]) + 4]]).clone().requires_grad_(True)
    ln = torch.tensor([5, 4])
    base, R = _image(), torch.randn(2, *GRID_DIMS, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    c = torch.zeros(2, dtype=torch.float64, requires_grad=True)   # the image along two random directions
    f = lambda a, b: soft_stat((a, ln), base + torch.einsum("k,kxyz->xyz", b, R), GRID_AFFINE, stat,  # noqa: E731
                               temperature=0.05)
    assert torch.autograd.gradcheck(f, (v, c), eps=1e-6, atol=1e-5)
    g = torch.func.grad(lambda a: soft_stat((a, ln), base, GRID_AFFINE, stat).sum())(v.detach())
    assert g.shape == v.shape


def test_survival_weights_weigh_the_soft_mean():
    from tractfunc import Tracks
    v, ln = random_tracks(1, seed=5)
    z = torch.zeros(1, dtype=torch.long)
    s = torch.linspace(1.0, 0.0, v.shape[0], dtype=torch.float64)
    tr = Tracks(v, ln, z, z, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, dtype=torch.bool), s)
    img = _image()
    assert not torch.allclose(soft_stat(tr, img, GRID_AFFINE), sample_stat(tr, img, GRID_AFFINE))


def test_bad_inputs():
    v, ln = random_tracks(2)
    with pytest.raises(TractfuncError, match="statistic"):
        sample_stat((v, ln), _image(), GRID_AFFINE, "mode")
    with pytest.raises(TractfuncError, match="3-D"):
        sample_stat((v, ln), torch.zeros(3, 3), GRID_AFFINE)
    with pytest.raises(TractfuncError, match="median"):
        soft_stat((v, ln), _image(), GRID_AFFINE, "median")


def _rows(path):
    return [np.array(line.split(), dtype=float) for line in open(path) if not line.startswith("#")]


def test_vertex_values_and_cli_sample(philips_tck, tmp_path):
    """tcksample without -stat_tck (one line of vertex values per streamline): the API and the command."""
    require_tckgen("tcksample")
    ref, out = str(tmp_path / "ref.txt"), str(tmp_path / "ours.txt")
    mrtrix("tcksample", philips_tck["tck"], philips_tck["fa"], ref)
    run_cli("sample", philips_tck["tck"], philips_tck["fa"], out, "--quiet")
    expect, got = _rows(ref), _rows(out)
    tf = load_tractogram(philips_tck["tck"])
    fa = nib.load(philips_tck["fa"])
    api = sample_vertices(tf, torch.from_numpy(np.asarray(fa.dataobj, dtype=np.float32)), fa.affine).numpy()
    assert len(got) == len(expect) == len(tf.lengths)
    assert np.array_equal(np.concatenate(got).astype(np.float32), api)
    rel = np.abs(api - np.concatenate(expect)) / np.maximum(np.abs(np.concatenate(expect)), 1e-6)
    assert rel.max() <= 1e-5                                      # tcksample prints 6 significant digits
