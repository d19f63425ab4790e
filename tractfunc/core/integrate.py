"""Integration steps: one propagation step of every streamline in a batch, as pure functions.

``sd_next`` is SD_Stream's elementary move: sample the FOD at ``pos``, refine the peak from ``dir``, test
the cutoff and the angle, move ``step`` mm along the peak.  ``euler`` and ``rk4`` wrap it the way ``tckgen``
does (``-rk4``: four stage peaks, a weighted mean direction, then a peak at the new point for the angle
test between the first stage and it).  Positions are (B, 3) scanner mm, directions (B, 3) unit.

Gradients: the peak search runs on detached inputs and its derivative is grafted on by the implicit
function theorem (:mod:`tractfunc.core.implicit`), so nothing of the Newton iterations is stored.  Every move
also reports its stopping margins (amplitude above cutoff, cosine above the angle limit), which soft
termination (``soft=True``) turns into survival weights instead of hard stops.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import stop
from .arrays import as_tensor
from .newton import peak, store
from .sphere import fibonacci_sphere
from .implicit import attach_peak
from .field import FODField, MaskField
from .params import TrackParams
from .stop import CONTINUE, Reason
from .tracing import needs_grad

Tensor = torch.Tensor


class Move(NamedTuple):
    """pos: (B, 3) new position (unchanged where stopped); dir: (B, 3) direction carried to the next step;
    reason: (B,) int64 :class:`Reason` (CONTINUE where the move happened); amp: (B,) peak amplitude;
    amp_margin: (B,) amplitude minus cutoff (smallest over RK4 stages); cos_margin: (B,) cosine of the
    turn minus the cosine of the angle limit (NaN-free: 0 where the peak search failed)."""
    pos: Tensor
    dir: Tensor
    reason: Tensor
    amp: Tensor
    amp_margin: Tensor
    cos_margin: Tensor


def _code(code: Reason, like: Tensor) -> Tensor:
    return torch.full(like.shape[:-1], int(code), dtype=torch.long, device=like.device)


def find_peak(field: FODField, pos: Tensor, dir: Tensor, early_exit: bool = False, polish: int = 0,
              state_dtype: Optional[torch.dtype] = None):
    """Sample the FOD at ``pos`` and refine the peak from ``dir`` (``polish`` exact Newton iterations
    appended; samples and iterates rounded to ``state_dtype``, see :func:`tractfunc.core.newton.store`).
    Derivatives wrt the FOD and ``pos`` follow the implicit function theorem.

    Returns (peak_dir (B, 3), amp (B,), inside (B,)).  Where outside the image, amp is NaN."""
    s = field.sample(pos)
    c = store(s.values, state_dtype)
    if needs_grad(c):
        p = peak(c.detach(), dir.detach(), field.table, early_exit=early_exit, polish_iter=polish,
                 state_dtype=state_dtype)
        p = attach_peak(c, p.dir, p.amp)
    else:
        p = peak(c, dir, field.table, early_exit=early_exit, polish_iter=polish, state_dtype=state_dtype)
    amp = torch.where(s.inside, store(p.amp, state_dtype), torch.full_like(p.amp, float("nan")))
    return p.dir, amp, s.inside


def strongest_peak(field: FODField, seeds: Tensor, n_starts: int = 64, polish: int = 0) -> Tensor:
    """The strongest FOD peak at each seed: Newton searches from ``n_starts`` directions spread evenly over the
    sphere (a Fibonacci lattice, so the result is deterministic), keeping the highest amplitude.

    Args:
        field: the FOD; seeds: (S, 3) scanner mm; n_starts: searches per seed; polish: exact Newton iterations
            appended to each search (:func:`tractfunc.core.newton.polish`).
    Returns:
        (S, 3) unit directions in the seeds' dtype (detached: use them as ``init_dirs``, the tracker's own seed
        peak search then differentiates the start); a seed outside the image or without a converged peak gets
        the first lattice direction.
    """
    starts = fibonacci_sphere(n_starts, seeds.dtype, seeds.device)   # (n, 3)
    with torch.no_grad():
        c = field.sample(seeds.detach()).values                                             # (S, N)
        S = c.shape[0]
        cs = c.unsqueeze(1).expand(S, n_starts, c.shape[-1]).reshape(-1, c.shape[-1])
        p = peak(cs, starts.repeat(S, 1), field.table, early_exit=True, polish_iter=polish)
        amp = p.amp.reshape(S, n_starts).nan_to_num(float("-inf"))
        best = amp.argmax(1)
        d = p.dir.reshape(S, n_starts, 3)[torch.arange(S, device=seeds.device), best]
    return torch.where(torch.isfinite(d).all(-1, keepdim=True), d, starts[:1].expand_as(d))


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def sd_next(field: FODField, params: TrackParams, pos: Tensor, dir: Tensor, early_exit: bool = False,
            soft: bool = False) -> Move:
    """SD_Stream ``next``: peak at ``pos`` from ``dir``; stop on image exit, cutoff or angle; else move.

    soft: cutoff and angle no longer stop (their margins are reported for survival weights); only
    leaving the image and a failed peak search (non-finite amplitude) stop."""
    pos, dir = as_tensor(pos), as_tensor(dir)
    new_dir, amp, inside = find_peak(field, pos, dir, early_exit, params.peak_polish, params.state_dtype)
    return sd_move(params, pos, dir, new_dir, amp, inside, soft)


def sd_move(params: TrackParams, pos: Tensor, dir: Tensor, new_dir: Tensor, amp: Tensor, inside: Tensor,
            soft: bool = False) -> Move:
    """The decision half of ``sd_next``, given the peak: stop tests, then move ``params.step`` mm.

    pos: (B, 3) scanner mm; dir: (B, 3) incoming unit direction; new_dir: (B, 3) peak found from it (NaN
    where the search failed); amp: (B,) its amplitude; inside: (B,) bool, ``pos`` inside the image."""
    cos = (dir * torch.where(torch.isfinite(new_dir), new_dir, torch.zeros_like(new_dir))).sum(-1)
    if soft:
        reason = torch.where(~inside, _code(Reason.EXIT_IMAGE, pos),
                 torch.where(~torch.isfinite(amp), _code(Reason.CUTOFF, pos), _code(Reason.CONTINUE, pos)))
    else:
        reason = torch.where(~inside, _code(Reason.EXIT_IMAGE, pos),
                 torch.where(stop.below_cutoff(amp, params.cutoff), _code(Reason.CUTOFF, pos),
                 torch.where(stop.too_curved(*_narrow(params.state_dtype, dir, new_dir), params.cos_angle_step),
                             _code(Reason.CURVATURE, pos),
                             _code(Reason.CONTINUE, pos))))
    go = (reason == CONTINUE).unsqueeze(-1)
    safe_dir = torch.where(go, new_dir, dir)
    new_pos = in_state(params.state_dtype, lambda p, d: p + d * params.step, pos, safe_dir)
    return Move(torch.where(go, new_pos, pos), safe_dir, reason, amp,
                _finite_or_zero(amp - params.cutoff), _finite_or_zero(cos - params.cos_angle_step))


def in_state(state_dtype: Optional[torch.dtype], f, *xs: Tensor) -> Tensor:
    """Evaluate a small vector update ``f(*xs)`` (moving a position, combining directions) in the state
    dtype, as tckgen does its bookkeeping in float32, and return it in the compute dtype.  Plain
    ``f(*xs)`` when ``state_dtype`` is None or not narrower.  Casts are differentiable."""
    if state_dtype is None or torch.finfo(state_dtype).bits >= torch.finfo(xs[0].dtype).bits:
        return f(*xs)
    return f(*(x.to(state_dtype) for x in xs)).to(xs[0].dtype)


def _narrow(state_dtype: Optional[torch.dtype], *xs: Tensor):
    """The inputs of a stop decision in the state dtype (tckgen compares float32 dot products)."""
    if state_dtype is None or torch.finfo(state_dtype).bits >= torch.finfo(xs[0].dtype).bits:
        return xs
    return tuple(x.to(state_dtype) for x in xs)


def unit(v: Tensor) -> Tensor:
    """(..., 3) vectors scaled to unit length (no guard: a zero vector gives NaN)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _merge(first: Tensor, second: Tensor) -> Tensor:
    """Keep the first non-CONTINUE reason."""
    return torch.where(first != CONTINUE, first, second)


