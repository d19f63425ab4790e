"""A PNG of a tractogram: direction-coloured streamlines (RGB = |dx|, |dy|, |dz| of each segment, scanner
frame) projected on the sagittal, coronal and axial planes of the scanner (RAS+ mm) axes, over a grey
background map (the mean of an image across the projected slab).

Orientation: **neurological** -- the subject's right (+x) is on the right of the coronal and axial panels,
anterior (+y) on the right of the sagittal panel, superior (+z) up in sagittal and coronal, anterior up in
axial; every axis is labelled with its direction.  Drawn on a bare matplotlib ``Figure`` (Agg canvas,
no display needed; pyplot's backend and figures are not touched).
NumPy and matplotlib only (no torch).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from ..errors import TractfuncError


class View(NamedTuple):
    """A panel: horizontal and vertical scanner axes (0 x, 1 y, 2 z), the projected axis, the title and
    the axis labels."""
    h: int
    v: int
    depth: int
    title: str
    hlabel: str
    vlabel: str


VIEWS = (View(1, 2, 0, "sagittal", "y (mm)  P -> A", "z (mm)  I -> S"),
         View(0, 2, 1, "coronal", "x (mm)  L -> R", "z (mm)  I -> S"),
         View(0, 1, 2, "axial", "x (mm)  L -> R", "y (mm)  P -> A"))


def segments(vertices: np.ndarray, lengths: np.ndarray):
    """Packed streamlines (vertices (V, 3) scanner mm, lengths (N,)) -> (segment midpoints (S, 3),
    colours (S, 3) in [0, 1] = |unit segment direction|); segments that join two streamlines are dropped."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    if len(v) < 2:
        return np.zeros((0, 3)), np.zeros((0, 3))
    d = np.diff(v, axis=0)
    last = np.cumsum(np.asarray(lengths, dtype=np.int64))[:-1] - 1   # last vertex of each streamline but the last
    keep = np.ones(len(d), dtype=bool)
    keep[last[(last >= 0) & (last < len(d))]] = False
    d, mid = d[keep], 0.5 * (v[1:] + v[:-1])[keep]
    n = np.linalg.norm(d, axis=1, keepdims=True)
    ok = n[:, 0] > 0
    return mid[ok], np.clip(np.abs(d[ok]) / n[ok], 0.0, 1.0)


def subsample(lengths: np.ndarray, n: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """Indices (k,) of at most n streamlines drawn without replacement (all when n is None or >= N), sorted."""
    total = len(lengths)
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=n, replace=False))


