"""Peaks of a function sampled on a discrete sphere, with DIPY's ``peak_directions`` semantics, batched.

DIPY (``dipy.reconst.dirspeed.peak_directions``, 1.12) finds the peaks of an ODF/PMF given on the vertices
of a sphere in four steps, all reproduced here on a batch ``(B, V)``:

1. **local maxima on the edge graph**: vertex ``i`` is a peak when its value is ``>=`` every neighbour's and
   ``>`` at least one (a plateau is no peak; a function with no such vertex has no peak);
2. **sorted by value, descending** (ties keep the lower vertex index first);
3. **relative threshold**: with ``m = max(min(odf), 0)``, keep the leading peaks with
   ``value - m >= relative_peak_threshold * (first - m)`` (a single local maximum is kept whatever its value);
4. **near-duplicates removed**, greedily in that order: a peak within ``min_separation_angle`` degrees of an
   already kept one (antipodes count as the same direction: ``|cos| > cos(angle)``) is dropped.

The directions returned are sphere vertices.  Everything is fixed-shape: at most ``max_peaks`` candidates
(the largest local maxima) go through step 4 and the result is ``(B, max_peaks)`` with a validity mask, the
kept peaks first in DIPY's order.  A batch row with more than ``max_peaks`` local maxima above the
threshold loses only its smallest ones (:func:`overflow` reports such rows).

A :class:`Sphere` is vertices ``(V, 3)`` plus the neighbour table of its edges; :func:`dipy_sphere` loads
DIPY's named spheres (DIPY needed only there); :func:`as_sphere` turns what a caller passes (a
:class:`Sphere`, a DIPY name, or a DIPY ``Sphere`` / ``HemiSphere`` object) into one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..core.tracing import is_tracing
from ..errors import TractfuncError

Tensor = torch.Tensor


class Sphere(NamedTuple):
    """vertices: (V, 3) unit vectors (float64); neighbors: (V, D) int64 vertex indices, each row padded
    with the vertex's own index (a self-comparison neither blocks nor makes a peak)."""
    vertices: Tensor
    neighbors: Tensor

    def to(self, device=None, dtype=None) -> "Sphere":
        return Sphere(self.vertices.to(device=device, dtype=dtype), self.neighbors.to(device=device))


class Peaks(NamedTuple):
    """dirs: (B, K, 3) unit sphere vertices (zeros where invalid); values: (B, K) function values there;
    indices: (B, K) int64 vertex indices (-1 where invalid); valid: (B, K) bool, the kept peaks first,
    in DIPY's order (descending value)."""
    dirs: Tensor
    values: Tensor
    indices: Tensor
    valid: Tensor


