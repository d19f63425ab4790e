"""Tractograms in memory and on disk: .tck, .trk and .trx in one representation, and one-call converters to
DIPY's ``StatefulTractogram`` and nibabel's ``Tractogram``.

:class:`TrackFile` holds streamlines packed (vertices (V, 3) float32 scanner mm, RAS+, and a vertex count per
streamline) with the reference grid when the file has one (.trk, .trx) or one is given (``reference=`` an
image: NIfTI or MRtrix .mif, or a .trk/.trx) and the header's text fields (tckgen's ``count``,
``total_count``, ``step_size``, ...).  Coordinates are never moved: .tck and .trx store scanner mm, a .trk
stores voxel mm that nibabel maps back with the file's own affine.

``result`` arguments accept any of: :class:`TrackFile`, :class:`tractfunc.Tracks` (``track()``), or a list of (n_i, 3) arrays / tensors.
"""
from __future__ import annotations

import os
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .images import Image, TRX_REQUIRED, grid_header
from ..errors import TractfuncError

FORMATS = (".tck", ".trk", ".trx")
# header fields a writer sets itself (nibabel's TckFile, the .trx layout): not carried over on conversion
_OWN_FIELDS = {"count", "datatype", "file", "magic_number", "endianness", "nb_streamlines", "voxel_to_rasmm"}


class TrackFile(NamedTuple):
    """Streamlines in memory.

    vertices: (V, 3) float32 scanner mm (RAS+), one streamline after another; lengths: (N,) int64 vertex
    count of each; affine: (4, 4) voxel -> scanner mm of the reference grid, or None; dims: (3,) grid size,
    or None; header: text fields of the file (``key -> value`` strings)."""
    vertices: np.ndarray
    lengths: np.ndarray
    affine: Optional[np.ndarray] = None
    dims: Optional[Tuple[int, int, int]] = None
    header: Mapping[str, str] = MappingProxyType({})   # read-only default: a shared {} would leak writes

    def streamlines(self) -> list:
        """The streamlines as a list of (n_i, 3) views."""
        return np.split(self.vertices, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []

    def reference(self) -> Image:
        """The reference grid as an :class:`tractfunc.io.Image` with a zero-size data view (what
        :func:`tractfunc.io.write_tractogram` needs for .trk/.trx)."""
        if self.affine is None:
            raise TractfuncError("no reference grid: give one (a NIfTI/.mif image, or a .trk/.trx) for .trk/.trx output")
        vox = tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))
        return Image(np.broadcast_to(np.uint8(0), tuple(self.dims)), self.affine, vox)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def reference_grid(reference) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """(affine (4, 4) voxel -> scanner mm, dims (3,)) of a reference: an :class:`tractfunc.io.Image`, a
    :class:`TrackFile` with a grid, or a file (NIfTI, MRtrix .mif/.mif.gz/.mih, .trk, .trx; headers only)."""
    if isinstance(reference, Image):
        return np.asarray(reference.affine, dtype=np.float64), tuple(int(d) for d in reference.data.shape[:3])
    if isinstance(reference, TrackFile):
        if reference.affine is None:
            raise TractfuncError("the tractogram given as reference has no grid (a .tck)")
        return reference.affine, reference.dims
    path = os.fspath(reference)
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    from . import mif
    if mif.is_mif(path):
        try:
            h = mif.read_header(path)
        except mif.MifError as e:
            raise TractfuncError(f"{path}: cannot be read as an MRtrix image ({e})") from None
        order, _ = mif.disk_axes(h.layout)
        return mif.nifti_affine(h), tuple(int(h.dim[a]) for a in order)
    if _ext(path) in (".trk", ".trx"):
        return _file_grid(path)
    import nibabel as nib
    try:
        img = nib.load(path)
    except Exception as e:
        raise TractfuncError(f"{path}: cannot be read as a reference image ({type(e).__name__}: {e})") from None
    return np.asarray(img.affine, dtype=np.float64), tuple(int(d) for d in img.shape[:3])


