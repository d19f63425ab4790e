"""File boundary: NIfTI or MRtrix .mif FOD/mask images in, .tck/.trk/.trx tractograms and seed CSVs out.

Everything here validates and raises :class:`TractfuncError` with a one-line message naming the problem.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ..errors import TractfuncError
from ..core.shsize import lmax_for


class Image(NamedTuple):
    """data: numpy array (X, Y, Z[, C]); affine: (4, 4) voxel -> scanner mm; voxel_sizes: (3,) mm."""
    data: np.ndarray
    affine: np.ndarray
    voxel_sizes: tuple


def load_nifti(path: str):
    import nibabel as nib
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise TractfuncError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None
    A = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-12:
        raise TractfuncError(f"{path}: affine is not invertible; expected a valid voxel-to-scanner transform")
    return img, data, A


def read_image(path: str):
    """(data, affine (4, 4), voxel sizes (3,)) of a NIfTI or MRtrix image (.mif, .mif.gz, .mih; read by
    :mod:`tractfunc.io.mif` into the layout and affine convention of the NIfTI route)."""
    from . import mif
    if not mif.is_mif(path):
        img, data, A = load_nifti(path)
        return data, A, voxel_sizes(img, A)
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    try:
        data, A, vox, _ = mif.read(path)
    except mif.MifError as e:
        raise TractfuncError(f"{path}: cannot be read as an MRtrix image ({e})") from None
    if not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-12:
        raise TractfuncError(f"{path}: transform is not invertible; expected a valid voxel-to-scanner transform")
    return data, A, vox


def voxel_sizes(img, A: np.ndarray) -> tuple:
    """Voxel sizes (3,) mm as MRtrix3 takes them: the header's pixdim, unless it disagrees with the
    affine's column lengths by more than 1e-5 (relative), then those lengths."""
    norms = np.sqrt((A[:3, :3] ** 2).sum(0))
    try:
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    except Exception:
        zooms = norms
    if zooms.shape != (3,) or not np.all(np.abs(zooms / norms - 1.0) <= 1e-5):
        zooms = norms
    return tuple(float(v) for v in zooms)


def nonfinite_error(path: str, n_voxels: int) -> "TractfuncError":
    """The error for an FOD holding NaN/Inf coefficients in ``n_voxels`` voxels."""
    return TractfuncError(f"{path}: {n_voxels} voxels hold NaN/Inf coefficients; "
                          f"expected finite values (zero them first, e.g. mrcalc -finite)")


def load_fod(path: str, dtype=np.float32, check_finite: bool = True, sh_basis: str = "mrtrix") -> Image:
    """Load SH FOD coefficients (X, Y, Z, N), returned in the MRtrix3 basis.  N must be (l+1)(l+2)/2 for
    even l; non-finite values are an error (``check_finite=False`` leaves that check to the caller, e.g.
    :func:`tractfunc.sdstream.native.prepare_volume`, which counts them while repacking).  ``sh_basis`` names the
    file's basis (:data:`tractfunc.core.shbasis.BASES`, e.g. ``"descoteaux07"`` for DIPY's default); other
    than ``"mrtrix"`` the coefficients are converted to the MRtrix3 basis here (NumPy, no torch)."""
    from ..core import shbasis
    try:
        shbasis.check_basis(sh_basis)
    except ValueError as e:
        raise TractfuncError(str(e)) from None
    data, A, vox = read_image(path)   # NIfTI or MRtrix .mif
    if data.ndim != 4:
        raise TractfuncError(f"{path}: FOD image has shape {data.shape}; expected 4-D (X, Y, Z, N SH coefficients)")
    try:
        lmax_for(data.shape[3])
    except ValueError as e:
        raise TractfuncError(f"{path}: {e}") from None
    data = data.astype(dtype, copy=False)
    if sh_basis not in ("mrtrix", "tournier07"):
        data = shbasis.to_native(data, sh_basis)
    if check_finite:
        bad = ~np.isfinite(data)
        if bad.any():
            raise nonfinite_error(path, int(bad.any(-1).sum()))
    return Image(data, A, vox)


def load_mask(path: str) -> Image:
    """Load a 3-D mask (non-zero = inside); a trailing singleton 4th axis is accepted."""
    data, A, vox = read_image(path)   # NIfTI or MRtrix .mif
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise TractfuncError(f"{path}: mask has shape {data.shape}; expected a 3-D image")
    return Image(data != 0, A, vox)


FIVETT_SUM_TOLERANCE = 0.001   # MRtrix3 5ttcheck: a brain voxel's fractions sum to 1 within this


