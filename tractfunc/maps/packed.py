"""Packed streamlines (vertices (V, 3) one streamline after another, lengths (A,) vertex counts) and the
operations every map needs on them: which streamline a vertex belongs to, the ends, checks at the public
boundary, and tckmap's Hermite upsampling.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..core.arrays import as_tensor
from ..errors import TractfuncError

Tensor = torch.Tensor

HERMITE_TENSION = 0.1   # MRtrix3's Resampling::hermite_tension (the upsampler and -precise's bisection)


class Packed(NamedTuple):
    """vertices: (V, 3) scanner mm; lengths: (A,) int64; weights: (A,) per-streamline weight (tck_weights_in) or
    None; vertex_weights: (V,) survival weight of each vertex (soft stopping) or None."""
    vertices: Tensor
    lengths: Tensor
    weights: Optional[Tensor] = None
    vertex_weights: Optional[Tensor] = None


def packed(tracks, weights=None) -> Packed:
    """Check the public inputs: ``tracks`` a :class:`tractfunc.Tracks`, a :class:`tractfunc.TrackFile` or a
    pair (vertices (V, 3), lengths (A,)); ``weights`` (A,) per-streamline weights or None. A Tracks' per-vertex
    survival ``weights`` become ``vertex_weights``. Raises a one-line TractfuncError."""
    vw = None
    if isinstance(tracks, tuple) and len(tracks) == 2 and not hasattr(tracks, "vertices"):
        verts, lengths = tracks
    else:
        verts, lengths = tracks.vertices, tracks.lengths
        w = getattr(tracks, "weights", None)
        vw = as_tensor(w) if w is not None and hasattr(tracks, "seed_ids") else None
    verts, lengths = as_tensor(verts), as_tensor(lengths).to(torch.long)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise TractfuncError(f"vertices have shape {tuple(verts.shape)}; expected (V, 3) scanner mm")
    if lengths.ndim != 1 or (lengths.numel() and int(lengths.min()) < 0) or int(lengths.sum()) != verts.shape[0]:
        raise TractfuncError(f"lengths (sum {int(lengths.sum())}) do not add up to the {verts.shape[0]} vertices")
    lengths = lengths.to(verts.device)
    if weights is not None:
        weights = as_tensor(weights).to(device=verts.device)
        if weights.ndim != 1 or weights.shape[0] != lengths.shape[0]:
            raise TractfuncError(f"{weights.shape[0] if weights.ndim == 1 else tuple(weights.shape)} streamline "
                                 f"weights for {lengths.shape[0]} streamlines; expected one weight per streamline")
        if not torch.isfinite(weights.detach()).all():
            raise TractfuncError(f"streamline weights hold {int((~torch.isfinite(weights.detach())).sum())} "
                                 "NaN/Inf values; expected finite weights")
    if vw is not None and vw.shape != verts.shape[:1]:
        raise TractfuncError(f"vertex weights have shape {tuple(vw.shape)}; expected ({verts.shape[0]},)")
    return Packed(verts, lengths, weights, vw)


def streamline_ids(lengths: Tensor) -> Tensor:
    """(A,) vertex counts -> (V,) int64 index of the streamline each vertex belongs to."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def starts(lengths: Tensor) -> Tensor:
    """(A,) vertex counts -> (A,) index of each streamline's first vertex."""
    return torch.cumsum(lengths, 0) - lengths


def last_mask(lengths: Tensor, V: int) -> Tensor:
    """(V,) bool: the vertex is the last of its streamline."""
    m = torch.zeros(V, dtype=torch.bool, device=lengths.device)
    ends = starts(lengths) + lengths - 1
    m[ends[lengths > 0]] = True
    return m


def first_mask(lengths: Tensor, V: int) -> Tensor:
    """(V,) bool: the vertex is the first of its streamline."""
    m = torch.zeros(V, dtype=torch.bool, device=lengths.device)
    m[starts(lengths)[lengths > 0]] = True
    return m


