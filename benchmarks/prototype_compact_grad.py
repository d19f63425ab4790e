"""Prototype (benchmark-only, not library code): what ``track_fixed`` backprop would cost with compact
custom autograd Functions in place of the per-op graph of the two hot spots that ``grad_memory.py``
finds.  ``install()`` monkeypatches tractfunc in the current process; nothing on disk changes.

1. ``FODField.sample`` -> :class:`_SampleFOD`: the forward runs the library's own ``trilinear`` /
   ``nearest_value`` without a graph (identical values); it saves only the voxel coordinates (B, 3)
   float64 (24 bytes per sample) instead of the 8 gathered rows of 45 coefficients and the float64
   weight products (~1.7 kB per sample in float32).  The backward re-gathers the 8 rows.
2. The FOD gradient goes to one dense buffer per ``track_fixed`` call (:class:`_Sink`, released by the
   :class:`_Gate` node, which autograd runs after every sampler because each sampler feeds the gate's
   scalar token) instead of one zero-filled volume-sized tensor per gather (``IndexBackward0`` allocates
   ``zeros_like(volume)`` and ``index_put_``s into it: one full-volume fill per sample call, 2T+1 per
   backward with the one-gather trilinear of f93dd9f, 8 x (2T+1) before it).
3. ``integrate.attach_peak`` -> :class:`_AttachPeak`: same forward values (the peak found on detached
   inputs) and the same implicit-function-theorem derivative, but it saves the peak direction (B, 3), the
   4 entries of the 2x2 tangent Hessian divided by its determinant and the ok mask (~29 bytes per
   sample in float32) instead of the (B, 45, 3) basis gradient and the projector/frame matrices; the backward
   re-evaluates the SH basis and its gradient at the peak.

Plain autograd only (no vmap / jacrev / torch.compile support: a library version would keep the current
pure-op path when ``tracing.is_tracing`` is True, as ``track_fixed`` already does for checkpointing).
"""
from __future__ import annotations

import torch

from tractfunc.core import field as _field, integrate as _integrate, sh as _sh
from tractfunc.sdstream import tracking as _tracking
from tractfunc.core.newton import Peak, tangent_basis, tangent_newton
from tractfunc.core.fodgrad import GradSink, _Gate as _FodGate
from tractfunc.core.interpolate import Sample, _EPS, _flat_index, inside_bounds, nearest_value, to_voxel, trilinear

Tensor = torch.Tensor


# the shared gradient buffer and its gate node are the library's (tractfunc.core.fodgrad, which adopted them)
_Sink, _Gate = GradSink, _FodGate


class _SampleFOD(torch.autograd.Function):
    """(vox (B, 3) float64, token, sh, nonzero, sink) -> (values (B, C), inside (B,)), MRtrix rules."""

    @staticmethod
    def forward(ctx, vox, token, sh, nonzero, sink):
        s = trilinear(sh, vox)
        inside = s.inside & nearest_value(nonzero, vox)
        vals = torch.where(inside.unsqueeze(-1), s.values, torch.zeros_like(s.values))
        ctx.save_for_backward(vox)
        ctx.sh, ctx.nonzero, ctx.sink, ctx.has_token = sh, nonzero, sink, token is not None
        ctx.mark_non_differentiable(inside)
        return vals, inside

    @staticmethod
    def backward(ctx, g, _g_inside):
        (vox,) = ctx.saved_tensors
        sh = ctx.sh
        dims = sh.shape[:3]
        flat = sh.detach().reshape(-1, sh.shape[-1])
        inside = inside_bounds(vox, dims) & nearest_value(ctx.nonzero, vox)
        g = torch.where(inside.unsqueeze(-1), g, torch.zeros_like(g))
        d = torch.as_tensor(dims, dtype=vox.dtype, device=vox.device)
        base = torch.floor(vox)
        clamp = (vox < 0) | (vox > d - 1)
        frac = torch.where(clamp, torch.zeros_like(vox), vox - base)
        free = (~clamp).to(vox.dtype)
        base = base.long()
        want_vox = ctx.needs_input_grad[0]
        want_sh = ctx.sink is not None or ctx.needs_input_grad[2]
        gvox = torch.zeros_like(vox) if want_vox else None
        gsh = torch.zeros_like(flat) if ctx.needs_input_grad[2] else None
        for corner in range(8):
            o = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
            idx = _flat_index(*[(base[..., a] + o[a]).clamp(0, dims[a] - 1) for a in range(3)], dims).reshape(-1)
            fac = [frac[..., a] if o[a] else 1 - frac[..., a] for a in range(3)]
            w = (fac[0] * fac[1] * fac[2]).to(sh.dtype)
            keep = ~(w < _EPS)
            rows = flat[idx]
            if want_vox:
                # the library's weight rule: weights in (0, 1e-6) are dropped with their derivative,
                # a weight exactly 0 keeps its slope (interpolate.trilinear)
                sw = ((rows * g).sum(-1) * ~((w < _EPS) & (w != 0))).to(vox.dtype)
                for a in range(3):
                    b, c = [x for x in range(3) if x != a]
                    sign = 1.0 if o[a] else -1.0
                    gvox[..., a] += sw * (sign * fac[b] * fac[c]) * free[..., a]
            if want_sh:
                contrib = torch.where(keep, w, torch.zeros_like(w)).unsqueeze(-1) * g
                if ctx.sink is not None:
                    ctx.sink.add(idx, contrib)
                else:
                    gsh.index_add_(0, idx, contrib)
        gtok = g.new_zeros(()) if ctx.has_token else None
        return gvox, gtok, (None if gsh is None else gsh.view(sh.shape)), None, None


def _sample(self, pos: Tensor) -> Sample:
    vox = to_voxel(pos, self.world_to_voxel.to(torch.float64))
    token, sink = getattr(self, "_token", None), getattr(self, "_sink", None)
    sh = self.sh.detach() if sink is not None else self.sh
    vals, inside = _SampleFOD.apply(vox, token, sh, self.nonzero, sink)
    return Sample(vals, inside)


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


class _SinkField(_field.FODField):
    """FODField carrying the sink and the gate token of one track_fixed call (instance attributes)."""


_orig = {}


def _track_fixed(field, params, seeds, init_dirs, n_steps, mask=None, temperature=None, checkpoint=0):
    f = _SinkField(*field)
    f._token = f._sink = None
    if field.sh.requires_grad and torch.is_grad_enabled():
        f._sink = _Sink(field.sh.shape)
        f._token = _Gate.apply(field.sh, f._sink)
    return _orig["track_fixed"](f, params, seeds, init_dirs, n_steps, mask=mask, temperature=temperature,
                                checkpoint=checkpoint)


def install():
    """Monkeypatch tractfunc (this process only)."""
    if _orig:
        return
    _orig.update(sample=_field.FODField.sample, attach_peak=_integrate.attach_peak,
                 track_fixed=_tracking.track_fixed)
    _field.FODField.sample = _sample
    _integrate.attach_peak = _attach_peak
    _tracking.track_fixed = _track_fixed


def uninstall():
    if not _orig:
        return
    _field.FODField.sample = _orig["sample"]
    _integrate.attach_peak = _orig["attach_peak"]
    _tracking.track_fixed = _orig["track_fixed"]
    _orig.clear()
