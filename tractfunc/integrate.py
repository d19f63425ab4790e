"""Integration steps: one propagation step of every streamline in a batch, as pure functions.

``sd_next`` is SD_Stream's elementary move: sample the FOD at ``pos``, refine the peak from ``dir``, test
the cutoff and the angle, move ``step`` mm along the peak.  ``euler`` and ``rk4`` wrap it the way ``tckgen``
does (``-rk4``: four stage peaks, a weighted mean direction, then a peak at the new point for the angle
test between the first stage and it).  Positions are (B, 3) scanner mm, directions (B, 3) unit.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import stop
from .direction import peak
from .field import FODField, MaskField
from .params import TrackParams
from .stop import CONTINUE, Reason

Tensor = torch.Tensor


class Move(NamedTuple):
    """pos: (B, 3) new position (unchanged where stopped); dir: (B, 3) direction carried to the next step;
    reason: (B,) int64 :class:`Reason` (CONTINUE where the move happened); amp: (B,) peak amplitude."""
    pos: Tensor
    dir: Tensor
    reason: Tensor
    amp: Tensor


def _code(code: Reason, like: Tensor) -> Tensor:
    return torch.full(like.shape[:-1], int(code), dtype=torch.long, device=like.device)


def find_peak(field: FODField, pos: Tensor, dir: Tensor, early_exit: bool = False):
    """Sample the FOD at ``pos`` and refine the peak from ``dir``.

    Returns (peak_dir (B, 3), amp (B,), inside (B,)).  Where outside the image, amp is NaN."""
    s = field.sample(pos)
    p = peak(s.values, dir, field.table, early_exit=early_exit)
    amp = torch.where(s.inside, p.amp, torch.full_like(p.amp, float("nan")))
    return p.dir, amp, s.inside


def sd_next(field: FODField, params: TrackParams, pos: Tensor, dir: Tensor, early_exit: bool = False) -> Move:
    """SD_Stream ``next``: peak at ``pos`` from ``dir``; stop on image exit, cutoff or angle; else move."""
    new_dir, amp, inside = find_peak(field, pos, dir, early_exit)
    reason = torch.where(~inside, _code(Reason.EXIT_IMAGE, pos),
             torch.where(stop.below_cutoff(amp, params.cutoff), _code(Reason.CUTOFF, pos),
             torch.where(stop.too_curved(dir, new_dir, params.cos_angle_step), _code(Reason.CURVATURE, pos),
                         _code(Reason.CONTINUE, pos))))
    go = (reason == CONTINUE).unsqueeze(-1)
    safe_dir = torch.where(go, new_dir, dir)
    return Move(torch.where(go, pos + safe_dir * params.step, pos), safe_dir, reason, amp)


def _merge(first: Tensor, second: Tensor) -> Tensor:
    """Keep the first non-CONTINUE reason."""
    return torch.where(first != CONTINUE, first, second)


def euler(field: FODField, params: TrackParams, pos: Tensor, dir: Tensor, early_exit: bool = False) -> Move:
    """First-order step (tckgen default): direction at the current point, then move."""
    return sd_next(field, params, pos, dir, early_exit)


def rk4(field: FODField, params: TrackParams, pos: Tensor, dir: Tensor, early_exit: bool = False) -> Move:
    """Fourth-order Runge-Kutta step exactly as tckgen ``-rk4`` composes SD_Stream's ``next``."""
    h = params.step
    m1 = sd_next(field, params, pos, dir, early_exit)
    d1 = m1.dir
    m2 = sd_next(field, params, pos + d1 * (0.5 * h), dir, early_exit)
    d2 = m2.dir
    m3 = sd_next(field, params, pos + d2 * (0.5 * h), dir, early_exit)
    d3 = m3.dir
    d23 = d2 + d3
    m4 = sd_next(field, params, pos + d3 * h, d23 / torch.linalg.vector_norm(d23, dim=-1, keepdim=True), early_exit)
    d4 = m4.dir
    mean = d1 + d2 * 2.0 + d3 * 2.0 + d4
    final_dir = mean / torch.linalg.vector_norm(mean, dim=-1, keepdim=True)
    final_pos = pos + final_dir * h
    m5 = sd_next(field, params, final_pos, final_dir, early_exit)
    reason = _merge(m1.reason, _merge(m2.reason, _merge(m3.reason, _merge(m4.reason, m5.reason))))
    curved = (reason == CONTINUE) & stop.too_curved(d1, m5.dir, params.cos_angle_rk4)
    reason = torch.where(curved, _code(Reason.CURVATURE, pos), reason)
    go = (reason == CONTINUE).unsqueeze(-1)
    return Move(torch.where(go, final_pos, pos), torch.where(go, final_dir, dir), reason, m1.amp)


def iterate(field: FODField, params: TrackParams, mask: Optional[MaskField], pos: Tensor, dir: Tensor,
            early_exit: bool = False) -> Move:
    """One tckgen ``iterate``: an Euler or RK4 step, then the tracking-mask test on the new vertex."""
    m = (rk4 if params.rk4 else euler)(field, params, pos, dir, early_exit)
    if mask is None:
        return m
    out = (m.reason == CONTINUE) & stop.outside_mask(mask.mask, mask.world_to_voxel, m.pos)
    return m._replace(reason=torch.where(out, _code(Reason.EXIT_MASK, pos), m.reason))