def padded_index(lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """(streamline id (V,), position inside it (V,)) of each vertex: where it goes in an (A, max length) array."""
    sid = streamline_ids(lengths)
    return sid, torch.arange(sid.numel(), device=lengths.device) - starts(lengths)[sid]


def sequential_sum32(values: Tensor, lengths: Tensor) -> Tensor:
    """(V,) per-vertex values -> (A,) float32 per-streamline sums added vertex by vertex in float32 (MRtrix3's
    ``float`` accumulators round this way); a loop over the vertex position, batched over streamlines."""
    A = lengths.numel()
    L = int(lengths.max()) if A else 0
    sid, pos = padded_index(lengths)
    v = torch.zeros(A, max(L, 1), dtype=torch.float32, device=values.device).index_put((sid, pos),
                                                                                     values.to(torch.float32))
    total = torch.zeros(A, dtype=torch.float32, device=values.device)
    for j in range(L):
        total = total + v[:, j]
    return total


def segment_lengths(verts: Tensor, lengths: Tensor) -> Tensor:
    """(V,) length of the segment ending at each vertex (0 at a streamline's first vertex), in verts' dtype."""
    V = verts.shape[0]
    seg = torch.linalg.vector_norm(verts[1:] - verts[:-1], dim=-1) if V > 1 else verts.new_zeros(0)
    before = torch.cat([verts.new_zeros(1), seg])[:V]
    return torch.where(first_mask(lengths, V), torch.zeros_like(before), before)


def upsample_ratio(step_size: Optional[float], min_spacing: float, precise: bool) -> int:
    """tckmap's automatic upsampling ratio: ceil(step / (min voxel size x 0.1 (-precise) or 0.333)), 1 without a
    step size. MRtrix3 holds the step size and the factor in float32: repeated here so that a step of exactly a
    tenth of the voxel gives tckmap's ratio."""
    if step_size is None or not math.isfinite(float(step_size)) or float(step_size) == 0:
        return 1
    factor = float(np.float32(0.1 if precise else 0.333))
    return max(1, int(math.ceil(float(np.float32(step_size)) / (float(min_spacing) * factor))))


def hermite_weights(mu: Tensor, tension: float = HERMITE_TENSION) -> Tensor:
    """MRtrix3's ``Math::Hermite`` weights at positions ``mu`` (...,) -> (..., 4), in ``mu``'s dtype and
    operation order."""
    t = torch.as_tensor(0.5 * tension, dtype=mu.dtype, device=mu.device)
    half = torch.as_tensor(0.5, dtype=mu.dtype, device=mu.device)
    p2 = mu * mu
    p3 = mu * p2
    w0 = (half - t) * (2.0 * p2 - p3 - mu)
    w1 = 1.0 + (1.5 + t) * p3 - (2.5 + t) * p2
    w2 = (2.0 + 2.0 * t) * p2 + (half - t) * mu - (1.5 + t) * p3
    w3 = (half - t) * (p3 - p2)
    return torch.stack([w0, w1, w2, w3], -1)


def hermite(w: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """w: (..., 4) weights; a, b, c, d: (..., 3) points -> (..., 3), summed in Hermite::value's order."""
    return ((w[..., 0:1] * a + w[..., 1:2] * b) + w[..., 2:3] * c) + w[..., 3:4] * d


def neighbours(verts: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """(previous, next) vertex of each vertex (V, 3) each, extrapolated at the ends as MRtrix3 does
    (2 q0 - q1 before the first, 2 q_last - q_prev after the last); a single-vertex streamline is its own
    neighbour."""
    V = verts.shape[0]
    first, last = first_mask(lengths, V), last_mask(lengths, V)
    idx = torch.arange(V, device=verts.device)
    nxt = verts[torch.where(last, idx, (idx + 1).clamp(max=max(V - 1, 0)))]
    prv = verts[torch.where(first, idx, (idx - 1).clamp(min=0))]
    before = torch.where(first.unsqueeze(-1), verts + (verts - nxt), prv)
    after = torch.where(last.unsqueeze(-1), verts + (verts - prv), nxt)
    return before, after


def upsample(verts: Tensor, lengths: Tensor, ratio: int,
             vertex_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """tckmap's upsampler: ``ratio - 1`` Hermite points (tension 0.1) between consecutive vertices, in float32 as
    MRtrix3 computes them when ``verts`` is float32 (any dtype works; differentiable, linear in ``verts``).
    verts: (V, 3); lengths: (A,) -> (vertices (V', 3), lengths (A,), vertex weights (V',) linearly interpolated,
    or None), with V' = sum((n - 1) ratio + 1) over streamlines of n >= 1 vertices."""
    if ratio <= 1 or verts.shape[0] == 0:
        return verts, lengths, vertex_weights
    V = verts.shape[0]
    last = last_mask(lengths, V)
    before, after = neighbours(verts, lengths)
    idx = torch.arange(V, device=verts.device)
    nxt_i = torch.where(last, idx, (idx + 1).clamp(max=V - 1))
    c, d = verts[nxt_i], after[nxt_i]                                     # segment (q_i, q_i+1), q_i+2
    mu = torch.tensor([(i + 1.0) / float(np.float32(ratio)) for i in range(ratio - 1)],
                      dtype=verts.dtype, device=verts.device)
    w = hermite_weights(mu)                                                # (r-1, 4)
    pts = hermite(w, before[:, None], verts[:, None], c[:, None], d[:, None])   # (V, r-1, 3)
    blocks = torch.cat([verts[:, None], pts], 1)                           # (V, r, 3)
    keep = torch.ones(V, ratio, dtype=torch.bool, device=verts.device)
    keep[:, 1:] = ~last.unsqueeze(1)
    out = blocks[keep]
    new_len = torch.where(lengths > 0, (lengths - 1) * ratio + 1, lengths)
    vw = None
    if vertex_weights is not None:
        f = torch.arange(ratio, dtype=vertex_weights.dtype, device=verts.device) / ratio
        wb = vertex_weights[:, None] * (1 - f) + vertex_weights[nxt_i][:, None] * f
        vw = wb[keep]
    return out, new_len, vw
