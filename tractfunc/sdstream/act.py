"""ACT on the PyTorch side of the follow engine: tckgen's ``-crop_at_gmwmi`` applied to followed streamlines.

The native kernel decides which halves entered cortical GM (their termination codes); :func:`crop_ends` moves those
ends onto the GM-WM interface as tckgen does (:func:`tractfunc.core.tissues.crop_at_interface`), in the vertices'
dtype and differentiably wrt them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..core.field import ACTField
from ..core.stop import Reason
from ..core.tissues import crop_at_interface

Tensor = torch.Tensor


MOVED = 1e-3   # mm: a kernel end farther than this from the followed one was cropped by the kernel


def crop_ends(act: ACTField, vertices: Tensor, lengths: Tensor, seed_index: Tensor, reasons: Tensor,
              decided: Optional[Tensor] = None) -> Tensor:
    """tckgen's ``-crop_at_gmwmi`` on packed streamlines.

    Args:
        act: the 5TT image; vertices (V, 3) scanner mm, packed; lengths, seed_index (A,) as in
            :class:`tractfunc.Tracks`; reasons (A, 2) each accepted streamline's termination codes (first half,
            second half; the second CONTINUE for a unidirectional streamline, whose only half ends last);
        decided: (V, 3) the native kernel's (cropped) vertices of the same streamlines, or None: an end is cropped
            where the kernel moved it (more than MOVED mm from the followed end), else as decided here.
    Returns:
        (V, 3) the vertices with every end that entered cortical GM moved onto the GM-WM interface (the first
        half's end as tckgen crops it, on that half alone, before the second half's)."""
    cgm = int(Reason.ENTER_CGM)
    end = torch.cumsum(lengths, 0) - 1
    start = end - lengths + 1
    uni = reasons[:, 1] == int(Reason.CONTINUE)
    # the first half ends first in the packed order when tracked both ways (it is stored reversed), last otherwise
    first = (reasons[:, 0] == cgm) & ~uni & (seed_index >= 2)
    last = ((reasons[:, 1] == cgm) | ((reasons[:, 0] == cgm) & uni)) & (lengths >= 3)
    out = vertices
    for rows, step in ((start[first], 1), (end[last], -1)):
        if rows.numel():
            idx = rows.unsqueeze(1) + step * torch.arange(3, device=rows.device)
            todo = None if decided is None else \
                torch.linalg.vector_norm(decided[rows].to(out.dtype) - out[rows].detach(), dim=-1) > MOVED
            out = out.index_copy(0, rows, crop_at_interface(act, out[idx], todo))
    return out


# --------------------------------------------------------------------------------------------------
# Soft ACT and soft regions on the fixed-shape engine (proofs/soft_act.md)


class SoftACT(NamedTuple):
    """weights: (B, 2T+1) each vertex's survival weight times its streamline's acceptance (0 on padding);
    survival: (B, 2T+1) the survival weight alone; acceptance: (B,) soft probability that tckgen's ACT and ROI rules
    accept the streamline; reach: (B, R) soft score that the streamline reached each include region."""
    weights: Tensor
    survival: Tensor
    acceptance: Tensor
    reach: Tensor


def region_indicator(region, pos: Tensor, temperature: float) -> Tensor:
    """Smooth indicator (...,) in (0, 1) of a region at ``pos`` (..., 3) scanner mm: a sphere
    ``sigmoid((r^2 - d^2) / (T r^2))`` (d: distance from its centre), an image ``sigmoid((v - 1/2) / T)`` with v
    the image (non-zero = 1) trilinearly interpolated; tends to tckgen's hard membership as T -> 0 (for images,
    the nearest-voxel rule except within half a voxel of the region's boundary)."""
    from .native import Sphere
    from ..core.interpolate import to_voxel, trilinear
    if isinstance(region, Sphere):
        c = torch.as_tensor(region.centre, dtype=pos.dtype, device=pos.device)
        r2 = float(region.radius) ** 2
        return torch.sigmoid((r2 - ((pos - c) ** 2).sum(-1)) / (temperature * max(r2, 1e-12)))
    m = torch.as_tensor(region.data != 0, dtype=pos.dtype, device=pos.device).unsqueeze(-1)
    A = torch.linalg.inv(torch.as_tensor(region.affine, dtype=torch.float64))
    v = trilinear(m, to_voxel(pos, A)).values[..., 0]
    return torch.sigmoid((v - 0.5) / temperature)


