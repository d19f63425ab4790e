"""Checks of ``tractfunc track``'s inputs that need no tracking: the seed and streamline limits, and whether any
seed can land inside the FOD's field of view and the mask at all (reading image headers, the seed image and the
mask; not the FOD's data).  Each failure is a one-line :class:`TractfuncError` raised before any work starts.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import io
from ..core import seeds as S
from ..errors import TractfuncError

DEFAULT_SELECT = 5000       # tckgen's -select default
SEEDS_PER_SELECT = 1000     # tckgen's -seeds default: 1000 x select


def limits(a) -> Tuple[int, float]:
    """(select, max_seeds) of a ``--seed-image`` run in tckgen's terms: select 0 = no limit on streamlines,
    max_seeds inf = no limit on seeds.  ``--select`` defaults to 5000, or to 0 when only ``--seeds`` is given;
    ``--seeds`` defaults to 1000 x select; ``--seeds 0`` means no limit.  Both unlimited is an error (tckgen
    would track until killed)."""
    select = a.select if a.select is not None else (0 if a.seeds else DEFAULT_SELECT)
    if a.seeds is None:
        max_seeds = float(SEEDS_PER_SELECT * select) if select else 0.0
    else:
        max_seeds = float(a.seeds) if a.seeds else float("inf")
    if not select and not (0 < max_seeds < float("inf")):
        raise TractfuncError("--select 0 (no limit on streamlines) needs --seeds N > 0; with neither limit tracking "
                             "would never stop")
    return select, max_seeds


def _fod_grid(path: str):
    from ..io.tractogram import reference_grid
    affine, dims = reference_grid(path)   # header only
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise TractfuncError(f"{path}: affine is not invertible; expected a valid voxel-to-scanner transform")
    return affine, dims


def check_track(a) -> None:
    """Seed options of ``track`` (sd_stream and the DIPY-style algorithms): a seed image with a non-zero voxel
    that can reach the FOD's field of view and the mask's non-zero voxels; seed points of which at least one
    can; ``--seeds`` only with ``--seed-image``."""
    check_device(getattr(a, "device", "cpu"))
    finite = a.seed_points or getattr(a, "seed_random_per_voxel", None) or getattr(a, "seed_grid_per_voxel", None)
    if finite and a.seeds is not None:
        raise TractfuncError("--seeds counts seeds drawn from --seed-image / --seed-sphere; with --seed-points and the "
                             "per-voxel seeding every point is a seed (limit the streamlines with --select)")
    if ((a.seed_image or getattr(a, "seed_sphere", None) or getattr(a, "seed_rejection", None)
         or getattr(a, "seed_gmwmi", None))
            and getattr(a, "algorithm", "sd_stream") == "sd_stream"):
        limits(a)   # the DIPY-style algorithms draw --seeds (default 1000) and keep --select of them
    fod_affine, fod_dims = _fod_grid(a.fod)
    check_step(a, fod_affine, fod_dims)
    mask = io.load_mask(a.mask) if getattr(a, "mask", None) else None
    fov = np.ones(tuple(fod_dims), dtype=bool)
    if a.seed_image:
        seed = io.load_mask(a.seed_image)
        if not seed.data.any():
            raise TractfuncError(f"{a.seed_image}: seed image has no non-zero voxel; expected a non-empty seed region")
        vox = S.seed_voxels(seed.data)
        ok = S.reachable(vox, seed.affine, fov, fod_affine, margin=0.0)
        if not ok.any():
            raise TractfuncError(f"{a.seed_image}: none of its {len(vox)} seed voxels lies inside the FOD's field of "
                                 f"view ({a.fod}); expected a seed image overlapping the FOD (same space)")
        if mask is not None and not S.reachable(vox[ok], seed.affine, mask.data, mask.affine).any():
            raise TractfuncError(f"{a.seed_image}: no seed voxel lies inside the mask {a.mask}; expected seeds "
                                 "that overlap the mask's non-zero voxels")
    elif a.seed_points:
        pts = io.read_seed_points(a.seed_points)
        inside = S.points_reach(pts, fov, fod_affine, margin=0.5)
        if not inside.any():
            raise TractfuncError(f"{a.seed_points}: all {len(pts)} seed points lie outside the FOD's field of view "
                                 f"({a.fod}); expected scanner-mm points inside it")
        if mask is not None and not S.points_reach(pts[inside], mask.data, mask.affine).any():
            raise TractfuncError(f"{a.seed_points}: no seed point lies inside the mask {a.mask}; expected points in "
                                 "its non-zero voxels")


def position_resolution(affine, dims, float64: bool = False) -> Tuple[float, float]:
    """(spacing of float32 (or float64) numbers at the largest |coordinate| of the image's field of view, that
    coordinate) in mm: a step below the spacing cannot move a position stored in that precision."""
    corners = np.array([[i, j, k] for i in (-0.5, dims[0] - 0.5) for j in (-0.5, dims[1] - 0.5)
                        for k in (-0.5, dims[2] - 0.5)])
    A = np.asarray(affine, dtype=np.float64)
    far = float(np.abs(corners @ A[:3, :3].T + A[:3, 3]).max())
    return float(np.spacing(np.float64(far) if float64 else np.float32(far))), far


def check_step(a, affine, dims) -> None:
    """--step must be able to move a position: at least the spacing of the state's floating-point numbers at
    the far end of the FOD's field of view (float32 unless --dtype and --state-dtype are float64).  Below it
    every step rounds back to where it started and each streamline would only end at its length limit."""
    if getattr(a, "step", None) is None:
        return
    wide = getattr(a, "dtype", "float32") == "float64" and getattr(a, "state_dtype", "float32") == "float64"
    res, far = position_resolution(affine, dims, wide)
    if a.step < res:
        raise TractfuncError(f"--step {a.step:g} mm is below the {'float64' if wide else 'float32'} resolution of "
                             f"positions in this FOD's field of view ({res:.3g} mm at {far:.0f} mm from the origin); "
                             f"expected a step of at least {res:.3g} mm")


def check_device(name: str) -> None:
    """--device: a torch device that exists on this machine (torch is imported only for a device other than
    the CPU)."""
    if name == "cpu":
        return
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise TractfuncError(f"--device {name}: not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise TractfuncError(f"--device {name}: no CUDA device is available here; expected --device cpu")
        if dev.index is not None and dev.index >= n:
            raise TractfuncError(f"--device {name}: this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TractfuncError(f"--device {name}: MPS is not available here; expected --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise TractfuncError(f"--device {name}: unsupported device type {dev.type!r}; expected cpu, cuda or mps")
