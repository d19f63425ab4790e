"""Shared inputs of the tests/maps tests (imported by them; a second conftest.py would clash with tests/conftest.py):
a small tckgen tractogram on the Philips data, generated once per session, and a small synthetic grid with
random smooth streamlines."""
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import PHILIPS, require_philips, require_tckgen

N_PARITY = 500   # streamlines of the parity tractogram (tckgen SD_Stream, fixed -seed)


def mrtrix(*args):
    """Run an MRtrix3 command quietly on one thread (fixed random seed); AssertionError with its stderr on failure."""
    p = subprocess.run([*args, "-quiet", "-force", "-nthreads", "0"], capture_output=True, text=True,
                       env={**os.environ, "MRTRIX_RNG_SEED": "1"})
    assert p.returncode == 0, f"{args[0]} failed: {p.stderr}"


_CACHE = {}


@pytest.fixture(scope="session")
def philips_tck(tmp_path_factory):
    """{'tck': 500 tckgen SD_Stream streamlines, 'weights': random weights (text), 'dir': their folder, 'fa',
    '5tt', 'fod', 'seed', 'mask': data paths}; made once per session (modules importing it share the files)."""
    data = require_philips()
    require_tckgen("tckgen")
    if "philips" in _CACHE:
        return _CACHE["philips"]
    _CACHE["philips"] = make_tractogram(str(tmp_path_factory.mktemp("maps")), N_PARITY, data)
    return _CACHE["philips"]


def make_tractogram(folder: str, n: int, data: dict, seed: int = 0) -> dict:
    """n tckgen SD_Stream streamlines on the Philips data and n random weights in [0.1, 3] in ``folder``:
    {'tck', 'weights', 'dir', 'fa', '5tt', 'fod', 'seed', 'mask'} paths."""
    tck, w = os.path.join(folder, "t.tck"), os.path.join(folder, "w.txt")
    mrtrix("tckgen", "-algorithm", "SD_Stream", data["fod"], tck, "-seed_image", data["seed"], "-mask", data["mask"],
           "-select", str(n))
    np.savetxt(w, np.random.default_rng(seed).uniform(0.1, 3.0, n))
    return {"tck": tck, "weights": w, "dir": folder, "fa": os.path.join(PHILIPS, "dwi_FA.nii.gz"),
            "5tt": os.path.join(PHILIPS, "dwi_5tt.nii.gz"), **data}


GRID_AFFINE = np.array([[-1.5, 0, 0, 12.0], [0, 1.5, 0, -4.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1.0]])
GRID_DIMS = (10, 10, 8)


def random_tracks(n, seed=0, dtype=torch.float64, jitter=0.02):
    """n random smooth streamlines (2 to 40 vertices, 0.3 mm steps) inside GRID: (vertices (V, 3), lengths (n,))."""
    rng = np.random.default_rng(seed)
    vs, ls = [], []
    for _ in range(n):
        L = int(rng.integers(2, 40))
        p0 = GRID_AFFINE[:3, :3] @ (rng.uniform(0, 1, 3) * (np.array(GRID_DIMS) - 1)) + GRID_AFFINE[:3, 3]
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        steps = d * 0.3 + jitter * rng.normal(size=(L, 3))
        vs.append(p0 + np.cumsum(steps, 0))
        ls.append(L)
    return torch.tensor(np.concatenate(vs).astype(np.float32), dtype=dtype), torch.tensor(ls)


def parcellation(files) -> str:
    """A parcellation on the Philips grid (cortical grey matter of the 5TT image cut into blocks, labels 1..32,
    deep grey matter 33..48; some labels absent), written once next to the parity tractogram."""
    import nibabel as nib
    path = os.path.join(files["dir"], "parc.nii.gz")
    if not os.path.exists(path):
        t = nib.load(files["5tt"])
        d = np.asarray(t.dataobj)
        X, Y, Z = d.shape[:3]
        ix, iy, iz = np.meshgrid(np.arange(X) * 4 // X, np.arange(Y) * 4 // Y, np.arange(Z) * 2 // Z, indexing="ij")
        lab = np.zeros((X, Y, Z), np.uint32)
        gm, deep = d[..., 0] > 0.5, d[..., 1] > 0.5
        lab[gm] = (1 + ix + 4 * iy + 16 * iz)[gm]
        lab[deep] = (33 + ix + 4 * iy)[deep]
        nib.save(nib.Nifti1Image(lab, t.affine, t.header), path)
    return path
