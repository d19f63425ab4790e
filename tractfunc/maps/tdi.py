"""Track density images on a template grid: ``tckmap -template`` (hard) and a smooth relaxation (soft).

Hard (:func:`density`), equal to tckmap on the same tractogram:

  mode="count"   streamlines through each voxel, each counted once however many vertices it has there (tckmap)
  mode="length"  streamline length inside each voxel, mm (tckmap -precise)
  mode="ends"    streamline endpoints in each voxel (tckmap -ends_only)
  dec=True       directionally-encoded colour (X, Y, Z, 3): per streamline and voxel the summed |tangent|
                 (unit per streamline for counts), summed over streamlines and scaled to the voxel's density
                 (tckmap -dec); weights: per-streamline factors (tckmap -tck_weights_in).

Soft (:func:`soft_density`): each vertex belongs to the voxels around it by a smoothed box kernel of width one
voxel and edge softness ``tau`` voxels (a product over axes of differences of two sigmoids), which tends to the
hard rule (the voxel its coordinate rounds to) as ``tau -> 0``. A streamline's presence in a voxel is the
noisy-OR ``1 - prod_i (1 - s_i k_i)`` of its vertices' memberships k_i times their survival weights s_i (soft
stopping), so "counted once per streamline" survives the relaxation; lengths weigh each chord by the kernel at
its midpoint; gradients flow to vertices, streamline weights and survival weights (and through the tracker to
FOD coefficients and seeds).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.interpolate import to_voxel
from .grid import Grid, frame, make_grid
from .packed import first_mask, last_mask, packed, streamline_ids, upsample as hermite_upsample, upsample_ratio
from .voxelise import Pieces, end_pieces, precise_pieces, to_flat, vertex_pieces
from ..errors import TractfuncError

Tensor = torch.Tensor
MODES = ("count", "length", "ends")
CHUNK_VERTICES = 4_000_000   # vertices mapped at once by the hard form (after upsampling)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TractfuncError(f"density mode {mode!r}: expected one of {', '.join(MODES)}")


def ratio_for(grid: Grid, mode: str, step_size: Optional[float], upsample_ratio_: Optional[int]) -> int:
    """The upsampling ratio tckmap uses (``-upsample`` if given, none for endpoints, else from the step size)."""
    if mode == "ends":
        return 1
    if upsample_ratio_ is not None:
        if int(upsample_ratio_) < 1:
            raise TractfuncError(f"upsample ratio {upsample_ratio_}: expected an integer >= 1")
        return int(upsample_ratio_)
    return upsample_ratio(step_size, min(grid.spacing), mode == "length")


def _grid(affine, dims, spacing) -> Grid:
    return affine if isinstance(affine, Grid) else make_grid(affine, dims, spacing)


def density(tracks, affine, dims=None, *, mode: str = "count", dec: bool = False, weights=None,
            step_size: Optional[float] = None, upsample: Optional[int] = None, spacing=None) -> Tensor:
    """tckmap -template on packed streamlines (hard, not differentiable).

    Args:
        tracks: :class:`tractfunc.Tracks`, :class:`tractfunc.TrackFile` or (vertices (V, 3), lengths (A,)),
            scanner mm; vertices are mapped in float32 as tckmap reads them (a Tracks' survival weights are
            the soft form's business: the hard map counts every vertex).
        affine: (4, 4) voxel -> scanner mm of the template (or a :class:`tractfunc.maps.Grid`); dims: (X, Y, Z).
        mode: "count" (default), "length" (-precise) or "ends" (-ends_only); dec: -dec.
        weights: (A,) per-streamline weights (-tck_weights_in) or None.
        step_size: the tractogram's step size in mm (its header's ``step_size``), which sets tckmap's automatic
            upsampling; upsample: an explicit ratio (-upsample) instead. spacing: (3,) voxel sizes (default the
            affine's column norms; MRtrix3 reads the header's pixdim).
    Returns:
        (X, Y, Z) float64 (or (X, Y, Z, 3) with dec) on the vertices' device, in the template file's layout.
    """
    _check_mode(mode)
    grid = _grid(affine, dims, spacing)
    P = packed(tracks, weights)
    dev = P.vertices.device
    fr = frame(grid)
    ratio = ratio_for(grid, mode, step_size, upsample)
    w = (P.weights.detach().double() if P.weights is not None
         else torch.ones(P.lengths.numel(), dtype=torch.float64, device=dev))
    total = torch.zeros(grid.n_voxels, dtype=torch.float64, device=dev)
    value = torch.zeros(grid.n_voxels, 3, dtype=torch.float64, device=dev) if dec else None
    for first, last, v0, v1 in chunks(P.lengths, CHUNK_VERTICES // ratio):   # bounded memory, same sums
        verts, lengths, _ = hermite_upsample(P.vertices[v0:v1].detach().to(torch.float32), P.lengths[first:last],
                                             ratio)
        if mode == "count":
            pc = vertex_pieces(verts, lengths, fr)
        elif mode == "ends":
            pc = end_pieces(verts, lengths, fr)
        else:
            pc = precise_pieces(verts, lengths, grid, fr)
        _accumulate(pc, w[first:last], grid, fr, mode, total, value)
    if not dec:
        return total.reshape(grid.dims)
    n = torch.linalg.vector_norm(value, dim=-1, keepdim=True)          # tckmap -dec: magnitude = density
    value = torch.where(n > 0, value * (total[:, None] / n.clamp(min=1e-300)), value)
    return value.reshape(*grid.dims, 3)


def chunks(lengths: Tensor, max_vertices: int):
    """(first streamline, end streamline, first vertex, end vertex) of consecutive blocks of streamlines holding
    at most ``max_vertices`` vertices each (a longer streamline is a block of its own)."""
    ends = torch.cumsum(lengths, 0).tolist()
    first, v0 = 0, 0
    for i, e in enumerate(ends):
        if e - v0 > max_vertices and i > first:
            yield first, i, v0, ends[i - 1]
            first, v0 = i, ends[i - 1]
    if first < len(ends):
        yield first, len(ends), v0, ends[-1]


def _accumulate(pc: Pieces, w: Tensor, grid: Grid, fr, mode: str, total: Tensor, value: Optional[Tensor]) -> None:
    """Sum the pieces per (streamline, voxel) as tckmap's voxel sets do, then over streamlines, into ``total``
    (N,) and, for DEC, ``value`` (N, 3) (in place; w: (A,) weights of the pieces' streamlines)."""
    flat, inside = to_flat(pc.vox, grid, fr)
    keep = inside & torch.isfinite(pc.direction).all(-1) if (value is not None and mode == "count") else inside
    sid, flat, val, dirs = pc.sid[keep], flat[keep], pc.value[keep], pc.direction[keep]
    N = grid.n_voxels
    key = sid * N + flat
    uk, inv = torch.unique(key, return_inverse=True)
    ksid, kflat = uk // N, uk % N
    wk = w[ksid]
    L = torch.ones_like(wk) if mode == "count" else torch.zeros_like(wk).index_add_(0, inv, val)
    total.index_add_(0, kflat, wk * L)
    if value is None:
        return
    colour = torch.zeros(uk.numel(), 3, dtype=torch.float64, device=w.device)
    ok = torch.isfinite(dirs).all(-1)
    colour.index_add_(0, inv[ok], dirs[ok].abs())
    if mode == "count":   # tckmap normalises each streamline's colour in a voxel (non-precise mapping)
        n = torch.linalg.vector_norm(colour, dim=-1, keepdim=True)
        colour = torch.where(n > 0, colour / n.clamp(min=1e-300), colour)
    value.index_add_(0, kflat, colour * (wk * L)[:, None])


# ----------------------------------------------------------------------------------------------- soft form

def box_kernel(x: Tensor, tau: float) -> Tensor:
    """Smoothed indicator of the unit cell centred at 0: sigmoid((x + 1/2) / tau) - sigmoid((x - 1/2) / tau),
    per element (voxel units). -> the indicator of |x| < 1/2 as tau -> 0; smooth, in (0, 1)."""
    return torch.sigmoid((x + 0.5) / tau) - torch.sigmoid((x - 0.5) / tau)


_OFFSETS = torch.tensor([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


def memberships(pos: Tensor, grid: Grid, tau: float):
    """Soft voxel memberships of points. pos: (N, 3) scanner mm -> (flat voxel (N, 27) long, inside (N, 27) bool,
    kernel (N, 27) in pos's dtype), over the 3x3x3 voxels around the nearest one (truncation ~exp(-1 / tau))."""
    A = torch.as_tensor(grid.affine).inverse().to(device=pos.device)
    x = to_voxel(pos, A).to(pos.dtype)                                        # (N, 3) file-axis voxel coords
    centre = torch.round(x.detach()).long()
    cells = centre[:, None, :] + _OFFSETS.to(pos.device)                       # (N, 27, 3)
    dims = torch.as_tensor(grid.dims, device=pos.device)
    inside = ((cells >= 0) & (cells < dims)).all(-1)
    c = torch.minimum(cells.clamp(min=0), dims - 1)
    flat = (c[..., 0] * grid.dims[1] + c[..., 1]) * grid.dims[2] + c[..., 2]
    k = box_kernel(x[:, None, :] - cells.to(x.dtype), tau).prod(-1)
    return flat, inside, torch.where(inside, k, torch.zeros_like(k))


def _safe_unit(v: Tensor) -> Tensor:
    """v / |v| along the last axis with finite gradients where v = 0 (the double-where trick)."""
    n2 = (v * v).sum(-1, keepdim=True)
    ok = n2 > 0
    n = torch.sqrt(torch.where(ok, n2, torch.ones_like(n2)))
    return torch.where(ok, v / n, torch.zeros_like(v))


def soft_density(tracks, affine, dims=None, *, mode: str = "count", dec: bool = False, weights=None,
                 tau: float = 0.1, step_size: Optional[float] = None, upsample: Optional[int] = None,
                 spacing=None, subdivide: int = 1, eps: float = 1e-9) -> Tensor:
    """The differentiable relaxation of :func:`density` (same arguments; ``tau`` > 0 the kernel's edge softness
    in voxels; ``subdivide``: lengths take the kernel at the midpoints of this many equal parts of each chord). Differentiable in the vertices, ``weights`` and a Tracks' survival weights; dtype and device
    follow the vertices; works under torch.func.grad / vjp. -> :func:`density` as tau -> 0 (exactly for
    counts, ends and DEC; within ~ chord / (4 subdivide) per voxel crossing for lengths).

    Returns: (X, Y, Z) (or (X, Y, Z, 3) with dec) in the vertices' dtype."""
    _check_mode(mode)
    if not tau > 0:
        raise TractfuncError(f"tau {tau}: expected a positive kernel softness in voxels")
    grid = _grid(affine, dims, spacing)
    P = packed(tracks, weights)
    dtype, dev = P.vertices.dtype, P.vertices.device
    verts, lengths, vw = hermite_upsample(P.vertices, P.lengths, ratio_for(grid, mode, step_size, upsample),
                                  P.vertex_weights)
    V, N = verts.shape[0], grid.n_voxels
    s = vw if vw is not None else torch.ones(V, dtype=dtype, device=dev)
    w = P.weights.to(dtype) if P.weights is not None else torch.ones(P.lengths.numel(), dtype=dtype, device=dev)
    sid = streamline_ids(lengths)
    first, last = first_mask(lengths, V), last_mask(lengths, V)
    if mode == "ends":
        sel = first | last
        flat, inside, k = memberships(verts[sel], grid, tau)
        m = k * (s[sel] * w[sid[sel]])[:, None]
        total = torch.zeros(N, dtype=dtype, device=dev).index_add(0, flat[inside], m[inside])
        return total.reshape(grid.dims) if not dec else _soft_dec_ends(verts, sel, first, flat, inside, m, total, grid)
    if mode == "length":
        nxt = torch.arange(V, device=dev) + 1
        seg = ~last
        a, b = verts[seg], verts[nxt[seg]]
        n_sub = int(subdivide)
        f = (torch.arange(n_sub, dtype=dtype, device=dev) + 0.5) / n_sub             # sub-chord midpoints
        mid = (a[:, None, :] + f[None, :, None] * (b - a)[:, None, :]).reshape(-1, 3)
        flat, inside, k = memberships(mid, grid, tau)
        ln = torch.linalg.vector_norm(b - a, dim=-1) * 0.5 * (s[seg] + s[nxt[seg]]) / n_sub
        m = k * ln.repeat_interleave(n_sub)[:, None]
        a, b = a.repeat_interleave(n_sub, 0), b.repeat_interleave(n_sub, 0)
        ssid = sid[seg].repeat_interleave(n_sub)
        key = ssid[:, None] * N + flat
        uk, inv = torch.unique(key[inside], return_inverse=True)
        L = torch.zeros(uk.numel(), dtype=dtype, device=dev).index_add(0, inv, m[inside])
        total = torch.zeros(N, dtype=dtype, device=dev).index_add(0, uk % N, L * w[uk // N])
        if not dec:
            return total.reshape(grid.dims)
        colour = torch.zeros(uk.numel(), 3, dtype=dtype, device=dev).index_add(
            0, inv, (k[..., None] * _safe_unit(b - a).abs()[:, None, :])[inside])
        return _soft_dec_finish(_safe_unit(colour), L * w[uk // N], uk % N, total, grid)
    # counts: noisy-OR of the vertices' memberships per (streamline, voxel)
    flat, inside, k = memberships(verts, grid, tau)
    m = (k * s[:, None]).clamp(0, 1 - eps)
    key = sid[:, None] * N + flat
    uk, inv = torch.unique(key[inside], return_inverse=True)
    log_out = torch.zeros(uk.numel(), dtype=dtype, device=dev).index_add(0, inv, torch.log1p(-m[inside]))
    present = -torch.expm1(log_out)
    wk = present * w[uk // N]
    total = torch.zeros(N, dtype=dtype, device=dev).index_add(0, uk % N, wk)
    if not dec:
        return total.reshape(grid.dims)
    idx = torch.arange(V, device=dev)
    nx = verts[torch.where(last, idx, (idx + 1).clamp(max=max(V - 1, 0)))]
    pv = verts[torch.where(first, idx, (idx - 1).clamp(min=0))]
    tangent = _safe_unit(torch.where(last[:, None], verts, nx) - pv).abs()
    colour = torch.zeros(uk.numel(), 3, dtype=dtype, device=dev).index_add(
        0, inv, (m[..., None] * tangent[:, None, :])[inside])
    return _soft_dec_finish(_safe_unit(colour), wk, uk % N, total, grid)


def _soft_dec_finish(colour: Tensor, scale: Tensor, kflat: Tensor, total: Tensor, grid: Grid) -> Tensor:
    """Sum colour x scale per voxel and give each voxel the magnitude of its density (tckmap -dec's rule)."""
    N = grid.n_voxels
    value = torch.zeros(N, 3, dtype=colour.dtype, device=colour.device).index_add(0, kflat, colour * scale[:, None])
    return (_safe_unit(value) * total[:, None]).reshape(*grid.dims, 3)


def _soft_dec_ends(verts, sel, first, flat, inside, m, total, grid):
    V = verts.shape[0]
    idx = torch.arange(V, device=verts.device)
    out_dir = torch.where(first[:, None], verts - verts[(idx + 1).clamp(max=V - 1)],
                          verts - verts[(idx - 1).clamp(min=0)])
    d = _safe_unit(out_dir[sel]).abs()
    N = grid.n_voxels
    value = torch.zeros(N, 3, dtype=verts.dtype, device=verts.device).index_add(
        0, flat[inside], (m[..., None] * d[:, None, :])[inside])
    return (_safe_unit(value) * total[:, None]).reshape(*grid.dims, 3)