def _grid(ext: str, hdr) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """(affine (4, 4), dims (3,)) from a .trx header dict or a .trk nibabel header."""
    if ext == ".trx":
        A, dims = hdr["VOXEL_TO_RASMM"], hdr["DIMENSIONS"]
    else:
        from nibabel.streamlines import Field
        A, dims = hdr[Field.VOXEL_TO_RASMM], hdr[Field.DIMENSIONS]
    return np.asarray(A, dtype=np.float64).reshape(4, 4), tuple(int(d) for d in np.asarray(dims).reshape(3))


def _file_grid(path: str) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """The grid of a .trk/.trx file from its header alone (no streamline is read)."""
    ext = _ext(path)
    try:
        if ext == ".trx":
            from trx import trx_file_memmap as tmm
            trx = tmm.load(path)   # memory-mapped: the positions are not read
            try:
                return _grid(ext, dict(trx.header))
            finally:
                trx.close()
        import nibabel as nib
        return _grid(ext, nib.streamlines.load(path, lazy_load=True).header)
    except Exception as e:  # nibabel / trx raise many types for corrupt files
        raise TractfuncError(f"{path}: cannot be read as {ext} ({type(e).__name__}: {e})") from None


def _from_sequence(seq) -> Tuple[np.ndarray, np.ndarray]:
    """nibabel ArraySequence -> (vertices (V, 3) float32, lengths (N,) int64), copied out of any memmap."""
    lengths = np.asarray(seq._lengths, dtype=np.int64)
    data = np.asarray(seq.get_data(), dtype=np.float32) if len(lengths) else np.zeros((0, 3), np.float32)
    return np.array(data, dtype=np.float32, copy=True).reshape(-1, 3), lengths


def load_tractogram(path: str, reference=None) -> TrackFile:
    """Read a .tck, .trk or .trx file.  ``reference`` (see :func:`reference_grid`) supplies the grid of a
    .tck (which has none); a .trk/.trx keeps its own."""
    path = os.fspath(path)
    ext = _ext(path)
    if ext not in FORMATS:
        raise TractfuncError(f"{path}: unknown tractogram extension {ext!r}; expected .tck, .trk or .trx")
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    affine = dims = None
    try:
        if ext == ".trx":
            from trx import trx_file_memmap as tmm
            trx = tmm.load(path)
            try:
                verts, lengths = _from_sequence(trx.streamlines)
                hdr = dict(trx.header)
            finally:
                trx.close()
            affine, dims = _grid(ext, hdr)
            header = {k: str(v) for k, v in hdr.items() if k not in TRX_REQUIRED}
        else:
            import nibabel as nib
            f = nib.streamlines.load(path)
            verts, lengths = _from_sequence(f.streamlines)
            header = {k: v if isinstance(v, str) else str(v) for k, v in f.header.items()
                      if not k.startswith("_") and k not in _OWN_FIELDS and isinstance(v, (str, bytes, int, float))}
            if ext == ".trk":
                affine, dims = _grid(ext, f.header)
                header = {}   # binary trk fields (voxel order, sizes) are the grid itself
            else:
                header["count"] = str(len(lengths))
    except TractfuncError:
        raise
    except Exception as e:  # nibabel / trx raise many types for corrupt files
        raise TractfuncError(f"{path}: cannot be read as {ext} ({type(e).__name__}: {e})") from None
    if affine is None and reference is not None:
        affine, dims = reference_grid(reference)
    return TrackFile(verts, lengths, affine, dims, header)


def save_tractogram(tracks: TrackFile, path: str, reference=None) -> None:
    """Write :class:`TrackFile` to .tck, .trk or .trx (by extension); ``reference`` (see
    :func:`reference_grid`) replaces the tracks' own grid.  Header fields carry over to .tck/.trx."""
    from .. import io
    if reference is not None:
        tracks = tracks._replace(**dict(zip(("affine", "dims"), reference_grid(reference))))
    ext = _ext(path)
    if ext in (".trk", ".trx") and tracks.affine is None:
        raise TractfuncError(f"{path}: {ext} needs a reference grid; give a reference image (--reference IMG)")
    ref = tracks.reference() if tracks.affine is not None else None
    header = {k: v for k, v in tracks.header.items() if k not in _OWN_FIELDS}
    io.write_tractogram(path, tracks.streamlines(), ref, header)


