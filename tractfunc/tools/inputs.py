"""Tracking inputs from command-line arguments: the FOD and mask images loaded and checked, the resolved
:class:`tractfunc.core.params.TrackParams`, and the fields or native kernel built from them.

Shared by the command line and the worker processes of :mod:`tractfunc.tools.workers` (which load the
inputs once each from the same arguments). ``a`` is the ``argparse.Namespace`` of ``tractfunc track``
(fields ``fod``, ``mask``, ``rk4``, ``step``, ``angle``, ``cutoff``, ``min_length``, ``max_length``,
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
                    state_dtype=None if native else state_dtype(a.state_dtype))
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
                      None if mask is None else mask.voxel_sizes)
    return fod._replace(data=np.broadcast_to(np.float32(0), fod.data.shape)), prm, k
