"""Direction getters: the FOD peak nearest a start direction, by Newton iteration on the sphere.

The iteration follows MRtrix3 ``Math::SH::get_peak``: at ``u`` take the unit tangent direction of steepest
ascent ``d``, the 1-D Newton step ``dt = |f'(d) / f''(d)|`` along it, capped at 0.2 rad, move
``u <- normalize(u + dt d)``; stop once ``dt < 1e-4`` rad (the amplitude returned is the one evaluated
before that last small move, as MRtrix3 does) or report failure (NaN) after 50 iterations.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import sh
from .tracing import is_tracing

Tensor = torch.Tensor

MAX_DIR_CHANGE = 0.2     # rad, cap on one Newton move
ANGLE_TOLERANCE = 1e-4   # rad, convergence threshold on the move
MAX_ITER = 50


class Peak(NamedTuple):
    """dir: (..., 3) unit peak direction (NaN where the search failed); amp: (...,) FOD amplitude."""
    dir: Tensor
    amp: Tensor


def _line_jet(coeffs: Tensor, u: Tensor, table: Optional[sh.LegendreTable]) -> sh.LineJet:
    if table is None:
        return sh.exact_line_jet(coeffs, u)
    return sh.mrtrix_line_jet(coeffs, u, table)


def newton_move(coeffs: Tensor, u: Tensor, table: Optional[sh.LegendreTable] = None):
    """One Newton move.  coeffs: (..., N); u: (..., 3) unit.  Returns (new_u, amp_at_u, dt)."""
    j = _line_jet(coeffs, u, table)
    ok = j.curv != 0
    dt = torch.where(ok, -j.slope / torch.where(ok, j.curv, torch.ones_like(j.curv)), torch.zeros_like(j.slope))
    dt = dt.abs().clamp(max=MAX_DIR_CHANGE)
    v = u + dt.unsqueeze(-1) * j.gdir
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v, j.amp, dt


def peak(coeffs: Tensor, u0: Tensor, table: Optional[sh.LegendreTable] = None,
         max_iter: int = MAX_ITER, early_exit: bool = False) -> Peak:
    """Local FOD maximum reached from ``u0`` (MRtrix ``get_peak`` semantics).

    coeffs: (..., N) SH coefficients (MRtrix3 basis); u0: (..., 3) unit start directions (scanner frame).
    table: a :class:`tractfunc.sh.LegendreTable` to emulate MRtrix3's precomputed Legendre lookup
    (bit-level ``tckgen`` parity) or None for exact, pole-safe evaluation.
    early_exit: stop iterating once every entry converged and evaluate only the unconverged ones
    (eager mode only: uses data-dependent control flow; leave False under vmap / torch.compile).
    Returns :class:`Peak`; entries that did not converge within ``max_iter`` get NaN direction and amp.
    """
    if early_exit and not is_tracing(coeffs, u0):
        return _peak_active_set(coeffs, u0, table, max_iter)
    u = u0
    amp = torch.full(u0.shape[:-1], float("nan"), dtype=u0.dtype, device=u0.device)
    done = torch.zeros(u0.shape[:-1], dtype=torch.bool, device=u0.device)
    for _ in range(max_iter):
        v, a, dt = newton_move(coeffs, u, table)
        u = torch.where(done.unsqueeze(-1), u, v)
        amp = torch.where(done, amp, a)
        done = done | (dt < ANGLE_TOLERANCE)
    nan = torch.full_like(u, float("nan"))
    return Peak(torch.where(done.unsqueeze(-1), u, nan), torch.where(done, amp, torch.full_like(amp, float("nan"))))


def _peak_active_set(coeffs, u0, table, max_iter) -> Peak:
    shape = u0.shape[:-1]
    c = coeffs.expand(*shape, coeffs.shape[-1]).reshape(-1, coeffs.shape[-1])
    u = u0.reshape(-1, 3)
    out_u = torch.full_like(u, float("nan"))
    out_a = torch.full(u.shape[:1], float("nan"), dtype=u.dtype, device=u.device)
    idx = torch.arange(u.shape[0], device=u.device)
    for _ in range(max_iter):
        if idx.numel() == 0:
            break
        v, a, dt = newton_move(c, u, table)
        conv = dt < ANGLE_TOLERANCE
        if bool(conv.any()):
            out_u = out_u.index_copy(0, idx[conv], v[conv])
            out_a = out_a.index_copy(0, idx[conv], a[conv])
            keep = ~conv
            idx, c, v = idx[keep], c[keep], v[keep]
        u = v
    return Peak(out_u.reshape(*shape, 3), out_a.reshape(shape))
