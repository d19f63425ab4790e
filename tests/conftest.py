import os
import shutil

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
PHILIPS = os.path.join(SHARED, "dmri_invivo_philips_achieva_dti32")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(msg):
    """A missing reference tool or dataset: a failure in CI, elsewhere a skip with the reason."""
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def require_tckgen(tool="tckgen"):
    """Parity tests need MRtrix3 (``tool`` from it on PATH)."""
    if shutil.which(tool) is None:
        _missing(f"{tool} (MRtrix3) not on PATH: apt-get install -y mrtrix3")


def require_toshiba():
    """The Toshiba series (one subject, five slice angulations) in ../shared/data."""
    d = os.path.join(os.path.dirname(PHILIPS), "dmri_invivo_toshiba_galan_dti")
    if not os.path.exists(os.path.join(d, "7006_DTI_ortho.nii.gz")):
        _missing(f"Toshiba angulation series not found at {d}")
    return d


def require_philips():
    fod = os.path.join(PHILIPS, "dwi_fod_lmax8.nii.gz")
    if not os.path.exists(fod):
        _missing(f"real data not found at {PHILIPS} (../shared/data next to the checkout)")
    return {"fod": fod, "seed": os.path.join(PHILIPS, "dwi_wmmask_FA0.3.nii.gz"),
            "mask": os.path.join(PHILIPS, "dwi_brainmask.nii.gz"), "5tt": os.path.join(PHILIPS, "dwi_5tt.nii.gz")}


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    from tractfunc.tools.phantom import make_phantom, save_phantom
    d = tmp_path_factory.mktemp("phantom")
    ph = make_phantom()
    paths = save_phantom(ph, str(d / "ph"))
    return ph, paths


@pytest.fixture(scope="session")
def phantom_field(phantom_files):
    from tractfunc.core import field as F, params as P
    from tractfunc import io
    ph, paths = phantom_files
    img = io.load_fod(paths["fod"])
    return dict(ph=ph, img=img, params=P.resolve(img.voxel_sizes),
                field32=F.make_field(torch.as_tensor(img.data), img.affine),
                field64=F.make_field(torch.as_tensor(img.data, dtype=torch.float64), img.affine),
                mask=F.make_mask(torch.as_tensor(ph.mask), ph.affine))


def phantom_seeds(f, n, seed, dtype=torch.float32):
    """n seeds in the phantom's seed mask with random start directions, and the field of ``dtype``:
    (points (n, 3), directions (n, 3), field)."""
    from tractfunc.core import seeds as S
    from tractfunc.core.seeds import random_directions
    g = torch.Generator().manual_seed(seed)
    pts = S.random_in_mask(torch.as_tensor(f["ph"].seed_mask), f["ph"].affine, n, g).to(dtype)
    return pts, random_directions(n, g, dtype), f["field32"] if dtype == torch.float32 else f["field64"]


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def tck_content(path) -> bytes:
    """A .tck file's bytes without what differs between two runs of the same job: the ``command_history``
    (output names), ``timestamp`` and ``file`` (data offset) header lines."""
    raw = open(path, "rb").read()
    end = raw.index(b"\nEND\n") + 5
    keep = [ln for ln in raw[:end].split(b"\n") if not ln.startswith((b"command_history:", b"timestamp:", b"file:"))]
    offset = int(next(ln for ln in raw[:end].split(b"\n") if ln.startswith(b"file:")).split()[-1])
    return b"\n".join(keep) + raw[offset:]


START = (0.3, 0.5, 0.81)   # a fixed start direction (tckgen -seed_direction), not on an axis


def run_cli(*args, check=True):
    """``python -m tractfunc.cli ARGS`` in a subprocess; AssertionError with its stderr on a non-zero exit."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "tractfunc.cli", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def seed_voxel_points(ph, n: int, rng) -> np.ndarray:
    """(n, 3) scanner-mm centres of n distinct voxels of the phantom's seed region, drawn from ``rng``."""
    vox = np.argwhere(ph.seed_mask)[rng.choice(int(ph.seed_mask.sum()), n, replace=False)]
    return vox @ ph.affine[:3, :3].T + ph.affine[:3, 3]


def leftovers(folder) -> list:
    """Temporary or partial files a write could leave behind in ``folder``."""
    return [n for n in os.listdir(folder) if ".~tmp-" in n or n.endswith(".partial")]
