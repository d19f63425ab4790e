"""Per-streamline Jacobians of vertex positions, for a whole batch at once (no loop over streamlines).

Streamlines are independent, so the Jacobian of all vertices (B, V, 3) with respect to all seeds (B, 3)
is block diagonal.  Pushing the tangent ``e_k`` at every seed at once (forward mode, :func:`torch.func.jvp`)
gives column ``k`` of every block; ``vmap`` over the three tangents gives the whole (B, V, 3, 3) stack in
one batched pass.  Padding vertices (``valid`` False) carry meaningless columns; mask them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.arrays import as_tensor
from ..core.field import FODField, MaskField
from ..core.params import TrackParams
from .fixed import track_fixed

Tensor = torch.Tensor


def _columns(fn, x: Tensor) -> Tensor:
    """fn: (B, 3) -> (B, V, 3) with independent rows; x: (B, 3) -> (B, V, 3, 3), [b, v, i, k] = d out_bvi / d x_bk."""
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    tangents = eye.unsqueeze(1).expand(3, x.shape[0], 3)
    cols = torch.func.vmap(lambda t: torch.func.jvp(fn, (x,), (t,))[1])(tangents)   # (3, B, V, 3)
    return cols.permute(1, 2, 3, 0)


def seed_jacobian(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Tensor, n_steps: int,
                  mask: Optional[MaskField] = None, temperature: Optional[float] = None) -> Tensor:
    """d vertices / d seed for each streamline: (B, 2T+1, 3, 3), ``[b, v, i, k] = d x_bvi / d s_bk``.

    seeds: (B, 3) scanner mm; init_dirs: (B, 3) unit; vertices as in :func:`track_fixed` (packed, mm).
    The seed vertex row is the identity.  Read rows only where ``track_fixed(...).valid``."""
    seeds, init_dirs = as_tensor(seeds), as_tensor(init_dirs)
    return _columns(lambda s: track_fixed(field, params, s, init_dirs, n_steps, mask, temperature).vertices,
                    seeds)


def direction_jacobian(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Tensor,
                       n_steps: int, mask: Optional[MaskField] = None) -> Tensor:
    """d vertices / d initial direction: (B, 2T+1, 3, 3).  Tracking starts from the FOD peak reached from
    the initial direction, which does not move when the direction moves inside its basin of attraction
    (implicit function theorem), so this is zero except on basin boundaries, where it does not exist."""
    seeds, init_dirs = as_tensor(seeds), as_tensor(init_dirs)
    return _columns(lambda d: track_fixed(field, params, seeds, d, n_steps, mask).vertices, init_dirs)
