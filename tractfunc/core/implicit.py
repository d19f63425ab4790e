"""Gradient of the FOD peak by the implicit function theorem, instead of backpropagation through Newton.

At a peak ``u*`` of ``f(u) = sum_k c_k Y_k(u)`` on the unit sphere the Riemannian gradient vanishes,
``g(u*, c) = 0``.  Differentiating that condition (derivation: ``proofs/peak_ift.md``)::

    du*/dc = -E H2^-1 E^T dg/dc,        H2 = E^T Hess_R f(u*) E  (2x2, the tangent Hessian)

with ``E`` (3, 2) an orthonormal tangent frame.  :func:`attach_peak` grafts exactly that derivative onto
a peak found without any graph (Newton on detached inputs): the returned direction is
``u* + (delta - stop_grad(delta))`` with ``delta = -E H2^-1 E^T g(u*, c)`` and ``H2`` held constant, whose
value is ``u*`` bit for bit and whose first derivative is the IFT one.  The amplitude gets the envelope
derivative ``df(u*)/dc = Y(u*)`` (the ``du*`` term vanishes because ``g = 0``).

Memory and time are those of one jet evaluation, whatever the number of Newton iterations.
Rules at degenerate points (documented, never NaN):
* a failed search (NaN direction) or a sample outside the image: zero derivative (the value stays NaN);
* a flat or saddle point (tangent Hessian not negative definite, or eigenvalue ratio < ``REL_EPS``):
  zero derivative of the direction; the amplitude keeps its envelope derivative.
"""
from __future__ import annotations

import torch

from . import sh
from .newton import Peak, tangent_newton

Tensor = torch.Tensor


def attach_peak(coeffs: Tensor, u_star: Tensor, amp_star: Tensor) -> Peak:
    """Peak with forward values ``(u_star, amp_star)`` exactly and IFT derivatives wrt ``coeffs``.

    coeffs: (..., N) SH coefficients (differentiable; e.g. interpolated from the FOD volume at positions
    that depend on seeds and step size); u_star: (..., 3) unit peak directions found on detached inputs
    (NaN where the search failed); amp_star: (...,) their amplitudes.  Works under vmap / jacrev / jacfwd
    / torch.compile (plain differentiable ops only)."""
    u_star = u_star.detach()
    amp_star = amp_star.detach()
    ok = torch.isfinite(u_star).all(-1)
    u = torch.where(ok.unsqueeze(-1), u_star, u_star.new_tensor([0.0, 0.0, 1.0]).expand_as(u_star))
    j = sh.sh_jet(coeffs, u)
    step = tangent_newton(j.grad, j.hess.detach(), u)
    delta = torch.where((ok & step.regular).unsqueeze(-1), step.delta, torch.zeros_like(step.delta))
    amp = torch.where(ok, j.amp, torch.zeros_like(j.amp))
    return Peak(u_star + (delta - delta.detach()), amp_star + (amp - amp.detach()))