def packed(result) -> Tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3), lengths (N,) int64) NumPy, scanner mm, of any ``result`` (module docstring)."""
    if isinstance(result, TrackFile):
        return result.vertices, result.lengths
    if hasattr(result, "vertices") and hasattr(result, "lengths"):   # tractfunc.Tracks
        return _numpy(result.vertices).reshape(-1, 3), _numpy(result.lengths).astype(np.int64)
    lines = result   # a sequence of (n_i, 3) arrays / tensors
    arrays = [_numpy(s).reshape(-1, 3) for s in lines]
    if not arrays:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
    return np.concatenate(arrays), np.array([len(a) for a in arrays], dtype=np.int64)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _sequence(result):
    from nibabel.streamlines import ArraySequence
    verts, lengths = packed(result)
    seq = ArraySequence()
    seq._data = np.asarray(verts)
    seq._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else \
        np.zeros(0, np.int64)
    seq._lengths = np.asarray(lengths, dtype=np.int64)
    return seq


def to_nibabel_tractogram(result):
    """A nibabel ``Tractogram`` (streamlines in scanner mm, ``affine_to_rasmm`` identity) of ``result``."""
    from nibabel.streamlines import Tractogram
    return Tractogram(_sequence(result), affine_to_rasmm=np.eye(4))


def to_stateful_tractogram(result, reference=None):
    """A DIPY ``StatefulTractogram`` (RASMM space) of ``result``.

    reference: an :class:`tractfunc.io.Image`, a NIfTI/.mif/.trk/.trx path, or anything DIPY accepts
    (``Nifti1Image``, an sft, ...); None takes the grid of a :class:`TrackFile` that has one."""
    from dipy.io.stateful_tractogram import Space, StatefulTractogram
    if reference is None:
        if not (isinstance(result, TrackFile) and result.affine is not None):
            raise TractfuncError("a StatefulTractogram needs a reference image (its voxel grid)")
        reference = result
    if isinstance(reference, (Image, TrackFile, str, os.PathLike)):
        reference = grid_header(*reference_grid(reference))
    return StatefulTractogram(_sequence(result), reference, Space.RASMM)


def streamline_lengths(vertices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Arc length (N,) mm of each streamline: the sum of its segment lengths (0 for a single vertex).
    vertices: (V, 3) mm packed; lengths: (N,) vertex counts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    seg = np.linalg.norm(np.diff(np.asarray(vertices, dtype=np.float64), axis=0), axis=1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    csum = np.concatenate([[0.0], np.cumsum(seg)])
    out = np.zeros(len(lengths))
    some = lengths > 0                      # a 0-vertex streamline (last in the file) would index past csum
    out[some] = csum[(starts + lengths - 1)[some]] - csum[starts[some]]
    return out


def summary(tracks: TrackFile) -> dict:
    """What ``tractfunc info`` prints: count, total_count (if recorded), vertices, length statistics (mm),
    the grid and the header fields."""
    arc = streamline_lengths(tracks.vertices, tracks.lengths)
    n = len(tracks.lengths)
    out = {"count": n, "total_count": tracks.header.get("total_count"), "vertices": int(tracks.lengths.sum()),
           "length_min_mm": float(arc.min()) if n else None, "length_mean_mm": float(arc.mean()) if n else None,
           "length_max_mm": float(arc.max()) if n else None,
           "points_min": int(tracks.lengths.min()) if n else None, "points_max": int(tracks.lengths.max()) if n else None}
    if out["total_count"] is not None:
        try:
            out["total_count"] = int(float(out["total_count"]))
        except ValueError:
            pass
    if tracks.affine is not None:
        out["dims"] = list(tracks.dims)
        out["voxel_to_rasmm"] = np.round(tracks.affine, 6).tolist()
    out["header"] = {k: v for k, v in tracks.header.items() if k not in ("count", "total_count")}
    return out