def select(vertices: np.ndarray, lengths: np.ndarray, idx: np.ndarray):
    """Packed streamlines restricted to the streamlines idx (k,) -> (vertices, lengths)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = np.zeros(len(lengths), dtype=bool)
    keep[idx] = True
    return np.asarray(vertices)[np.repeat(keep, lengths)], lengths[keep]


def background_map(data: np.ndarray, affine: np.ndarray, view: View, extent: np.ndarray, centre: np.ndarray,
                   slab: Optional[float], res: float) -> np.ndarray:
    """Mean of a 3-D image (X, Y, Z) across the projected axis, on a scanner-mm grid of the view.

    extent: (3, 2) scanner-mm box [lo, hi] per axis; centre (3,) mm: the slab's centre on the projected
    axis; slab: its thickness in mm (None: the whole box); res: grid spacing in mm.  Nearest-neighbour
    sampling; points outside the image count as absent.  Returns (n_v, n_h) with row 0 at the low end."""
    hs = np.arange(extent[view.h, 0], extent[view.h, 1] + res / 2, res)
    vs = np.arange(extent[view.v, 0], extent[view.v, 1] + res / 2, res)
    lo, hi = extent[view.depth]
    if slab is not None:
        lo, hi = max(lo, centre[view.depth] - slab / 2), min(hi, centre[view.depth] + slab / 2)
    ds = np.arange(lo, hi + res / 2, res)
    inv = np.linalg.inv(affine)
    total = np.zeros((len(vs), len(hs)))
    count = np.zeros((len(vs), len(hs)))
    V, H = np.meshgrid(vs, hs, indexing="ij")
    dims = np.array(data.shape[:3])
    for d in ds:
        p = np.zeros(V.shape + (3,))
        p[..., view.h], p[..., view.v], p[..., view.depth] = H, V, d
        ijk = np.rint(p @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < dims), axis=-1)
        vals = data[tuple(np.where(inside[..., None], ijk, 0).transpose(2, 0, 1))]
        total += np.where(inside, vals, 0.0)
        count += inside
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def render(vertices: np.ndarray, lengths: np.ndarray, png: str, background=None, slab: Optional[float] = None,
           title: Optional[str] = None, dpi: int = 100, size: Sequence[float] = (15.0, 5.4),
           point_size: Optional[float] = None) -> dict:
    """Draw packed streamlines (vertices (V, 3) scanner mm, lengths (N,)) on three orthogonal views.

    background: None or (data (X, Y, Z), affine (4, 4)): its mean across each view's slab, in grey;
    slab: thickness (mm) of the slab around the centre (the background's centre, else the streamlines')
    that each view shows (None: everything, projected).  The three views share one scale (mm per pixel):
    each shows a square of the largest extent around the centre.  Writes ``png`` (``size`` inches x ``dpi``,
    atomically) and returns {'segments': drawn per view (3,), 'pixels': (width, height), 'mm_per_pixel':
    (3, 2) horizontal and vertical scale of each view}."""
    from ..io.atomic import atomic_path
    from matplotlib.figure import Figure   # no pyplot: the caller's backend and figures are left alone
    mid, col = segments(vertices, lengths)
    if background is not None:
        data, affine = np.asarray(background[0], dtype=np.float64), np.asarray(background[1], dtype=np.float64)
        corners = np.array([[i, j, k] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                            for k in (0, data.shape[2] - 1)], dtype=np.float64)
        pts = corners @ affine[:3, :3].T + affine[:3, 3]
    else:
        pts = mid
    if len(pts) == 0:
        raise TractfuncError("nothing to draw: the tractogram has no segment and no background was given")
    extent = np.stack([pts.min(0), pts.max(0)], 1)
    centre = extent.mean(1)
    half = max(float((extent[:, 1] - extent[:, 0]).max()) / 2, 1.0)   # one square box, so one scale for all
    res = float(np.min(np.sqrt((affine[:3, :3] ** 2).sum(0)))) if background is not None else 1.0
    fig = Figure(figsize=tuple(size), facecolor="black")   # saved through its own Agg canvas
    axes = fig.subplots(1, 3)
    drawn = []
    ps = point_size if point_size is not None else max(0.2, min(2.0, 2e4 / max(len(mid), 1)))
    for ax, view in zip(axes, VIEWS):
        ax.set_facecolor("black")
        if background is not None:
            img = background_map(data, affine, view, extent, centre, slab, res)
            finite = img[np.isfinite(img)]
            vmax = np.percentile(finite, 99.5) if finite.size else 1.0
            ax.imshow(img, cmap="gray", origin="lower", vmin=0, vmax=vmax if vmax > 0 else 1.0, interpolation="nearest",
                      extent=(extent[view.h, 0] - res / 2, extent[view.h, 1] + res / 2,
                              extent[view.v, 0] - res / 2, extent[view.v, 1] + res / 2))
        keep = np.ones(len(mid), dtype=bool)
        if slab is not None:
            keep = np.abs(mid[:, view.depth] - centre[view.depth]) <= slab / 2
        ax.scatter(mid[keep, view.h], mid[keep, view.v], c=col[keep], s=ps, linewidths=0)   # one call per view
        drawn.append(int(keep.sum()))
        ax.set_xlim(centre[view.h] - half, centre[view.h] + half)
        ax.set_ylim(centre[view.v] - half, centre[view.v] + half)
        ax.set_aspect("equal")
        ax.set_title(view.title + ("" if slab is None else f" ({slab:g} mm slab)"), color="white")
        ax.set_xlabel(view.hlabel, color="white"), ax.set_ylabel(view.vlabel, color="white")
        ax.tick_params(colors="white")
    fig.suptitle(title or "streamlines coloured by direction (RGB = |x|,|y|,|z|); neurological orientation",
                 color="white")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi, facecolor=fig.get_facecolor(), format="png")
    scales = []
    for ax in axes:   # the drawn scale: data range over the panel's size in pixels (after the equal aspect)
        box = ax.get_window_extent()
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        scales.append(((x1 - x0) / box.width, (y1 - y0) / box.height))
    return {"segments": drawn, "pixels": (int(round(size[0] * dpi)), int(round(size[1] * dpi))),
            "mm_per_pixel": scales}


def load_background(path: str):
    """A background map from a NIfTI or MRtrix .mif image -> (data (X, Y, Z) float, affine (4, 4)); a 4-D
    image gives its first volume (b=0 of a DWI, the l=0 term of an FOD)."""
    from ..io import read_image
    data, A, _ = read_image(path)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise TractfuncError(f"{path}: background image has shape {data.shape}; expected 3-D or 4-D")
    return np.asarray(data, dtype=np.float64), A


def render_file(tractogram: str, png: str, background: Optional[str] = None, max_streamlines: Optional[int] = None,
                slab: Optional[float] = None, rng_seed: int = 0) -> dict:
    """``tractfunc render``: read a .tck/.trk/.trx, draw at most ``max_streamlines`` of them (a random subset
    drawn with ``numpy.random.default_rng(rng_seed)``), write ``png``; returns :func:`render`'s dict with
    'streamlines' (drawn) and 'total' added."""
    from ..io.tractogram import load_tractogram
    if not png.lower().endswith(".png"):
        raise TractfuncError(f"{png}: expected a .png output path")
    if max_streamlines is not None and max_streamlines < 1:
        raise TractfuncError(f"--max-streamlines must be positive, got {max_streamlines}")
    if slab is not None and not (np.isfinite(slab) and slab >= 0):
        raise TractfuncError(f"--slab {slab}: expected a thickness >= 0 mm (0: everything, projected)")
    slab = slab or None
    t = load_tractogram(tractogram)
    if not len(t.lengths) and not background:
        raise TractfuncError(f"{tractogram}: no streamline to draw and no --background; expected a non-empty "
                             "tractogram or a background image")
    idx = subsample(t.lengths, max_streamlines, np.random.default_rng(rng_seed))
    verts, lengths = select(t.vertices, t.lengths, idx)
    bg = load_background(background) if background else None
    out = render(verts, lengths, png, bg, slab, title=None)
    return {**out, "streamlines": int(len(idx)), "total": int(len(t.lengths))}
