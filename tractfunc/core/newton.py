"""The FOD peak by Newton iteration (SD_Stream's get_peak): the local maximum of the FOD amplitude nearest a
start direction, found by Newton iteration on the sphere. (DIPY's direction getters are
:mod:`tractfunc.local.getters`; discrete-sphere peak extraction is :mod:`tractfunc.local.peaks`.)

The iteration follows MRtrix3 ``Math::SH::get_peak``: at ``u`` take the unit tangent direction of steepest
ascent ``d``, the 1-D Newton step ``dt = |f'(d) / f''(d)|`` along it, capped at 0.2 rad, move
``u <- normalize(u + dt d)``; stop once ``dt < 1e-4`` rad (the amplitude returned is the one evaluated
before that last small move, as MRtrix3 does) or report failure (NaN) after 50 iterations.

``polish`` optionally appends full (2x2 tangent-plane) Newton iterations on the exact jet, which take the
tolerance-limited MRtrix3 answer to the exact local maximum (machine precision in a few iterations).  Use
it when the forward value must be the exact peak, e.g. to compare gradients with finite differences; it
departs from ``tckgen`` by at most ~1e-4 rad per peak.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import sh
from .arrays import as_tensor
from .tracing import is_tracing

Tensor = torch.Tensor

MAX_DIR_CHANGE = 0.2     # rad, cap on one Newton move
ANGLE_TOLERANCE = 1e-4   # rad, convergence threshold on the move
MAX_ITER = 50


def store(x: Tensor, state_dtype: Optional[torch.dtype]) -> Tensor:
    """``x`` rounded to ``state_dtype`` and back, as tckgen keeps its state (positions, directions,
    Newton iterates, FOD samples) in float32 between operations.  Identity when ``state_dtype`` is None
    or not narrower than ``x``.  A cast, so its derivative is the identity (gradients pass unchanged);
    for finite-difference checks use ``state_dtype=None``."""
    if state_dtype is None or torch.finfo(state_dtype).bits >= torch.finfo(x.dtype).bits:
        return x
    return x.to(state_dtype).to(x.dtype)


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


def tangent_basis(u: Tensor):
    """Orthonormal tangent frame at unit ``u`` (..., 3) -> (E (..., 3, 2), columns orthogonal to u).

    The helper axis is x unless u is close to it (then y), so the frame is well conditioned everywhere,
    the poles included.  Anything built from ``E (E^T A E)^-1 E^T`` does not depend on the choice."""
    ex = u.new_tensor([1.0, 0.0, 0.0]).expand_as(u)
    ey = u.new_tensor([0.0, 1.0, 0.0]).expand_as(u)
    a = torch.where(u[..., :1].abs() < 0.9, ex, ey)
    e1 = a - (a * u).sum(-1, keepdim=True) * u
    e1 = e1 / torch.linalg.vector_norm(e1, dim=-1, keepdim=True)
    e2 = torch.linalg.cross(u, e1, dim=-1)
    return torch.stack([e1, e2], -1)


class TangentNewton(NamedTuple):
    """delta: (..., 3) Newton move -E H2^-1 E^T grad in the tangent plane (0 where not regular);
    regular: (...,) bool, the tangent Hessian H2 is negative definite with condition below 1/rel_eps."""
    delta: Tensor
    regular: Tensor


REL_EPS = 1e-6   # tangent Hessians with eigenvalue ratio below this count as singular (flat peak)


def tangent_newton(grad: Tensor, hess: Tensor, u: Tensor, rel_eps: float = REL_EPS) -> TangentNewton:
    """Full Newton move on the sphere from the Riemannian gradient (..., 3) and Hessian (..., 3, 3) at u.

    One 2x2 solve per direction (closed-form adjugate).  Where the tangent Hessian is not negative
    definite, or its eigenvalue ratio is below ``rel_eps`` (a flat or saddle point: no isolated maximum),
    the move is zero and ``regular`` False; no NaN is produced for any finite input."""
    E = tangent_basis(u)
    H2 = E.transpose(-1, -2) @ hess @ E
    g2 = (E.transpose(-1, -2) @ grad.unsqueeze(-1)).squeeze(-1)
    a, b, c, d = H2[..., 0, 0], H2[..., 0, 1], H2[..., 1, 0], H2[..., 1, 1]
    tr = a + d
    det = a * d - b * c
    # eigenvalues l1, l2 < 0 with ratio r = l_small / l_large: det / tr^2 = r / (1 + r)^2, increasing in r
    regular = (tr < 0) & (det > (rel_eps / (1.0 + rel_eps) ** 2) * tr * tr) & torch.isfinite(det)
    sdet = torch.where(regular, det, torch.ones_like(det))
    x0 = -(d * g2[..., 0] - b * g2[..., 1]) / sdet
    x1 = -(a * g2[..., 1] - c * g2[..., 0]) / sdet
    delta = E @ torch.stack([x0, x1], -1).unsqueeze(-1)
    delta = torch.where(regular.unsqueeze(-1), delta.squeeze(-1), torch.zeros_like(grad))
    return TangentNewton(delta, regular)


def polish(coeffs: Tensor, u: Tensor, n_iter: int) -> Peak:
    """``n_iter`` full Newton iterations on the exact jet from unit ``u`` (..., 3); NaN entries stay NaN.

    Returns the refined direction and its exact amplitude.  Non-regular points (flat, saddle) do not move."""
    ok = torch.isfinite(u).all(-1, keepdim=True)
    v = torch.where(ok, u, u.new_tensor([0.0, 0.0, 1.0]).expand_as(u))
    for _ in range(n_iter):
        j = sh.sh_jet(coeffs, v)
        w = v + tangent_newton(j.grad, j.hess, v).delta
        v = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    amp = sh.amplitude(coeffs, v)
    nan = torch.full_like(v, float("nan"))
    return Peak(torch.where(ok, v, nan), torch.where(ok[..., 0], amp, torch.full_like(amp, float("nan"))))


def peak(coeffs: Tensor, u0: Tensor, table: Optional[sh.LegendreTable] = None,
         max_iter: int = MAX_ITER, early_exit: bool = False, polish_iter: int = 0,
         state_dtype: Optional[torch.dtype] = None) -> Peak:
    """Local FOD maximum reached from ``u0`` (MRtrix ``get_peak`` semantics).

    coeffs: (..., N) SH coefficients (MRtrix3 basis); u0: (..., 3) unit start directions (scanner frame).
    table: a :class:`tractfunc.core.sh.LegendreTable` to emulate MRtrix3's precomputed Legendre lookup
    (bit-level ``tckgen`` parity) or None for exact, pole-safe evaluation.
    early_exit: stop iterating once every entry converged and evaluate only the unconverged ones
    (eager mode only; ignored under vmap / torch.compile, where the fixed-iteration path runs).
    polish_iter: full Newton iterations appended on the exact jet (see :func:`polish`); 0 = tckgen.
    state_dtype: round every Newton iterate to this dtype (:func:`store`; float32 = tckgen's storage).
    Returns :class:`Peak`; entries that did not converge within ``max_iter`` get NaN direction and amp.
    This function is differentiated by unrolling; trackers use :func:`tractfunc.core.implicit.attach_peak`
    instead (implicit function theorem, O(1) memory in the iteration count).
    """
    coeffs, u0 = as_tensor(coeffs), as_tensor(u0)
    if early_exit and not is_tracing(coeffs, u0):
        p = _peak_active_set(coeffs, u0, table, max_iter, state_dtype)
        return polish(coeffs, p.dir, polish_iter) if polish_iter else p
    p = _peak_fixed(coeffs, u0, table, max_iter, state_dtype)
    return polish(coeffs, p.dir, polish_iter) if polish_iter else p


def _peak_fixed(coeffs, u0, table, max_iter, state_dtype=None) -> Peak:
    u = u0
    amp = torch.full(u0.shape[:-1], float("nan"), dtype=u0.dtype, device=u0.device)
    done = torch.zeros(u0.shape[:-1], dtype=torch.bool, device=u0.device)
    for _ in range(max_iter):
        v, a, dt = newton_move(coeffs, u, table)
        v = store(v, state_dtype)
        u = torch.where(done.unsqueeze(-1), u, v)
        amp = torch.where(done, amp, a)
        done = done | (dt < ANGLE_TOLERANCE)
    nan = torch.full_like(u, float("nan"))
    return Peak(torch.where(done.unsqueeze(-1), u, nan), torch.where(done, amp, torch.full_like(amp, float("nan"))))


def _peak_active_set(coeffs, u0, table, max_iter, state_dtype=None) -> Peak:
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
        v = store(v, state_dtype)
        conv = dt < ANGLE_TOLERANCE
        if bool(conv.any()):
            out_u = out_u.index_copy(0, idx[conv], v[conv])
            out_a = out_a.index_copy(0, idx[conv], a[conv])
            keep = ~conv
            idx, c, v = idx[keep], c[keep], v[keep]
        u = v
    return Peak(out_u.reshape(*shape, 3), out_a.reshape(shape))
