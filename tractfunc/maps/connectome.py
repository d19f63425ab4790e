"""Endpoint connectomes from a parcellation: ``tck2connectome`` (hard) and a soft assignment (soft).

Each streamline end is assigned to a node (a parcel label; 0 = unassigned):

  "radial" (tck2connectome's default, -assignment_radial_search R, R = 4 mm): the labelled voxel whose centre is
           nearest the end point, among voxels closer than R mm (searched outwards from the end's voxel);
  "end_voxels" (-assignment_end_voxels): the label of the voxel the end point rounds to.

The streamline adds ``weight x factor`` to edge (a, b), stored in the upper triangle (a <= b); the factor is 1,
times the streamline length (-scale_length) or its inverse (-scale_invlength), times 2 / (volume(a) +
volume(b)) in voxels (-scale_invnodevol). -stat_edge mean divides each edge by its summed weights; min / max
keep the smallest / largest factor (unweighted; NaN where no streamline).
The matrix has a row and column per label 1..max (label 0, the unassigned streamlines, only with
``keep_unassigned``); ``symmetric`` mirrors the upper triangle, ``zero_diagonal`` clears the diagonal.

Soft: an end's node is a probability vector: a softmin over the distances of the candidate labelled voxels at
temperature ``sigma`` mm, with "unassigned" competing at distance R (radial), or the box-kernel memberships of
:mod:`tractfunc.maps.tdi` (end_voxels); each tends to the hard rule as sigma -> 0. The soft matrix is
``sum_s w_s f_s p_s(a) q_s(b)``, folded into the upper triangle as the hard one is; differentiable in the
vertices (through the end points and lengths) and the weights.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..core.arrays import as_tensor
from ..core.interpolate import round_half_away, to_voxel
from ..errors import TractfuncError
from .packed import first_mask, last_mask, packed, segment_lengths, sequential_sum32, streamline_ids

Tensor = torch.Tensor
RADIUS = 4.0          # mm: tck2connectome's default radial search distance
ASSIGNMENTS = ("radial", "end_voxels")
CHUNK = 16384         # end points per block of the radial search (bounds memory: CHUNK x offsets)


def check_nodes(nodes) -> Tensor:
    """A parcellation (X, Y, Z) (or (X, Y, Z, 1)) of non-negative integer labels -> int64 tensor; float images
    must hold integers (MRtrix3's rule). Raises a one-line TractfuncError."""
    t = as_tensor(nodes)
    if t.ndim == 4 and t.shape[3] == 1:
        t = t[..., 0]
    if t.ndim != 3:
        raise TractfuncError(f"parcellation has shape {tuple(t.shape)}; expected a 3-D image of node labels")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (torch.round(t) != t)
        if bool(bad.any()):
            raise TractfuncError(f"parcellation holds {int(bad.sum())} non-integer values; expected integer node "
                                 "labels (0 = no node)")
    if t.numel() and bool((t < 0).any()):
        raise TractfuncError(f"parcellation holds {int((t < 0).sum())} negative values; expected labels >= 0")
    return t.to(torch.long)


class Search(NamedTuple):
    """Radial search neighbourhood: offsets (K, 3) long (file axes), sorted by their length in mm (K,)."""
    offsets: Tensor
    dist: Tensor


def radial_offsets(spacing, radius: float, device=None) -> Search:
    """tck2connectome's search list: voxel offsets closer than radius + half the voxel diagonal, by distance."""
    sp = np.asarray(spacing, dtype=np.float64)
    extra = math.sqrt(float(((0.5 * sp) ** 2).sum()))
    m = int(math.ceil((radius + extra) / sp.min()))
    r = np.arange(-m, m + 1)
    oz, oy, ox = np.meshgrid(r, r, r, indexing="ij")          # z outermost, x innermost (MRtrix3's order)
    off = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], 1)
    d = np.sqrt(((off * sp) ** 2).sum(1))
    keep = d < radius + extra
    order = np.argsort(d[keep], kind="stable")
    return Search(torch.as_tensor(off[keep][order], device=device), torch.as_tensor(d[keep][order], device=device))


def _candidates(ends: Tensor, nodes: Tensor, affine: Tensor, search: Search):
    """Labels (E, K) and distances (E, K) mm of the search voxels around each end point (label 0 outside)."""
    vox = to_voxel(ends, torch.linalg.inv(affine))
    centre = round_half_away(vox.detach()).long()
    cells = centre[:, None, :] + search.offsets                                     # (E, K, 3)
    dims = torch.as_tensor(nodes.shape, device=ends.device)
    inside = ((cells >= 0) & (cells < dims)).all(-1)
    c = torch.minimum(cells.clamp(min=0), dims - 1)
    lab = nodes[c[..., 0], c[..., 1], c[..., 2]]
    lab = torch.where(inside, lab, torch.zeros_like(lab))
    centres = cells.to(affine.dtype) @ affine[:3, :3].T + affine[:3, 3]
    dist = torch.linalg.vector_norm(ends.to(affine.dtype)[:, None, :] - centres, dim=-1)
    return lab, dist