def load_5tt(path: str) -> Image:
    """Load a five-tissue-type image (X, Y, Z, 5) float32 for ACT (cortical GM, sub-cortical GM, WM, CSF,
    pathological tissue), rejecting what MRtrix3's ``5ttcheck`` rejects: not 4-D with 5 volumes, values that are
    not finite or outside [0, 1], or a voxel with any tissue whose fractions do not sum to 1 (within 0.001)."""
    data, A, vox = read_image(path)
    if data.ndim != 4 or data.shape[3] != 5:
        raise TractfuncError(f"{path}: a 5TT image has 4 dimensions with 5 volumes (cGM, sGM, WM, CSF, "
                             f"pathological), got shape {data.shape}")
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise TractfuncError(f"{path}: 5TT fractions must be finite and in [0, 1]")
    total = data.astype(np.float64).sum(-1)
    bad = int(((total != 0) & (np.abs(total - 1.0) > FIVETT_SUM_TOLERANCE)).sum())
    if bad:
        raise TractfuncError(f"{path}: {bad} voxels whose tissue fractions do not sum to 1 (5ttcheck would reject "
                             f"it); expected a valid 5TT image (5ttgen)")
    return Image(data, A, vox)


def save_nifti(path: str, data: np.ndarray, affine: np.ndarray, voxel_sizes=None, descrip: str = "",
               reference_header=None) -> None:
    """Write ``data`` (X, Y, Z[, C]) to NIfTI atomically (no partial file on failure). affine: (4, 4) voxel ->
    scanner mm; the qform/sform (codes), zooms and units of ``reference_header`` (a nibabel NIfTI header) are
    kept where given, else both forms are set to ``affine`` (code 1) with ``voxel_sizes`` (default the affine's
    column norms) as zooms."""
    import nibabel as nib
    from .atomic import atomic_path
    img = nib.Nifti1Image(data, affine)
    zooms = voxel_sizes if voxel_sizes is not None else np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    if reference_header is not None:
        sform, scode = reference_header.get_sform(coded=True)
        qform, qcode = reference_header.get_qform(coded=True)
        img.set_sform(affine if sform is None else sform, int(scode) or 1)
        img.set_qform(affine if qform is None else qform, int(qcode) or 1)
        zooms = reference_header.get_zooms()[:3]
        img.header.set_xyzt_units(*reference_header.get_xyzt_units())
    else:
        img.set_sform(affine, 1)
        img.set_qform(affine, 1)
    img.header.set_zooms(tuple(float(z) for z in zooms) + (1.0,) * (data.ndim - 3))
    img.header["descrip"] = descrip.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def same_grid(a: Image, b: Image) -> bool:
    return a.data.shape[:3] == b.data.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-4)


def read_seed_points(path: str) -> np.ndarray:
    """Seed points (S, 3) scanner mm from rows ``x y z`` (space or comma separated, '#' comments), or
    from a tckgen ``-output_seeds`` CSV (``Track_index,Seed_index,Pos_x,Pos_y,Pos_z``)."""
    rows = _read_rows(path)
    if rows and len(rows[0]) >= 5 and all(float(r[1]).is_integer() for r in rows):
        pts = np.array([[float(v) for v in r[2:5]] for r in rows])
    else:
        pts = _rows3(rows, path, "x y z")
    return pts


def read_directions(path: str, n: Optional[int] = None) -> np.ndarray:
    """Directions (S, 3) from rows ``dx dy dz``; each must be finite and non-zero (normalised here)."""
    d = _rows3(_read_rows(path), path, "dx dy dz")
    norm = np.linalg.norm(d, axis=1)
    bad = ~np.isfinite(norm) | (norm == 0)
    if bad.any():
        raise TractfuncError(f"{path}: {int(bad.sum())} directions are zero or non-finite (first at row {int(np.argmax(bad)) + 1})")
    if n is not None and len(d) != n:
        raise TractfuncError(f"{path}: {len(d)} directions for {n} seed points; expected one per seed")
    return d / norm[:, None]


