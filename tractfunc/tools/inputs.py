"""Tracking inputs from command-line arguments: the FOD and mask images loaded and checked, the resolved
:class:`tractfunc.core.params.TrackParams`, and the fields or native kernel built from them.

Shared by the command line and the worker processes of :mod:`tractfunc.tools.workers` (which load the
inputs once each from the same arguments). ``a`` is the ``argparse.Namespace`` of ``tractfunc track``
(fields ``fod``, ``mask``, optional ``act``, ``rk4``, ``step``, ``angle``, ``cutoff``, ``min_length``, ``max_length``,
``exact_sh``, ``state_dtype``, optional ``sh_basis``).
"""
from __future__ import annotations

import numpy as np

from .. import io
from ..core import params as P
from ..errors import TractfuncError


def state_dtype(name):
    """--state-dtype -> TrackParams.state_dtype: tckgen's float32 state, or None (the --dtype's precision)."""
    import torch
    return torch.float32 if name == "float32" else None


def load_inputs(a, native: bool = False):
    """(FOD image, resolved params, mask image or None), validated (one-line errors).
    native: the FOD stays in its file layout (the kernel repacks it) and its finiteness is checked there."""
    fod = io.load_fod(a.fod, check_finite=not native, sh_basis=getattr(a, "sh_basis", "mrtrix"))
    prm = P.resolve(fod.voxel_sizes, rk4=a.rk4, step=a.step, angle=a.angle, cutoff=a.cutoff,
                    min_length=a.min_length, max_length=a.max_length, precomputed=not a.exact_sh,
                    state_dtype=None if native else state_dtype(a.state_dtype), act=bool(getattr(a, "act", None)))
    mask = None
    if a.mask:
        mask = io.load_mask(a.mask)
        if not io.same_grid(mask, fod):
            raise TractfuncError(f"{a.mask}: mask grid {mask.data.shape} does not match the FOD grid "
                                 f"{fod.data.shape[:3]} (same dimensions and affine expected)")
    return fod, prm, mask


def torch_inputs(a, dtype, device):
    """(FOD image, params, FODField, MaskField or None) for the PyTorch tracker, in ``dtype`` on ``device``."""
    import torch
    from ..core import field as F
    fod, prm, mask = load_inputs(a)
    fld = F.make_field(torch.as_tensor(fod.data, dtype=dtype, device=device), fod.affine, precomputed=not a.exact_sh,
                       voxel_sizes=fod.voxel_sizes)
    msk = (F.make_mask(torch.as_tensor(mask.data, device=device), mask.affine, mask.voxel_sizes)
           if mask is not None else None)
    return fod, prm, fld, msk


def load_act(a) -> "io.Image | None":
    """The 5TT image of ``--act`` (checked as 5ttcheck does), or None."""
    return io.load_5tt(a.act) if getattr(a, "act", None) else None


def act_field(a, device):
    """The :class:`tractfunc.core.field.ACTField` of ``--act`` on ``device``, or None."""
    import torch
    from ..core import field as F
    tt = load_act(a)
    return None if tt is None else F.make_act(torch.as_tensor(tt.data, device=device), tt.affine, tt.voxel_sizes,
                                              bool(getattr(a, "crop_at_gmwmi", False)))


def _region(spec: str, what: str, fod: "io.Image"):
    """One ROI of the command line: ``x,y,z,r`` (a sphere, scanner mm) or an image path -> (region, overlaps the
    FOD image)."""
    from ..sdstream.native import ImageRegion, Sphere
    parts = spec.split(",")
    if len(parts) == 4:
        try:
            x, y, z, r = (float(v) for v in parts)
        except ValueError:
            raise TractfuncError(f"{what} {spec!r}: expected x,y,z,r (mm) or an image") from None
        if not (np.isfinite([x, y, z, r]).all() and r >= 0):
            raise TractfuncError(f"{what} {spec!r}: expected a finite centre and a radius >= 0 mm")
        lo, hi = _fod_box(fod)
        return Sphere((x, y, z), r), bool(np.all(np.array([x, y, z]) + r >= lo) and np.all(np.array([x, y, z]) - r <= hi))
    m = io.load_mask(spec)
    pts = np.argwhere(m.data) @ m.affine[:3, :3].T + m.affine[:3, 3]
    vox = (pts - fod.affine[:3, 3]) @ np.linalg.inv(fod.affine[:3, :3]).T
    inside = np.all((vox > -0.5) & (vox < np.array(fod.data.shape[:3]) - 0.5), axis=1)
    return ImageRegion(m.data, m.affine, m.voxel_sizes), bool(inside.any())


def _fod_box(fod: "io.Image"):
    """The scanner-mm bounding box (lo (3,), hi (3,)) of the FOD image's field of view."""
    corners = np.array([[i, j, k] for i in (-0.5, fod.data.shape[0] - 0.5) for j in (-0.5, fod.data.shape[1] - 0.5)
                        for k in (-0.5, fod.data.shape[2] - 0.5)])
    pts = corners @ fod.affine[:3, :3].T + fod.affine[:3, 3]
    return pts.min(0), pts.max(0)


def load_regions(a, fod: "io.Image"):
    """tckgen's ROIs from ``--include``, ``--include-ordered``, ``--exclude``, ``--stop``, ``--seed-unidirectional``
    -> :class:`tractfunc.sdstream.native.Regions`, or None when none is given.  An include region outside the FOD
    image (no streamline could reach it) is an error; an exclude region outside it, or --stop without include
    regions, a warning (tckgen ignores -stop then)."""
    import sys
    from ..sdstream.native import Regions, check_regions
    names = (("include", "--include"), ("include_ordered", "--include-ordered"), ("exclude", "--exclude"))
    specs = {k: list(getattr(a, k, None) or []) for k, _ in names}
    uni, stop = bool(getattr(a, "seed_unidirectional", False)), bool(getattr(a, "stop", False))
    if not any(specs.values()) and not uni and not stop:
        return None
    found = {}
    for key, flag in names:
        found[key] = []
        for spec in specs[key]:
            region, overlaps = _region(spec, flag, fod)
            if not overlaps and key != "exclude":
                raise TractfuncError(f"{flag} {spec}: the region does not overlap the FOD image; no streamline can "
                                     "reach it")
            if not overlaps:
                sys.stderr.write(f"tractfunc track: warning: {flag} {spec} does not overlap the FOD image\n")
            found[key].append(region)
    if stop and not (found["include"] or found["include_ordered"]):
        sys.stderr.write("tractfunc track: warning: --stop ignored: no include regions\n")
        stop = False
    regions = Regions(tuple(found["include"]), tuple(found["include_ordered"]), tuple(found["exclude"]), stop, uni)
    check_regions(regions)
    return regions


def native_kernel(a, threads: int):
    """(FOD image, params, :class:`tractfunc.sdstream.native.Kernel`) -- no torch import. The returned image
    keeps the FOD's grid (for headers) but not its memory: the kernel holds its own copy."""
    from ..sdstream import native
    fod, prm, mask = load_inputs(a, native=True)
    sh, nz, bad = native.prepare_volume(fod.data, threads)
    if bad:
        raise io.nonfinite_error(a.fod, bad)
    k = native.Kernel(sh, fod.affine, prm, nz, None if mask is None else mask.data,
                      None if mask is None else mask.affine, threads, fod.voxel_sizes,
                      None if mask is None else mask.voxel_sizes, *(load_act(a) or (None, None, None)),
                      load_regions(a, fod), crop_at_gmwmi=bool(getattr(a, "crop_at_gmwmi", False)))
    return fod._replace(data=np.broadcast_to(np.float32(0), fod.data.shape)), prm, k