def affine64(affine) -> np.ndarray:
    """The (4, 4) affine as a float64 NumPy array (a template's geometry, never differentiated)."""
    if isinstance(affine, torch.Tensor):
        return affine.detach().cpu().double().numpy()
    return np.asarray(affine, dtype=np.float64)


def end_points(verts: Tensor, lengths: Tensor) -> Tensor:
    """(A, 2, 3): first and last vertex of each streamline (A >= 1 vertex each)."""
    V = verts.shape[0]
    return torch.stack([verts[first_mask(lengths, V)], verts[last_mask(lengths, V)]], 1)


def assign(tracks, nodes, affine, assignment: str = "radial", radius: float = RADIUS) -> Tensor:
    """Hard node of each streamline end: (A, 2) int64 labels (0 = unassigned), tck2connectome's rules (see the
    module doc). nodes: (X, Y, Z) integer labels; affine: its (4, 4) voxel -> scanner mm."""
    if assignment not in ASSIGNMENTS:
        raise TractfuncError(f"assignment {assignment!r}: expected one of {', '.join(ASSIGNMENTS)}")
    nodes = check_nodes(nodes)
    P = packed(tracks)
    if bool((P.lengths == 0).any()):
        raise TractfuncError("a streamline has no vertex; expected at least one per streamline")
    A_np = affine64(affine)
    A64 = torch.as_tensor(A_np, device=P.vertices.device)
    nodes = nodes.to(P.vertices.device)
    ends = end_points(P.vertices.detach(), P.lengths).reshape(-1, 3).double()
    if assignment == "end_voxels":
        vox = round_half_away(to_voxel(ends, torch.linalg.inv(A64))).long()
        dims = torch.as_tensor(nodes.shape, device=ends.device)
        inside = ((vox >= 0) & (vox < dims)).all(-1)
        c = torch.minimum(vox.clamp(min=0), dims - 1)
        lab = torch.where(inside, nodes[c[:, 0], c[:, 1], c[:, 2]], torch.zeros_like(c[:, 0]))
        return lab.reshape(-1, 2)
    search = radial_offsets(np.sqrt((A_np[:3, :3] ** 2).sum(0)), radius, ends.device)
    out = []
    for s in range(0, ends.shape[0], CHUNK):
        lab, dist = _candidates(ends[s:s + CHUNK], nodes, A64, search)
        ok = (lab > 0) & (dist < radius)
        d = torch.where(ok, dist, torch.full_like(dist, float("inf")))
        best = d.argmin(1)                                                       # first of equal minima
        found = torch.isfinite(d.gather(1, best[:, None])[:, 0])
        out.append(torch.where(found, lab.gather(1, best[:, None])[:, 0], torch.zeros_like(best)))
    return torch.cat(out).reshape(-1, 2) if out else torch.zeros(0, 2, dtype=torch.long, device=ends.device)


def streamline_lengths(verts: Tensor, lengths: Tensor) -> Tensor:
    """(A,) length in mm of each streamline (the sum of its segment lengths), in verts' dtype; differentiable.
    float32 vertices are summed vertex by vertex in float32, as MRtrix3's ``Tractography::length``."""
    seg = segment_lengths(verts, lengths)
    if verts.dtype == torch.float32:
        return sequential_sum32(seg, lengths)
    return torch.zeros(lengths.numel(), dtype=verts.dtype, device=verts.device).index_add(
        0, streamline_ids(lengths), seg)


def node_volumes(nodes: Tensor, n: int) -> Tensor:
    """(n + 1,) voxel count of each label 0..n."""
    return torch.bincount(nodes.reshape(-1), minlength=n + 1)[:n + 1]


STAT_EDGE = ("sum", "mean", "min", "max")


def _factors(P, scale_length: bool, scale_invlength: bool, dtype) -> Tensor:
    """(A,) each streamline's contribution before weights and node volumes: 1, its length (scale_length) or
    1 / length (scale_invlength; 0 for a single vertex), tck2connectome's Metric."""
    f = torch.ones(P.lengths.numel(), dtype=dtype, device=P.vertices.device)
    if scale_length or scale_invlength:   # in the vertices' precision (float32 from a .tck: tck2connectome's)
        L = streamline_lengths(P.vertices, P.lengths).to(dtype)
        if scale_length:
            f = f * L
        else:
            ok = P.lengths > 1
            f = torch.where(ok, f / torch.where(ok, L, torch.ones_like(L)), torch.zeros_like(f))
    return f