def _read_rows(path):
    """Numeric rows of a text table; non-numeric lines are accepted only before the first numeric row
    (a header), so a corrupted row is an error rather than a silently dropped seed."""
    if not os.path.exists(path):
        raise TractfuncError(f"{path}: no such file")
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for k, line in enumerate(fh, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = [p for p in line.replace(",", " ").split() if p]
                try:
                    [float(p) for p in parts]
                except ValueError:
                    if rows:
                        raise TractfuncError(f"{path}: row {k} is not numeric ({line[:40]!r}); expected numbers "
                                             "after the header") from None
                    continue  # header line
                rows.append(parts)
    except UnicodeDecodeError:
        raise TractfuncError(f"{path}: not a text file (expected rows of numbers)") from None
    if not rows:
        raise TractfuncError(f"{path}: no numeric rows found")
    return rows


def _rows3(rows, path, what):
    if any(len(r) != 3 for r in rows):
        raise TractfuncError(f"{path}: expected 3 columns ({what}) per row")
    a = np.array([[float(v) for v in r] for r in rows])
    if not np.all(np.isfinite(a)):
        raise TractfuncError(f"{path}: non-finite values; expected finite {what}")
    return a


def write_tractogram(path: str, streamlines: Sequence[np.ndarray], reference: Image,
                     header: Optional[dict] = None) -> None:
    """Write streamlines ((n_i, 3) scanner mm) to .tck (tckgen's header layout, :class:`TckWriter`), .trk
    (nibabel) or .trx (trx-python), by extension; atomically (a temporary file renamed into place, so a
    failure leaves ``path`` as it was).

    ``reference`` supplies the voxel grid a .trk or .trx records; ``header`` entries are stored as
    tckgen-like key: value properties in a .tck and as extra string fields of a .trx's header.json (a
    .trk has no place for them)."""
    from .atomic import atomic_path
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".tck", ".trk", ".trx"):
        raise TractfuncError(f"{path}: unknown tractogram extension {ext!r}; expected .tck, .trk or .trx")
    if ext == ".tck":
        with TckWriter(path, header) as w:
            w.write(streamlines)
        return
    import nibabel as nib
    from nibabel.streamlines import Tractogram
    if reference is None:
        raise TractfuncError(f"{path}: {ext} needs a reference grid (an image)")
    tg = Tractogram([np.asarray(s, dtype=np.float32) for s in streamlines], affine_to_rasmm=np.eye(4))
    with atomic_path(path) as tmp:
        if ext == ".trx":
            _write_trx(tmp, tg, reference, header or {})
            return
        hdr = {nib.streamlines.Field.VOXEL_TO_RASMM: reference.affine,
               nib.streamlines.Field.VOXEL_SIZES: np.asarray(reference.voxel_sizes, dtype=np.float32),
               nib.streamlines.Field.DIMENSIONS: np.asarray(reference.data.shape[:3], dtype=np.int16),
               nib.streamlines.Field.VOXEL_ORDER: "".join(nib.aff2axcodes(reference.affine))}
        nib.streamlines.TrkFile(tg, header=hdr).save(tmp)


TRX_REQUIRED = ("DIMENSIONS", "VOXEL_TO_RASMM", "NB_VERTICES", "NB_STREAMLINES")


def grid_header(affine: np.ndarray, dims) -> dict:
    """A voxel grid as the TRX header dict that trx-python and DIPY take for a reference: affine (4, 4)
    voxel -> scanner mm (float64) and dims (3,) voxels (uint16)."""
    return {"NB_VERTICES": 0, "NB_STREAMLINES": 0, "VOXEL_TO_RASMM": np.asarray(affine, dtype=np.float64),
            "DIMENSIONS": np.asarray(dims, dtype=np.uint16)}


