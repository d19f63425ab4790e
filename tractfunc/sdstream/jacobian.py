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
from ..core.tracks import Tracks

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


def seed_jacobian_packed(field: FODField, params: TrackParams, seeds: Tensor, init_dirs: Optional[Tensor] = None, *,
                         mask: Optional[MaskField] = None, generator: Optional[torch.Generator] = None):
    """The follow engine's streamlines and each vertex's Jacobian with respect to its seed, packed: the fast path
    (C, forward propagation of every step's 3 x 3 Jacobian; :mod:`tractfunc.sdstream.fused`).

    Args:
        field, params: as :func:`tractfunc.track` (CPU, lmax <= 12, tckgen's settings in float32 or exact peaks).
        seeds: (S, 3) scanner mm; init_dirs: (S, 3) start directions of the seed peak searches, or None for random
            ones from ``generator``; mask: optional tracking mask.
    Returns:
        (:class:`tractfunc.Tracks` (engine "follow", detached), J (V, 3, 3) in the field's dtype, mm per mm, with
        ``J[v, i, k] = d x_vi / d s_k`` for the seed s of vertex v's streamline; the identity at seed vertices).
        Plain tensors only: the kernel is not traced, so under ``torch.func`` transforms or ``torch.compile`` use
        :func:`seed_jacobian` (fixed shapes) instead.
    Raises:
        TractfuncError: where the fused engine cannot run (use :func:`seed_jacobian` on the fixed engine).
    """
    from ..core.field import tracking_field
    from ..core.seeds import random_directions
    from ..errors import TractfuncError
    from . import fused, native
    from .step import check_inputs
    from .track import decision_kernel
    seeds = as_tensor(seeds)
    check_inputs(field, seeds, init_dirs)
    field = tracking_field(field, params)
    if not (fused.applies(field, params) and native.available()[0]):
        raise TractfuncError("seed_jacobian_packed runs the fused follow engine: the CPU, lmax <= 12, float32 with "
                             "tckgen's settings or exact peaks (resolve(..., exact=True)); use seed_jacobian")
    if init_dirs is None:
        init_dirs = random_directions(seeds.shape[0], generator, seeds.dtype, seeds.device)
    kernel = decision_kernel(field, params, mask)
    with torch.no_grad():
        out, J = fused.seed_jacobian_fused(field, params, kernel, seeds, as_tensor(init_dirs))
    return Tracks(*out, None, "follow"), J