def _log1m(x: Tensor) -> Tensor:
    """log(1 - x) for x in [0, 1], finite at x = 1."""
    return torch.log1p(-x.clamp(max=1.0 - 1e-15))


def soft_act(act: Optional[ACTField], regions, vertices: Tensor, valid: Tensor, seed_index: Tensor, logw: Tensor,
             bad_end: Tensor, temperature: float, min_points: int = 1, max_points: int = 2 ** 62) -> SoftACT:
    """Survival weights and acceptance of soft-tracked streamlines under ACT's tissue rules and the ROIs.

    Each step's new vertex k of a half ends it, as tckgen's rules do there, with probabilities from the tissue
    margins at x_k (:func:`tractfunc.core.tissues.class_margins`): c_k = sigmoid(m_csf / T) (entered CSF: rejected),
    g_k = sigmoid(m_gm / T) (entered GM: accepted, vertex kept), e_k the exclusion regions' indicator (rejected);
    a vertex outside the usable 5TT image ends the half there (accepted, as tckgen's EXIT_IMAGE).  With F_k the
    engine's cutoff / angle survival (``logw``; a poor termination is rejected under ACT):

        W_k = F_k prod_{j<k} (1 - c_j)(1 - g_j)(1 - e_j),   P_half = sum_k W_k (1 - c_k)(1 - e_k) g_k + W_K r_K

    with K the half's last vertex and r_K = (1 - c_K)(1 - g_K)(1 - e_K) unless the half ended badly (the vertex
    budget used up, or a failed peak search: rejected under ACT).  Acceptance = P_fwd P_bwd prod_r reach_r, reach_r = 1 - prod_k (1 - W_k s_r(x_k)) over
    the streamline's vertices (W = 1 at the seed), times the length rules on the expected vertex count
    N = sum_k W_k: sigmoid((N - min_points + 1/2) / (T min_points)) sigmoid((max_points - 1/2 - N) / (T max_points))
    (tckgen rejects a streamline shorter than the minimum, and under ACT one that reaches the vertex budget).  The
    seed rules of ACT are applied hard by the caller.

    Args:
        act: the 5TT image, or None (regions only); regions: :class:`tractfunc.Regions` or None (include and
            exclude; ordered include regions are not supported).
        vertices: (B, 2T+1, 3) packed as :class:`tractfunc.sdstream.fixed.FixedTracks`; valid: (B, 2T+1);
        seed_index: (B,); logw: (B, 2T+1) log F (0 at the seed); bad_end: (B, 2) bool, each half (forward,
        backward) stopped by the vertex budget or a failed peak search; temperature: T > 0; min_points, max_points:
        tckgen's vertex limits (:class:`tractfunc.core.params.TrackParams`).
    Returns:
        :class:`SoftACT`."""
    B, L, _ = vertices.shape
    dt = vertices.dtype
    idx = torch.arange(L, device=vertices.device).unsqueeze(0)
    si = seed_index.unsqueeze(1)
    fwd, bwd = valid & (idx < si), valid & (idx > si)
    zero = torch.zeros(B, L, dtype=dt, device=vertices.device)
    c = g = e = zero
    usable = torch.ones(B, L, dtype=torch.bool, device=vertices.device)
    if act is not None:
        from ..core.tissues import class_margins, sample_tissues
        t, inside = sample_tissues(act._replace(tissues=act.tissues.to(dt)), vertices, masked=True)
        m_csf, m_gm = class_margins(t)
        usable = inside & ((t.sum(-1)) >= 0.5)
        c, g = torch.sigmoid(m_csf / temperature), torch.sigmoid(m_gm / temperature)
    excl = tuple(regions.exclude) if regions is not None else ()
    for r in excl:
        e = 1 - (1 - e) * (1 - region_indicator(r, vertices, temperature))
    steps = fwd | bwd
    c, g, e = (torch.where(steps, x, zero) for x in (c, g, e))
    # a half ends (hard) at its first vertex outside the usable 5TT image: that vertex and beyond are dropped
    bad = (steps & ~usable).to(torch.int64)
    past_b = torch.cumsum(bad * bwd, 1)
    past_f = torch.flip(torch.cumsum(torch.flip(bad * fwd, [1]), 1), [1])
    alive = valid & (past_b == 0) & (past_f == 0)
    ell = torch.where(steps & alive, _log1m(c) + _log1m(g) + _log1m(e), zero)
    lb, lf = ell * bwd, ell * fwd
    excl_b = torch.cumsum(lb, 1) - lb
    excl_f = torch.flip(torch.cumsum(torch.flip(lf, [1]), 1), [1]) - lf
    logW = logw + torch.where(bwd, excl_b, torch.where(fwd, excl_f, zero))
    W = torch.where(alive, torch.exp(logW), zero)
    stop_gm = W * (1 - c) * (1 - e) * g
    # the last alive vertex of each half (the seed when it took no step)
    nb = (bwd & alive).sum(1)
    nf = (fwd & alive).sum(1)
    rest = W * (1 - c) * (1 - g) * (1 - e)
    last_b = torch.gather(rest, 1, (seed_index + nb).unsqueeze(1)).squeeze(1)
    last_f = torch.gather(rest, 1, (seed_index - nf).unsqueeze(1)).squeeze(1)
    last_b = torch.where(bad_end[:, 1], torch.zeros_like(last_b), last_b)
    last_f = torch.where(bad_end[:, 0], torch.zeros_like(last_f), last_f)
    p_b = (stop_gm * (bwd & alive)).sum(1) + last_b
    p_f = (stop_gm * (fwd & alive)).sum(1) + last_f
    inc = tuple(regions.include) if regions is not None else ()
    if regions is not None and regions.include_ordered:
        from ..errors import TractfuncError
        raise TractfuncError("soft regions: ordered include regions are not supported (use include=)")
    reach = []
    for r in inc:
        s = torch.where(alive, W * region_indicator(r, vertices, temperature), zero)
        reach.append(1 - torch.exp(_log1m(s).sum(1)))
    reach = torch.stack(reach, 1) if reach else vertices.new_ones(B, 0)
    count = W.sum(1)
    lengths_ok = torch.sigmoid((count - (min_points - 0.5)) / (temperature * max(min_points, 1))) * \
        torch.sigmoid(((max_points - 0.5) - count) / (temperature * max_points))
    accept = p_f * p_b * reach.prod(1) * lengths_ok
    return SoftACT(W * accept.unsqueeze(1), W, accept, reach)


def act_seed_ok(act: ACTField, seeds: Tensor) -> Tensor:
    """tckgen's ACT seed test for seeds tracked both ways: seeds (B, 3) scanner mm -> (B,) bool, usable tissues,
    not CSF, some WM and less GM than WM.  (tckgen also seeds in sub-cortical GM and, one way only, within 0.01
    of the GM-WM interface on its GM side: the soft engine rejects those seeds.)"""
    from ..core.tissues import CGM, SGM, WM, class_margins, sample_tissues
    with torch.no_grad():
        t, inside = sample_tissues(act, seeds, masked=True)
        m_csf, _ = class_margins(t)
        gm = t[..., CGM] + t[..., SGM]
        return inside & (t.sum(-1) >= 0.5) & (m_csf < 0) & (t[..., WM] > 0) & (gm < t[..., WM])