def _write_trx(path: str, tg, reference: Image, header: dict) -> None:
    """A nibabel Tractogram (scanner mm) -> .trx (float32 positions, uint32 offsets) with trx-python;
    the reference's affine is kept in float64 and ``header`` entries become string fields."""
    try:
        from trx import trx_file_memmap as tmm
    except ImportError:
        raise TractfuncError(f"{path}: writing .trx needs trx-python (pip install 'tractfunc[formats]')") from None
    ref = grid_header(reference.affine, reference.data.shape[:3])
    trx = tmm.TrxFile.from_tractogram(tg, reference=ref)
    try:
        trx.header["VOXEL_TO_RASMM"] = ref["VOXEL_TO_RASMM"].tolist()
        trx.header["DIMENSIONS"] = ref["DIMENSIONS"].tolist()
        trx.header.update({str(k): "\n".join(tck_value(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
                           for k, v in header.items() if k not in TRX_REQUIRED})   # as the .tck header writes them
        tmm.save(trx, path)
    finally:
        trx.close()


def tck_value(value) -> str:
    """A header value as tckgen prints it: booleans 0/1, integers plainly, floats with 9 significant digits
    (tckgen's float32 precision: 0.1 -> ``0.100000001``, 60.0 -> ``60``), anything else as text."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(np.float32(value)) if isinstance(value, np.float32) else float(value):.9g}"
    return str(value)


_ROI_KEYS = ("comment", "roi", "prior_roi")   # written after the sorted properties, as tckgen does
_OWN_TCK_KEYS = ("count", "total_count", "datatype", "file")


def tck_header_text(header: Optional[dict]) -> str:
    """The text lines of a .tck header before ``datatype``, in tckgen's order: ``mrtrix tracks`` (padded to
    tckgen's 17 characters), the properties sorted by key (one ``key: line`` per line of a multi-line value),
    then ``comment``, ``roi`` and ``prior_roi`` entries (a value may be a list: one line each)."""
    header = dict(header or {})
    lines = ["mrtrix tracks    "]

    def emit(key, value):
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            for line in tck_value(v).split("\n"):
                lines.append(f"{key}: {line}")

    for k in sorted(k for k in header if k not in _OWN_TCK_KEYS and k not in _ROI_KEYS):
        emit(k, header[k])
    for k in _ROI_KEYS:
        if k in header:
            emit(k, header[k])
    return "\n".join(lines) + "\n"


class TckWriter:
    """Stream streamlines to a .tck file chunk by chunk, in bounded memory.

    Writes to ``path + ".partial"`` and renames it to ``path`` only in :meth:`close` (after writing the
    final ``count`` / ``total_count`` and the end marker), so an interrupted run leaves no file at ``path``
    (and an existing file there untouched) rather than a truncated one.  Use as a context manager: on an
    exception the partial file is removed.

    The header is laid out as tckgen lays it out (:func:`tck_header_text`, then ``datatype: Float32LE``,
    ``file: . OFFSET`` with the offset 65 bytes past the ``datatype`` line rounded up to 4, ``count: N``,
    ``total_count: M``, ``END``; zeros up to the offset), so ``tckinfo`` and other parsers read the same keys
    and plain numbers.  ``header`` entries become ``key: value`` properties.  Streamlines: (n_i, 3) scanner mm."""

    def __init__(self, path: str, header: Optional[dict] = None):
        if os.path.splitext(path)[1].lower() != ".tck":
            raise TractfuncError(f"{path}: streaming output needs a .tck file")
        self.path, self.tmp = path, path + ".partial"
        self.count = 0
        head = (tck_header_text(header) + "datatype: Float32LE\n").encode()
        offset = len(head) + 65
        offset += (4 - offset % 4) % 4
        head += f"file: . {offset}\ncount: ".encode()
        self._count_at = len(head)
        head += b"0\nEND\n"
        head += b"\0" * (offset - len(head))
        self.total_count = (header or {}).get("total_count")   # streamlines generated (tckgen); None: count
        self.data_start = offset   # byte offset of the first vertex
        try:
            self._fh = open(self.tmp, "wb")
            self._fh.write(head)
        except OSError as e:
            self.abort()
            raise TractfuncError(f"{path}: cannot be written ({e.strerror or e})") from None

    def write(self, streamlines: Sequence[np.ndarray]) -> None:
        """Append streamlines (each (n_i, 3)); each is followed by the NaN delimiter."""
        arrays = [np.asarray(s).reshape(-1, 3) for s in streamlines]
        if arrays:
            self.write_packed(np.concatenate(arrays), np.array([len(a) for a in arrays]))

    def write_packed(self, vertices: np.ndarray, lengths: np.ndarray) -> None:
        """Append streamlines given packed: vertices (V, 3), one streamline after another, and their
        vertex counts lengths (A,), sum V."""
        lengths = np.asarray(lengths, dtype=np.int64)
        out = np.full((len(vertices) + len(lengths), 3), np.nan, dtype="<f4")
        out[np.arange(len(vertices)) + np.repeat(np.arange(len(lengths)), lengths)] = vertices
        self.write_raw(out.tobytes(), len(lengths))

    def write_raw(self, data: bytes, count: int) -> None:
        """Append ``count`` streamlines already encoded (float32 LE rows, each streamline NaN-terminated),
        e.g. a byte range copied from another .tck body."""
        try:
            self._fh.write(data)
        except OSError as e:   # a full disk: one line, the partial file removed by abort()
            raise TractfuncError(f"{self.path}: cannot be written ({e.strerror or e})") from None
        self.count += count

    def tell(self) -> int:
        """Bytes written so far (header included)."""
        return self._fh.tell()

    def close(self) -> None:
        """Write the end marker, the final ``count`` and ``total_count``, then move the file into place."""
        total = self.count if self.total_count is None else self.total_count
        try:
            self._fh.write(np.full(3, np.inf, dtype="<f4").tobytes())
            self._fh.seek(self._count_at)
            self._fh.write(f"{int(self.count)}\ntotal_count: {int(total)}\nEND\n".encode())
            self._fh.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise TractfuncError(f"{self.path}: cannot be written ({e.strerror or e})") from None

    def abort(self) -> None:
        """Close and remove the partial file (``path`` itself is never touched)."""
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            try:
                fh.close()
            except OSError:
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_seeds_csv(path: str, seed_points: np.ndarray, seed_index: Sequence[int]) -> None:
    """tckgen ``-output_seeds`` format: ``Track_index,Seed_index,Pos_x,Pos_y,Pos_z,`` per accepted track
    (written atomically)."""
    from .atomic import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write("#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,\n")
        for i, (p, s) in enumerate(zip(seed_points, seed_index)):
            fh.write(f"{i},{int(s)},{p[0]:.9g},{p[1]:.9g},{p[2]:.9g},\n")
