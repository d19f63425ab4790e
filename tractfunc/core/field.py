"""The read-only inputs of tracking: an FOD volume with its geometry, an optional mask and an optional 5TT image."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import sh
from ..errors import TractfuncError
from .arrays import as_tensor
from .interpolate import Sample, sample_fod, to_voxel

Tensor = torch.Tensor


class FODField(NamedTuple):
    """sh: (X, Y, Z, N) SH coefficients (MRtrix3 basis, directions in the scanner frame);
    nonzero: (X, Y, Z) bool, voxels holding any non-zero coefficient; world_to_voxel: (4, 4) float64
    inverse affine; table: Legendre lookup for MRtrix3-exact peaks, or None for exact evaluation;
    voxel_sizes: (3,) mm from the image header (MRtrix3 builds its voxel transform from them), or None
    for the affine's column lengths."""
    sh: Tensor
    nonzero: Tensor
    world_to_voxel: Tensor
    table: Optional[sh.LegendreTable]
    grad_token: Optional[Tensor] = None   # set by track_fixed for the compact FOD backward (fodgrad)
    grad_sink: Optional[object] = None
    voxel_sizes: Optional[tuple] = None

    def sample(self, pos: Tensor) -> Sample:
        """FOD coefficients at scanner points (..., 3) mm -> Sample(values (..., N), inside (...,))."""
        pos = as_tensor(pos)
        if self.grad_sink is None:
            return sample_fod(self.sh, self.nonzero, self.world_to_voxel, pos)
        from . import fodgrad
        vox = to_voxel(pos, self.world_to_voxel.to(torch.float64))
        return fodgrad.sample(self.sh, self.nonzero, vox, self.grad_token, self.grad_sink)


def tracking_field(field: FODField, params) -> FODField:
    """``field`` as every tracker reads it under ``params`` (:class:`tractfunc.core.params.TrackParams`).

    The lookup table is dropped unless ``params.precomputed`` (so ``resolve(..., exact=True)`` alone gives exact
    SH, whatever table the field was built with), and ``sh`` / ``nonzero`` are made C-contiguous, differentiably
    (``Tensor.contiguous`` passes the gradient back to the caller's tensor unchanged): sampling gathers rows of
    ``sh.reshape(-1, N)``, which for any other layout -- a Fortran-ordered ``torch.from_numpy`` of a NIfTI array,
    passed as ``field._replace(sh=leaf)`` -- copies the whole volume at every sample; once here instead."""
    table = field.table if params.precomputed else None
    return field._replace(sh=field.sh.contiguous(), nonzero=field.nonzero.contiguous(), table=table)


class MaskField(NamedTuple):
    """mask: (X, Y, Z) bool; world_to_voxel: (4, 4) float64 inverse affine of the mask image;
    voxel_sizes: as in :class:`FODField`."""
    mask: Tensor
    world_to_voxel: Tensor
    voxel_sizes: Optional[tuple] = None


def make_field(sh_volume: Tensor, affine, precomputed: bool = True, voxel_sizes=None) -> FODField:
    """Build an :class:`FODField` from SH coefficients (X, Y, Z, N) and their (4, 4) voxel->scanner affine.

    ``precomputed=True`` emulates tckgen's Legendre lookup table (its default) for parity; False uses the
    exact pole-safe evaluation.  voxel_sizes: the header's (3,) mm (``io.Image.voxel_sizes``), used by the
    native kernel to build tckgen's voxel transform exactly."""
    sh_volume = as_tensor(sh_volume)
    A = as_tensor(affine).to(dtype=torch.float64, device=sh_volume.device)
    sh_volume = sh_volume.contiguous()   # sampling gathers rows of the flattened volume
    table = sh.LegendreTable(sh.lmax_for(sh_volume.shape[-1]), device=sh_volume.device,
                             dtype=sh_volume.dtype) if precomputed else None
    return FODField(sh_volume, (sh_volume != 0).any(-1).contiguous(), torch.linalg.inv(A), table,
                    voxel_sizes=None if voxel_sizes is None else tuple(float(v) for v in voxel_sizes))


def make_mask(mask_volume: Tensor, affine, voxel_sizes=None) -> MaskField:
    """Mask (X, Y, Z) (non-zero = inside) with its (4, 4) affine -> :class:`MaskField`."""
    mask_volume = as_tensor(mask_volume)
    A = as_tensor(affine).to(dtype=torch.float64, device=mask_volume.device)
    return MaskField((mask_volume != 0).contiguous(), torch.linalg.inv(A),
                     None if voxel_sizes is None else tuple(float(v) for v in voxel_sizes))


class ACTField(NamedTuple):
    """A five-tissue-type (5TT) image for anatomically-constrained tracking (tckgen ``-act``).

    tissues: (X, Y, Z, 5) partial volume fractions, volumes cortical GM, sub-cortical GM, WM, CSF, pathological
    tissue; world_to_voxel: (4, 4) float64 inverse affine of the 5TT image (its own grid); voxel_sizes: as in
    :class:`FODField`; crop_at_gmwmi: tckgen's ``-crop_at_gmwmi`` (a streamline entering cortical GM ends on the
    GM-WM interface, not at its first vertex in GM)."""
    tissues: Tensor
    world_to_voxel: Tensor
    voxel_sizes: Optional[tuple] = None
    crop_at_gmwmi: bool = False


def make_act(tissues: Tensor, affine, voxel_sizes=None, crop_at_gmwmi: bool = False) -> ACTField:
    """5TT volume (X, Y, Z, 5) with its (4, 4) voxel->scanner affine -> :class:`ACTField` (``crop_at_gmwmi``: tckgen's
    ``-crop_at_gmwmi``).

    Raises TractfuncError when the image does not have 5 volumes (MRtrix3's ``5ttcheck`` rule; see
    :func:`tractfunc.io.check_5tt` for the partial-volume sums)."""
    tissues = as_tensor(tissues)
    if tissues.ndim != 4 or tissues.shape[-1] != 5:
        raise TractfuncError(f"a 5TT image has 4 dimensions with 5 volumes (cGM, sGM, WM, CSF, pathological), "
                             f"got shape {tuple(tissues.shape)}")
    A = as_tensor(affine).to(dtype=torch.float64, device=tissues.device)
    return ACTField(tissues.contiguous(), torch.linalg.inv(A),
                    None if voxel_sizes is None else tuple(float(v) for v in voxel_sizes), bool(crop_at_gmwmi))