def neighbor_table(edges, n_vertices: int) -> Tensor:
    """Edges (E, 2) of vertex indices -> (V, D) int64 neighbour table padded with each row's own index."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if e.size and (e.min() < 0 or e.max() >= n_vertices):
        raise ValueError(f"sphere edges index vertices outside 0..{n_vertices - 1}")
    nbrs = [[] for _ in range(n_vertices)]
    for a, b in e:
        if a != b:
            nbrs[a].append(b)
            nbrs[b].append(a)
    width = max([len(n) for n in nbrs] + [1])
    table = np.array([n + [i] * (width - len(n)) for i, n in enumerate(nbrs)], dtype=np.int64)
    return torch.as_tensor(table)


def make_sphere(vertices, edges) -> Sphere:
    """A :class:`Sphere` from unit vertices (V, 3) and edges (E, 2) (e.g. DIPY's ``sphere.edges``)."""
    v = torch.as_tensor(np.asarray(vertices, dtype=np.float64))
    if v.dim() != 2 or v.shape[1] != 3 or v.shape[0] < 1:
        raise ValueError(f"sphere vertices have shape {tuple(v.shape)}; expected (V, 3)")
    return Sphere(v, neighbor_table(edges, v.shape[0]))


DIPY_SPHERES = ("default", "small", "symmetric362", "symmetric642", "symmetric724", "repulsion724",
                "repulsion100", "repulsion200")


def dipy_sphere(name: str = "default") -> Sphere:
    """DIPY's sphere ``name``: ``default`` (``dipy.data.default_sphere``, the 362-vertex hemisphere of
    repulsion724 that DIPY's direction getters use by default), ``small`` (``small_sphere``) or a
    ``dipy.data.get_sphere`` name.  Needs DIPY."""
    try:
        import dipy.data as dd
    except ImportError:
        raise ValueError("DIPY's spheres need DIPY (pip install dipy); or build one with make_sphere") from None
    if name == "default":
        s = dd.default_sphere
    elif name == "small":
        s = dd.small_sphere
    else:
        try:
            s = dd.get_sphere(name=name)
        except Exception:
            raise ValueError(f"unknown DIPY sphere {name!r}; expected one of {', '.join(DIPY_SPHERES)}") from None
    return make_sphere(s.vertices, s.edges)


def hull_edges(vertices) -> np.ndarray:
    """Edges (E, 2) of a sphere given by unit vertices (V, 3) only: the convex hull's edges for a full
    sphere (the origin strictly inside the hull), else, for a hemisphere, those of the hull of the vertices
    and their antipodes folded back onto the vertices (the neighbours wrap around through the antipodes,
    as DIPY's ``HemiSphere`` edges do)."""
    from scipy.spatial import ConvexHull
    v = np.asarray(vertices, dtype=np.float64)
    n = len(v)
    hull = ConvexHull(v)
    if not (hull.equations[:, 3] < -1e-6).all():   # the origin on or outside the hull: a hemisphere
        hull = ConvexHull(np.concatenate([v, -v]))
    tri = hull.simplices % n
    e = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    e = np.sort(e[e[:, 0] != e[:, 1]], 1)
    return np.unique(e, axis=0)


def as_sphere(sphere) -> Sphere:
    """What a caller passes as ``sphere`` -> :class:`Sphere`.

    sphere: a :class:`Sphere` (returned as is); a DIPY sphere name (:func:`dipy_sphere`); or any object
    with ``.vertices`` (V, 3) unit vectors (DIPY's ``Sphere`` / ``HemiSphere``), whose neighbours come from
    its ``.edges`` (E, 2), else from its ``.faces`` (F, 3), else from the convex hull of the vertices and
    their antipodes (:func:`hull_edges`)."""
    if isinstance(sphere, Sphere):
        return sphere
    if isinstance(sphere, str):
        return dipy_sphere(sphere)
    verts = getattr(sphere, "vertices", None)
    if verts is None:
        raise TractfuncError(f"sphere is a {type(sphere).__name__}; expected a tractfunc Sphere, a DIPY sphere "
                             "name or an object with .vertices (V, 3) such as DIPY's Sphere/HemiSphere")
    verts = np.asarray(verts, dtype=np.float64)
    edges = getattr(sphere, "edges", None)
    if edges is None and getattr(sphere, "faces", None) is not None:
        f = np.asarray(sphere.faces, dtype=np.int64)
        edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    if edges is None:
        edges = hull_edges(verts)
    try:
        return make_sphere(verts, edges)
    except ValueError as e:
        raise TractfuncError(str(e)) from None


def local_maxima(odf: Tensor, neighbors: Tensor) -> Tensor:
    """(B, V) values -> (B, V) bool: ``>=`` all edge neighbours and ``>`` at least one (DIPY's rule)."""
    nb = odf.index_select(-1, neighbors.reshape(-1)).reshape(*odf.shape[:-1], *neighbors.shape)   # (B, V, D)
    return (odf >= nb.amax(-1)) & (odf > nb.amin(-1))


def _sort_peaks(odf: Tensor, is_peak: Tensor, k: int):
    """Local maxima sorted by value descending, ties by vertex index: (values (B, k), indices (B, k),
    valid (B, k)); rows with fewer than k maxima are padded with invalid entries."""
    neg_inf = torch.full_like(odf, -math.inf)
    key = torch.where(is_peak, odf, neg_inf)
    vals, idx = torch.sort(key, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :k], idx[..., :k]
    valid = torch.gather(is_peak, -1, idx)
    return torch.where(valid, vals, torch.zeros_like(vals)), idx, valid


def _relative_threshold(odf: Tensor, vals: Tensor, valid: Tensor, relative_peak_threshold: float) -> Tensor:
    """DIPY's ``search_descending`` on the sorted peak values, less ``m = max(min(odf), 0)``; a lone
    local maximum is always kept."""
    m = odf.min(-1, keepdim=True).values.clamp(min=0)
    shifted = vals - m
    keep = valid & (shifted >= relative_peak_threshold * shifted[..., :1])
    keep = keep & torch.cumprod(keep.to(torch.uint8), -1).bool()     # a prefix, as the binary search returns
    lone = valid.sum(-1, keepdim=True) == 1
    return keep | (lone & valid)


def _remove_similar(dirs: Tensor, keep: Tensor, min_separation_angle: float) -> Tensor:
    """Greedy de-duplication in order: drop a candidate whose |cos| with a kept earlier one exceeds
    ``cos(min_separation_angle)``.  dirs (B, K, 3), keep (B, K) -> kept (B, K)."""
    cos_sep = math.cos(math.pi / 180 * min_separation_angle)
    close = (dirs @ dirs.transpose(-1, -2)).abs() > cos_sep          # (B, K, K)
    kept = []
    for i in range(dirs.shape[-2]):
        if i == 0:
            kept.append(keep[..., 0])
            continue
        prev = torch.stack(kept, -1)                                  # (B, i)
        blocked = (prev & close[..., i, :i]).any(-1)
        kept.append(keep[..., i] & ~blocked)
    return torch.stack(kept, -1)


def _compact(mask: Tensor, *xs: Tensor):
    """Move the True entries of mask (B, K) to the front, preserving their order; xs (B, K, ...)."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    out = [torch.gather(mask, -1, order)]
    for x in xs:
        idx = order.reshape(*order.shape, *([1] * (x.dim() - order.dim()))).expand(*order.shape, *x.shape[order.dim():])
        out.append(torch.gather(x, order.dim() - 1, idx))
    return out


def _pad(x: Tensor, k: int) -> Tensor:
    """Pad dim 1 of x (B, n, ...) with zeros (False) to length k."""
    if x.shape[1] == k:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], k - x.shape[1], *x.shape[2:]))], 1)


def peak_directions(odf: Tensor, sphere: Sphere, relative_peak_threshold: float = 0.5,
                    min_separation_angle: float = 25.0, max_peaks: int = 16) -> Peaks:
    """DIPY ``peak_directions`` on a batch.

    odf: (..., V) values on ``sphere``'s vertices (any real dtype; NaN-free).  Returns :class:`Peaks`
    with leading dims ``(...)`` and ``K = min(max_peaks, V)``.  Directions are in the frame of the
    sphere's vertices, in ``odf``'s dtype and device."""
    if odf.dim() < 1 or odf.shape[-1] != sphere.vertices.shape[0]:
        raise ValueError(f"odf has shape {tuple(odf.shape)}; expected (..., {sphere.vertices.shape[0]}), one value "
                         "per sphere vertex")
    if int(max_peaks) < 1:
        raise ValueError(f"max_peaks must be >= 1, got {max_peaks}")
    lead = odf.shape[:-1]
    f = odf.reshape(-1, odf.shape[-1])
    verts = sphere.vertices.to(device=f.device, dtype=f.dtype)
    k = min(int(max_peaks), f.shape[-1])
    is_peak = local_maxima(f, sphere.neighbors.to(f.device))
    vals, idx, valid = _sort_peaks(f, is_peak, k)
    keep = _relative_threshold(f, vals, valid, relative_peak_threshold)
    if not is_tracing(f) and f.shape[0]:   # eager: de-duplicate only as many candidates as any row has
        n = max(int(keep.sum(-1).max()), 1)
        vals, idx, keep = vals[:, :n], idx[:, :n], keep[:, :n]
    dirs = verts[idx]                                                 # (B, n, 3)
    kept = _remove_similar(dirs, keep, min_separation_angle)
    kept, dirs, vals, idx = (_pad(x, k) for x in _compact(kept, dirs, vals, idx))
    dirs = torch.where(kept.unsqueeze(-1), dirs, torch.zeros_like(dirs))
    vals = torch.where(kept, vals, torch.zeros_like(vals))
    idx = torch.where(kept, idx, torch.full_like(idx, -1))
    return Peaks(dirs.reshape(*lead, k, 3), vals.reshape(*lead, k), idx.reshape(*lead, k), kept.reshape(*lead, k))


def overflow(odf: Tensor, sphere: Sphere, relative_peak_threshold: float = 0.5, max_peaks: int = 16) -> Tensor:
    """(...,) bool: rows whose local maxima passing the relative threshold number more than ``max_peaks``
    (there :func:`peak_directions` may miss DIPY's smallest peaks).  A diagnostic, not for the hot path."""
    f = odf.reshape(-1, odf.shape[-1])
    is_peak = local_maxima(f, sphere.neighbors.to(f.device))
    vals, _, valid = _sort_peaks(f, is_peak, f.shape[-1])
    keep = _relative_threshold(f, vals, valid, relative_peak_threshold)
    return (keep.sum(-1) > max_peaks).reshape(odf.shape[:-1])
