"""Prototype (benchmark-only, not library code): the compact backward that the library does not have yet.
``install()`` monkeypatches tractfunc in the current process; nothing on disk changes.

The library already does the FOD part (:mod:`tractfunc.core.fodgrad`, adopted from this prototype): under
plain autograd with a gradient wrt the FOD, ``track_fixed`` samples through ``fodgrad``'s compact sampler and
accumulates the FOD gradient in one buffer per call. What remains here:

1. The same compact sampler when only the seeds (or directions) need a gradient: ``FODField.sample`` ->
   ``fodgrad.sample`` with a sink that drops the FOD gradient, so the backward saves the voxel coordinates
   (24 bytes per sample) instead of the 8 gathered rows of 45 coefficients (~1.7 kB per sample in float32).
   Calls where the FOD itself needs a gradient keep the library's own path.
2. ``integrate.attach_peak`` -> :class:`_AttachPeak`: same forward values (the peak found on detached
   inputs) and the same implicit-function-theorem derivative, but it saves the peak direction (B, 3), the
   4 entries of the 2x2 tangent Hessian divided by its determinant and the ok mask (~29 bytes per
   sample in float32) instead of the (B, 45, 3) basis gradient and the projector/frame matrices; the backward
   re-evaluates the SH basis and its gradient at the peak.

Plain autograd only (no vmap / jacrev / torch.compile support: a library version would keep the current
pure-op path when ``tracing.is_tracing`` is True, as ``track_fixed`` already does for checkpointing).
"""
from __future__ import annotations

import torch

from tractfunc.core import field as _field, fodgrad, integrate as _integrate, sh as _sh
from tractfunc.core.interpolate import Sample, to_voxel
from tractfunc.core.newton import Peak, tangent_basis, tangent_newton
from tractfunc.core.tracing import is_tracing

Tensor = torch.Tensor


class _DropFODGradient:
    """A ``fodgrad`` sink for samplers whose FOD needs no gradient: what they add is dropped."""

    def add(self, idx: Tensor, vals: Tensor) -> None:
        pass


def _sample(self, pos: Tensor) -> Sample:
    """``FODField.sample``; through ``fodgrad``'s compact backward also when only ``pos`` needs a gradient."""
    if self.grad_sink is not None or self.sh.requires_grad or not torch.is_grad_enabled() or is_tracing(pos):
        return _orig["sample"](self, pos)
    vox = to_voxel(pos, self.world_to_voxel.to(torch.float64))
    return fodgrad.sample(self.sh, self.nonzero, vox, pos.new_zeros(()), _DropFODGradient())


class _AttachPeak(torch.autograd.Function):
    """Same values and IFT derivative as ``tractfunc.core.implicit.attach_peak``; compact saved state."""

    @staticmethod
    def forward(ctx, coeffs, u_star, amp_star):
        ok = torch.isfinite(u_star).all(-1)
        u = torch.where(ok.unsqueeze(-1), u_star, u_star.new_tensor([0.0, 0.0, 1.0]).expand_as(u_star))
        j = _sh.sh_jet(coeffs, u)
        E = tangent_basis(u)
        H2 = E.transpose(-1, -2) @ j.hess @ E
        a, b, c, d = H2[..., 0, 0], H2[..., 0, 1], H2[..., 1, 0], H2[..., 1, 1]
        regular = tangent_newton(j.grad, j.hess, u).regular
        det = torch.where(regular, a * d - b * c, torch.ones_like(a))
        use = (ok & regular).to(u.dtype) / det
        m = torch.stack([a, b, c, d], -1) * use.unsqueeze(-1)        # H2 entries / det, 0 where unused
        ctx.save_for_backward(u, m, ok)
        ctx.lmax = _sh.lmax_for(coeffs.shape[-1])
        return u_star.clone(), amp_star.clone()

    @staticmethod
    def backward(ctx, g_dir, g_amp):
        u, m, ok = ctx.saved_tensors
        B, dB, _ = _sh._jet(u, ctx.lmax, order=1)
        E = tangent_basis(u)
        gx = (E.transpose(-1, -2) @ g_dir.unsqueeze(-1)).squeeze(-1)          # through delta = E x
        gx = torch.where((m != 0).any(-1, keepdim=True), gx, torch.zeros_like(gx))   # NaN-safe masking
        a, b, c, d = m.unbind(-1)
        # x0 = -(d g0 - b g1)/det, x1 = -(a g1 - c g0)/det  (tangent_newton's adjugate solve)
        gg0 = -(d * gx[..., 0] - c * gx[..., 1])
        gg1 = -(a * gx[..., 1] - b * gx[..., 0])
        ggrad = (E @ torch.stack([gg0, gg1], -1).unsqueeze(-1)).squeeze(-1)    # through g2 = E^T grad
        P = torch.eye(3, dtype=u.dtype, device=u.device) - u.unsqueeze(-1) * u.unsqueeze(-2)
        gg = (P @ ggrad.unsqueeze(-1)).squeeze(-1)                              # through grad = P dF
        gc = torch.einsum("...ki,...i->...k", dB, gg)
        gc = gc + B * torch.where(ok, g_amp, torch.zeros_like(g_amp)).unsqueeze(-1)
        return gc, None, None


def _attach_peak(coeffs: Tensor, u_star: Tensor, amp_star: Tensor) -> Peak:
    return Peak(*_AttachPeak.apply(coeffs, u_star.detach(), amp_star.detach()))


_orig = {}


def install():
    """Monkeypatch tractfunc (this process only)."""
    if _orig:
        return
    _orig.update(sample=_field.FODField.sample, attach_peak=_integrate.attach_peak)
    _field.FODField.sample = _sample
    _integrate.attach_peak = _attach_peak


def uninstall():
    if not _orig:
        return
    _field.FODField.sample = _orig["sample"]
    _integrate.attach_peak = _orig["attach_peak"]
    _orig.clear()