def euler(field: FODField, params: TrackParams, pos: Tensor, dir: Tensor, early_exit: bool = False,
          soft: bool = False) -> Move:
    """First-order step (tckgen default): direction at the current point, then move."""
    return sd_next(field, params, pos, dir, early_exit, soft)


def rk4(field: FODField, params: TrackParams, pos: Tensor, dir: Tensor, early_exit: bool = False,
        soft: bool = False) -> Move:
    """Fourth-order Runge-Kutta step exactly as tckgen ``-rk4`` composes SD_Stream's ``next``."""
    pos, dir = as_tensor(pos), as_tensor(dir)
    h, sd = params.step, params.state_dtype
    m1 = sd_next(field, params, pos, dir, early_exit, soft)
    d1 = m1.dir
    m2 = sd_next(field, params, in_state(sd, lambda p, d: p + d * (0.5 * h), pos, d1), dir, early_exit, soft)
    d2 = m2.dir
    m3 = sd_next(field, params, in_state(sd, lambda p, d: p + d * (0.5 * h), pos, d2), dir, early_exit, soft)
    d3 = m3.dir
    m4 = sd_next(field, params, in_state(sd, lambda p, d: p + d * h, pos, d3),
                 in_state(sd, lambda a, b: unit(a + b), d2, d3), early_exit, soft)
    d4 = m4.dir
    final_dir = in_state(sd, lambda a, b, c, d: unit(a + b * 2.0 + c * 2.0 + d), d1, d2, d3, d4)
    final_pos = in_state(sd, lambda p, d: p + d * h, pos, final_dir)
    m5 = sd_next(field, params, final_pos, final_dir, early_exit, soft)
    reason = _merge(m1.reason, _merge(m2.reason, _merge(m3.reason, _merge(m4.reason, m5.reason))))
    cos = (d1 * m5.dir).sum(-1)
    if not soft:
        curved = (reason == CONTINUE) & stop.too_curved(*_narrow(sd, d1, m5.dir), params.cos_angle_rk4)
        reason = torch.where(curved, _code(Reason.CURVATURE, pos), reason)
    go = (reason == CONTINUE).unsqueeze(-1)
    amp_margin = torch.minimum(torch.minimum(torch.minimum(m1.amp_margin, m2.amp_margin),
                                             torch.minimum(m3.amp_margin, m4.amp_margin)), m5.amp_margin)
    return Move(torch.where(go, final_pos, pos), torch.where(go, final_dir, dir), reason, m1.amp,
                amp_margin, _finite_or_zero(cos - params.cos_angle_rk4))


def iterate(field: FODField, params: TrackParams, mask: Optional[MaskField], pos: Tensor, dir: Tensor,
            early_exit: bool = False, soft: bool = False) -> Move:
    """One tckgen ``iterate``: an Euler or RK4 step, then the tracking-mask test on the new vertex."""
    return mask_test(mask, (rk4 if params.rk4 else euler)(field, params, pos, dir, early_exit, soft))


def mask_test(mask: Optional[MaskField], m: Move) -> Move:
    """tckgen's tracking-mask rule: a move whose new vertex ``m.pos`` lies outside ``mask`` (nearest voxel)
    stops with EXIT_MASK (the vertex is not kept)."""
    if mask is None:
        return m
    out = (m.reason == CONTINUE) & stop.outside_mask(mask.mask, mask.world_to_voxel, m.pos)
    return m._replace(reason=torch.where(out, _code(Reason.EXIT_MASK, m.pos), m.reason))
