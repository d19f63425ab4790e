"""Stopping rules, each a pure function returning a boolean mask, and the per-streamline reason codes.

Codes follow the order in which ``tckgen`` tests them inside one step; ``CONTINUE`` means none fired.
Whether the vertex that triggered a stop is kept follows ``tckgen``: only ``MAX_LENGTH`` keeps it.
"""
from __future__ import annotations

from enum import IntEnum

import torch

from .arrays import as_tensor
from .interpolate import inside_bounds, nearest_value, to_voxel

Tensor = torch.Tensor


class Reason(IntEnum):
    CONTINUE = 0
    EXIT_IMAGE = 1      # left the FOD image, or reached an all-zero voxel
    CUTOFF = 2          # peak amplitude below the cutoff, or peak search failed (tckgen: "model")
    CURVATURE = 3       # angle between successive directions above the maximum
    EXIT_MASK = 4       # new vertex outside the tracking mask
    MAX_LENGTH = 5      # vertex budget used up (the last vertex is kept)
    SEED_REJECTED = 6   # seed outside mask/image, or no supra-threshold peak at the seed
    ENTER_CGM = 7       # ACT: entered cortical grey matter (the vertex is kept)
    ENTER_CSF = 8       # ACT: entered CSF (the streamline is rejected)
    TERM_IN_SGM = 9     # ACT: stopped inside sub-cortical grey matter
    EXIT_SGM = 10       # ACT: left sub-cortical grey matter (cut at its lowest-amplitude vertex there)
    ENTER_EXCLUDE = 11  # entered an exclusion region (the streamline is rejected)
    ALL_INCLUDE = 12    # entered every include region (tckgen -stop; the vertex is kept)


CONTINUE = int(Reason.CONTINUE)   # plain int for comparisons inside compiled code


def below_cutoff(amp: Tensor, cutoff: float) -> Tensor:
    """(...,) amplitudes -> True where the FOD amplitude is below ``cutoff`` or not finite."""
    amp = as_tensor(amp)
    return ~(torch.isfinite(amp) & (amp >= cutoff))


def too_curved(prev_dir: Tensor, new_dir: Tensor, cos_max_angle: float) -> Tensor:
    """(..., 3) unit directions -> True where their dot product is below ``cos(max angle)``."""
    prev_dir, new_dir = as_tensor(prev_dir), as_tensor(new_dir)
    return (prev_dir * new_dir).sum(-1) < cos_max_angle


def outside_mask(mask: Tensor, world_to_voxel: Tensor, pos: Tensor) -> Tensor:
    """Nearest-voxel mask test.  mask: (X, Y, Z) bool; pos: (..., 3) scanner mm -> (...,) True where the
    nearest voxel is outside the mask grid or zero.  The voxel transform runs in ``pos``'s dtype, as
    MRtrix3 applies its single-precision mask transform to single-precision positions."""
    mask, world_to_voxel, pos = as_tensor(mask), as_tensor(world_to_voxel), as_tensor(pos)
    vox = to_voxel(pos, world_to_voxel.to(pos.dtype))
    return ~nearest_value(mask, vox)


def left_image(nonzero: Tensor, world_to_voxel: Tensor, pos: Tensor) -> Tensor:
    """True where ``pos`` (..., 3) scanner mm is outside the FOD image (voxel coordinate <= -0.5 or
    >= dim - 0.5) or its nearest voxel holds only zeros.  nonzero: (X, Y, Z) bool.  This is the
    complement of ``sample_fod(...).inside``, which the steps use directly."""
    nonzero, world_to_voxel, pos = as_tensor(nonzero), as_tensor(world_to_voxel), as_tensor(pos)
    vox = to_voxel(pos, world_to_voxel.to(torch.float64))
    return ~(inside_bounds(vox, nonzero.shape) & nearest_value(nonzero, vox))


def length_reached(n_vertices: Tensor, max_points: int) -> Tensor:
    """(...,) vertex counts over both halves -> True once ``max_points`` vertices exist."""
    n_vertices = as_tensor(n_vertices)
    return n_vertices >= max_points