def _weights(P, dtype) -> Tensor:
    return P.weights.to(dtype) if P.weights is not None else torch.ones(P.lengths.numel(), dtype=dtype,
                                                                          device=P.vertices.device)


def _invnodevol(a: Tensor, b: Tensor, vol: Tensor, dtype) -> Tensor:
    """2 / (volume(a) + volume(b)) per pair (0 where both are empty), tck2connectome -scale_invnodevol."""
    tot = (vol[a] + vol[b]).to(dtype)
    return torch.where(tot > 0, 2.0 / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(tot))


def _output(U: Tensor, symmetric: bool, zero_diagonal: bool, keep_unassigned: bool) -> Tensor:
    """(n+1, n+1) edges stored at (min, max) -> tck2connectome's matrix: the upper triangle (mirrored when
    symmetric, zeros below otherwise), diagonal cleared on request, node 0 dropped unless kept."""
    upper = torch.ones_like(U, dtype=torch.bool).triu()
    U = torch.where(upper, U, U.T if symmetric else torch.zeros_like(U))
    if zero_diagonal:
        U = torch.where(torch.eye(U.shape[0], dtype=torch.bool, device=U.device), torch.zeros_like(U), U)
    return U if keep_unassigned else U[1:, 1:]


def connectome(tracks, nodes, affine, *, assignment: str = "radial", radius: float = RADIUS, weights=None,
               scale_length: bool = False, scale_invlength: bool = False, scale_invnodevol: bool = False,
               stat_edge: str = "sum", symmetric: bool = False, zero_diagonal: bool = False,
               keep_unassigned: bool = False) -> Tensor:
    """tck2connectome on packed streamlines (hard).

    Args:
        tracks: :class:`tractfunc.Tracks`, :class:`tractfunc.TrackFile` or (vertices (V, 3), lengths (A,)), mm.
        nodes: (X, Y, Z) parcellation, integer labels (0 = none); affine: its (4, 4) voxel -> scanner mm.
        assignment: "radial" (default, within ``radius`` mm) or "end_voxels"; weights: (A,) (-tck_weights_in).
        scale_length, scale_invlength, scale_invnodevol, symmetric, zero_diagonal, keep_unassigned:
            tck2connectome's options; stat_edge: "sum" (default), "mean" (weighted by the streamline
            weights), "min" or "max" (of the contributions, unweighted; NaN for an edge without streamline).
    Returns:
        (n, n) float64 with n the largest label ((n + 1, n + 1) with keep_unassigned), upper triangular unless
        symmetric.
    """
    if stat_edge not in STAT_EDGE:
        raise TractfuncError(f"stat_edge {stat_edge!r}: expected one of {', '.join(STAT_EDGE)}")
    if scale_length and scale_invlength:
        raise TractfuncError("scale_length and scale_invlength are mutually exclusive (as in tck2connectome)")
    nodes = check_nodes(nodes)
    P = packed(tracks, weights)
    pairs = assign(P[:2], nodes, affine, assignment, radius)
    n = int(nodes.max()) if nodes.numel() else 0
    dev = P.vertices.device
    f, w = _factors(P, scale_length, scale_invlength, torch.float64).detach(), _weights(P, torch.float64).detach()
    lo, hi = pairs.min(1).values, pairs.max(1).values
    if scale_invnodevol:
        f = f * _invnodevol(lo, hi, node_volumes(nodes.to(dev), n), torch.float64)
    key = lo * (n + 1) + hi
    size = (n + 1) * (n + 1)
    if stat_edge in ("sum", "mean"):
        U = torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, key, f * w)
        if stat_edge == "mean":
            cnt = torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, key, w)
            U = torch.where(cnt != 0, U / torch.where(cnt != 0, cnt, torch.ones_like(cnt)), U)
    else:
        init = float("inf") if stat_edge == "min" else float("-inf")
        U = torch.full((size,), init, dtype=torch.float64, device=dev).scatter_reduce(
            0, key, f, "amin" if stat_edge == "min" else "amax")
        U = torch.where(torch.isfinite(U), U, torch.full_like(U, float("nan")))
    return _output(U.reshape(n + 1, n + 1), symmetric, zero_diagonal, keep_unassigned)


# ----------------------------------------------------------------------------------------------- soft form

