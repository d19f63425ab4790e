"""SH basis conversions (tractfunc.core.shbasis): against DIPY's own basis functions, round trips, the loader's
``sh_basis=`` and the command line's ``--sh-basis`` (a DIPY-basis volume tracks like the original)."""
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import require_philips
from tractfunc import io
from tractfunc.core import sh, shbasis

dipy_shm = pytest.importorskip("dipy.reconst.shm")

DIPY = {"tournier07": (dipy_shm.real_sh_tournier, False), "tournier07_legacy": (dipy_shm.real_sh_tournier, True),
        "descoteaux07": (dipy_shm.real_sh_descoteaux, False),
        "descoteaux07_legacy": (dipy_shm.real_sh_descoteaux, True)}


def _directions(n, seed):
    u = np.random.default_rng(seed).normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u[:2] = [[0, 0, 1], [0, 0, -1]]   # the poles too
    return u


def _dipy_basis(name, lmax, u):
    from dipy.core.geometry import cart2sphere
    f, legacy = DIPY[name]
    _, theta, phi = cart2sphere(*u.T)
    return f(lmax, theta, phi, legacy=legacy)[0]


@pytest.mark.parametrize("lmax", [0, 2, 4, 8, 12])
@pytest.mark.parametrize("name", sorted(DIPY))
def test_same_function_as_dipy_basis(name, lmax):
    """sum_k c_k Y^dipy_k(u) == sum_k to_native(c)_k Y^mrtrix_k(u) on random directions."""
    u = _directions(300, lmax)
    c = np.random.default_rng(1).normal(size=(4, sh.n_coeffs(lmax)))
    f_dipy = c @ _dipy_basis(name, lmax, u).T
    f_native = shbasis.to_native(c, name) @ sh.basis(torch.as_tensor(u), lmax).numpy().T
    np.testing.assert_allclose(f_native, f_dipy, atol=1e-12 * max(1.0, np.abs(f_dipy).max()))


def test_native_basis_is_dipy_tournier07():
    u = _directions(200, 3)
    np.testing.assert_allclose(sh.basis(torch.as_tensor(u), 8).numpy(), _dipy_basis("tournier07", 8, u), atol=1e-12)


@pytest.mark.parametrize("src", shbasis.BASES)
@pytest.mark.parametrize("dst", shbasis.BASES)
def test_round_trip_and_matrix(src, dst):
    c = np.random.default_rng(2).normal(size=(5, 45))
    out = shbasis.convert(c, src, dst)
    np.testing.assert_allclose(shbasis.convert(out, dst, src), c, rtol=1e-15, atol=1e-15)
    M = shbasis.conversion_matrix(8, src, dst)
    np.testing.assert_allclose(out, c @ M.T, rtol=1e-15, atol=0)
    # composing through a third basis is the direct conversion
    np.testing.assert_allclose(shbasis.convert(shbasis.convert(c, src, "tournier07_legacy"), "tournier07_legacy", dst),
                               out, rtol=1e-14, atol=1e-15)


def test_torch_tensor_in_torch_out_with_gradient():
    c = torch.randn(3, 15, dtype=torch.float64, requires_grad=True)
    out = shbasis.to_native(c, "descoteaux07")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_array_equal(out.detach().numpy(), shbasis.to_native(c.detach().numpy(), "descoteaux07"))
    out.sum().backward()
    np.testing.assert_array_equal(c.grad.numpy(), np.broadcast_to(
        shbasis.conversion_matrix(4, "descoteaux07", "mrtrix").sum(0), (3, 15)))
    f32 = shbasis.to_native(np.ones((2, 6), np.float32), "tournier07_legacy")
    assert f32.dtype == np.float32


def test_bad_input():
    with pytest.raises(ValueError, match="unknown SH basis"):
        shbasis.convert(np.zeros(6), "mrtrix", "dipy")
    with pytest.raises(ValueError, match="not an even-degree SH series"):
        shbasis.convert(np.zeros(7), "descoteaux07", "mrtrix")


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return str(path)


def test_load_fod_converts(tmp_path):
    c = np.random.default_rng(4).normal(size=(2, 3, 4, 28)).astype(np.float32)
    p = _write(tmp_path / "d.nii.gz", shbasis.from_native(c, "descoteaux07_legacy"), np.eye(4))
    np.testing.assert_array_equal(io.load_fod(p, sh_basis="descoteaux07_legacy").data, c)
    assert not np.array_equal(io.load_fod(p).data, c)
    with pytest.raises(io.TractfuncError, match="unknown SH basis"):
        io.load_fod(p, sh_basis="fsl")


def _track(fod, out, seeds, *extra):
    """``tractfunc track`` on the native (torch-free) route in a fresh interpreter; returns the streamlines
    and whether torch got imported."""
    code = ("import sys; from tractfunc.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "track", fod, str(out), "--seed-points", seeds,
                        "--rng-seed", "5", "--quiet", "--threads", "1", *extra], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return list(nib.streamlines.load(str(out)).streamlines), "TORCH True" in p.stdout


def test_dipy_basis_volume_tracks_like_the_original(tmp_path):
    """A crop of the Philips FOD, written in each DIPY basis, tracked with --sh-basis: the same streamlines,
    vertex for vertex, as the original (descoteaux07 conversions are exact sign/index permutations); without
    --sh-basis the DIPY volume gives other streamlines.  The native route stays torch-free."""
    paths = require_philips()
    img = nib.load(paths["fod"])
    start, size = np.array([50, 40, 30]), (24, 20, 12)
    data = np.asarray(img.dataobj[tuple(slice(a, a + n) for a, n in zip(start, size))], dtype=np.float32)
    shift = np.eye(4)
    shift[:3, 3] = start
    affine = img.affine @ shift
    orig = _write(tmp_path / "orig.nii.gz", data, affine)
    vox = np.random.default_rng(6).uniform(4, np.array(size) - 5, size=(60, 3))
    pts = vox @ affine[:3, :3].T + affine[:3, 3]
    seeds = str(tmp_path / "seeds.txt")
    np.savetxt(seeds, pts)
    ref, torch_used = _track(orig, tmp_path / "orig.tck", seeds)
    assert not torch_used
    assert len(ref) > 20
    for name in ("descoteaux07", "descoteaux07_legacy"):
        conv = _write(tmp_path / f"{name}.nii.gz", shbasis.from_native(data, name), affine)
        got, torch_used = _track(conv, tmp_path / f"{name}.tck", seeds, "--sh-basis", name)
        assert not torch_used
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    wrong, _ = _track(conv, tmp_path / "wrong.tck", seeds)
    assert len(wrong) != len(ref) or any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(wrong, ref))
