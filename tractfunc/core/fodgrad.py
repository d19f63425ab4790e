"""Compact backward for FOD sampling inside one tracking call: one gradient buffer, 24 bytes per sample.

Plain autograd of :func:`tractfunc.core.interpolate.sample_fod` keeps the 8 gathered coefficient rows of every
sample (8 x N floats) and, in backward, fills a zero tensor the size of the whole FOD volume for every
sample call before adding it into the gradient.  With T steps that is T volume-sized allocations, which
made the FOD gradient's backward cost several forwards.  Here:

* :class:`_SampleFOD` saves only the voxel coordinates and re-gathers the rows in backward; its
  derivative is the one autograd gives the pure path (same weight rule, see ``interpolate.trilinear``);
* every sampler of the call adds its FOD gradient into one shared dense buffer (:class:`GradSink`); a
  gate node (:class:`_Gate`) between the FOD tensor and a scalar token that every sampler consumes runs
  after all of them in backward and hands the buffer to the FOD tensor once.

Used by :func:`tractfunc.track_fixed` under plain autograd when the FOD needs a gradient; under
torch.func transforms and torch.compile the pure path runs instead (:func:`attach`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .interpolate import WEIGHT_EPS, Sample, flat_index, inside_bounds, nearest_value, trilinear
from .tracing import is_tracing

Tensor = torch.Tensor


class GradSink:
    """Dense (X*Y*Z, N) FOD-gradient buffer shared by the samplers of one tracking call."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.buf: Optional[Tensor] = None

    def add(self, idx: Tensor, vals: Tensor) -> None:
        if self.buf is None:
            self.buf = vals.new_zeros(self.shape[0] * self.shape[1] * self.shape[2], self.shape[3])
        self.buf.index_add_(0, idx, vals)


class _Gate(torch.autograd.Function):
    """sh -> scalar token (0).  Its backward runs after every sampler (they all consume the token) and
    returns the accumulated buffer as the gradient of sh."""

    @staticmethod
    def forward(ctx, sh, sink):
        ctx.sink = sink
        return sh.new_zeros(())

    @staticmethod
    def backward(ctx, _g):
        buf, ctx.sink.buf = ctx.sink.buf, None
        return (None if buf is None else buf.view(ctx.sink.shape)), None


class _SampleFOD(torch.autograd.Function):
    """(vox (..., 3) float64, token, sh (detached), nonzero, sink) -> (values (..., N), inside (...,)):
    what ``sample_fod`` returns."""

    @staticmethod
    def forward(ctx, vox, token, sh, nonzero, sink):
        s = trilinear(sh, vox)
        inside = s.inside & nearest_value(nonzero, vox)
        ctx.save_for_backward(vox)
        ctx.sh, ctx.nonzero, ctx.sink = sh, nonzero, sink
        ctx.mark_non_differentiable(inside)
        return torch.where(inside.unsqueeze(-1), s.values, torch.zeros_like(s.values)), inside

    @staticmethod
    def backward(ctx, g, _g_inside):
        (vox,) = ctx.saved_tensors
        sh, dims = ctx.sh, ctx.sh.shape[:3]
        flat = sh.reshape(-1, sh.shape[-1])
        inside = inside_bounds(vox, dims) & nearest_value(ctx.nonzero, vox)
        g = torch.where(inside.unsqueeze(-1), g, torch.zeros_like(g)).reshape(-1, g.shape[-1])
        v = vox.reshape(-1, 3)
        d = torch.as_tensor(dims, dtype=v.dtype, device=v.device)
        base = torch.floor(v)
        clamp = (v < 0) | (v > d - 1)
        frac = torch.where(clamp, torch.zeros_like(v), v - base)
        free = (~clamp).to(v.dtype)
        base = base.long()
        gvox = torch.zeros_like(v) if ctx.needs_input_grad[0] else None
        for corner in range(8):
            o = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
            idx = flat_index(*[(base[:, a] + o[a]).clamp(0, dims[a] - 1) for a in range(3)], dims)
            fac = [frac[:, a] if o[a] else 1 - frac[:, a] for a in range(3)]
            w = ((fac[0] * fac[1]) * fac[2]).to(sh.dtype)
            kept = ~((w < WEIGHT_EPS) & (w != 0))          # the weight rule of interpolate.trilinear
            w = torch.where(kept, w, torch.zeros_like(w))
            if gvox is not None:
                sw = ((flat[idx] * g).sum(-1) * kept).to(v.dtype)
                for a in range(3):
                    b, c = [x for x in range(3) if x != a]
                    gvox[:, a] += sw * ((1.0 if o[a] else -1.0) * (fac[b] * fac[c])) * free[:, a]
            ctx.sink.add(idx, w.unsqueeze(-1) * g)
        return (None if gvox is None else gvox.reshape(vox.shape)), g.new_zeros(()), None, None, None


def attach(sh: Tensor):
    """(token, sink) for one tracking call on FOD ``sh`` when the compact path applies, else (None, None)."""
    if not (sh.requires_grad and torch.is_grad_enabled()) or is_tracing(sh):
        return None, None
    sink = GradSink(sh.shape)
    return _Gate.apply(sh, sink), sink


def sample(sh: Tensor, nonzero: Tensor, vox: Tensor, token: Tensor, sink: GradSink) -> Sample:
    """``sample_fod`` at voxel coordinates vox (..., 3) through the compact backward (gradients wrt vox
    and, via the sink and gate, wrt sh (X, Y, Z, N)) -> Sample(values (..., N), inside (...,))."""
    return Sample(*_SampleFOD.apply(vox, token, sh.detach(), nonzero, sink))