def soft_assign(tracks, nodes, affine, assignment: str = "radial", radius: float = RADIUS,
                sigma: float = 0.5) -> Tensor:
    """Soft node of each streamline end: (A, 2, n + 1) probabilities over labels 0..n (0 = unassigned), in the
    vertices' dtype, differentiable in the vertices. radial: softmin of the candidate voxels' distances at
    temperature ``sigma`` mm (labelled voxels only, each also weighed by sigmoid((radius - d) / sigma)), with
    "unassigned" at distance ``radius``; end_voxels: box-kernel memberships of the 27 voxels around the end
    (edge softness ``sigma`` voxels). -> :func:`assign`'s one-hot as sigma -> 0."""
    if not sigma > 0:
        raise TractfuncError(f"sigma {sigma}: expected a positive temperature")
    if assignment not in ASSIGNMENTS:
        raise TractfuncError(f"assignment {assignment!r}: expected one of {', '.join(ASSIGNMENTS)}")
    P = packed(tracks)
    nodes = check_nodes(nodes).to(P.vertices.device)
    dtype, dev = P.vertices.dtype, P.vertices.device
    n = int(nodes.max()) if nodes.numel() else 0
    A_np = affine64(affine)
    A64 = torch.as_tensor(A_np, device=dev)
    ends = end_points(P.vertices, P.lengths).reshape(-1, 3)
    E = ends.shape[0]
    out = torch.zeros(E, n + 1, dtype=dtype, device=dev)
    if assignment == "end_voxels":
        from .tdi import box_kernel
        search = Search(torch.as_tensor([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)],
                                        device=dev), None)
        lab, _ = _candidates(ends, nodes, A64.to(dtype), search)
        vox = to_voxel(ends, torch.linalg.inv(A64.to(dtype)))
        cells = round_half_away(vox.detach()).long()[:, None, :] + search.offsets
        k = box_kernel(vox[:, None, :] - cells.to(dtype), sigma).prod(-1)
        out = out.scatter_add(1, lab, k)
        out = torch.cat([out[:, :1] + (1 - out.sum(1, keepdim=True)).clamp(min=0), out[:, 1:]], 1)
        return out.reshape(-1, 2, n + 1)
    search = radial_offsets(np.sqrt((A_np[:3, :3] ** 2).sum(0)), radius, dev)
    lab, dist = _candidates(ends, nodes, A64.to(dtype), search)
    logit = -dist / sigma + torch.nn.functional.logsigmoid((radius - dist) / sigma)
    logit = torch.where(lab > 0, logit, torch.full_like(logit, float("-inf")))
    none = torch.full((E, 1), -radius / sigma, dtype=dtype, device=dev)
    p = torch.softmax(torch.cat([none, logit], 1), 1)
    out = out.scatter_add(1, torch.cat([torch.zeros(E, 1, dtype=torch.long, device=dev), lab], 1), p)
    return out.reshape(-1, 2, n + 1)


def soft_connectome(tracks, nodes, affine, *, assignment: str = "radial", radius: float = RADIUS, weights=None,
                    sigma: float = 0.5, scale_length: bool = False, scale_invlength: bool = False,
                    scale_invnodevol: bool = False, symmetric: bool = False, zero_diagonal: bool = False,
                    keep_unassigned: bool = False) -> Tensor:
    """The differentiable relaxation of :func:`connectome` (same arguments; ``sigma`` the assignment temperature,
    see :func:`soft_assign`): ``sum_s w_s f_s p_s q_s^T`` over streamlines, folded as tck2connectome folds pairs.
    -> (n, n) in the vertices' dtype; -> :func:`connectome` as sigma -> 0; works under torch.func.grad."""
    nodes = check_nodes(nodes)
    P = packed(tracks, weights)
    dtype = P.vertices.dtype
    if scale_length and scale_invlength:
        raise TractfuncError("scale_length and scale_invlength are mutually exclusive (as in tck2connectome)")
    p = soft_assign(P[:2], nodes, affine, assignment, radius, sigma)
    f = _factors(P, scale_length, scale_invlength, dtype) * _weights(P, dtype)
    M = torch.einsum("s,sa,sb->ab", f, p[:, 0], p[:, 1])
    n = p.shape[-1] - 1
    if scale_invnodevol:
        idx = torch.arange(n + 1, device=M.device)
        M = M * _invnodevol(idx[:, None], idx[None, :], node_volumes(nodes.to(M.device), n), dtype)
    U = torch.triu(M + M.T) - torch.diag(torch.diagonal(M))                    # pair (a, b) stored at a <= b
    return _output(U, symmetric, zero_diagonal, keep_unassigned)
