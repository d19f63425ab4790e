"""MRtrix3 image files (.mif, .mif.gz, .mih): a small NumPy-only reader.

The image comes back in the layout tractfunc's NIfTI loader gives for the same image written as NIfTI by
MRtrix3 (``mrconvert img.mif img.nii``): the three spatial axes in their on-disk order (ordered by the
``layout`` strides, each read in its on-disk direction), the other axes (SH coefficients, volumes) in
image order after them, and the voxel -> scanner affine adjusted to match (as MRtrix3's NIfTI writer
adjusts ``transform``).  A .mif made from a NIfTI by ``mrconvert`` (default strides) therefore loads as
the same array and affine as the NIfTI; any other strides load as the same world-space image.

Header keys read: ``dim``, ``vox``, ``layout`` (per axis a sign and a stride rank, ``+0`` fastest),
``datatype`` (``Bit``, ``[U]Int8``, ``[U]Int{16,32,64}{LE,BE}``, ``Float{32,64}{LE,BE}``; no suffix =
native order), ``transform`` (3 rows of 4: direction cosines and translation, mm), ``scaling``
(``offset,multiplier``: value = offset + multiplier x stored) and ``file`` (``. OFFSET`` for data in the
same file, else a file name relative to the header's folder and an optional offset).
"""
from __future__ import annotations

import gzip
import os
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

MAGIC = "mrtrix image"
EXTENSIONS = (".mif", ".mif.gz", ".mih")

_DTYPES = {"bit": None, "int8": "i1", "uint8": "u1"}
for _kind, _code in (("int", "i"), ("uint", "u"), ("float", "f"), ("cfloat", "c")):
    for _bits in ((16, 32, 64) if _kind in ("int", "uint") else (32, 64)):
        _n = _bits // 8 * (2 if _kind == "cfloat" else 1)
        _DTYPES[f"{_kind}{_bits}"] = f"={_code}{_n}"
        _DTYPES[f"{_kind}{_bits}le"] = f"<{_code}{_n}"
        _DTYPES[f"{_kind}{_bits}be"] = f">{_code}{_n}"


class MifError(ValueError):
    """A malformed MRtrix image header or data file."""


class MifHeader(NamedTuple):
    """dim: (n,) sizes; vox: (n,) spacings (mm on the spatial axes); layout: (n,) signed stride ranks as
    (sign, rank) pairs (rank 0 = fastest on disk); dtype: NumPy dtype (None: packed bits); transform:
    (3, 4) direction cosines | translation mm; scaling: (offset, multiplier); data_file: path;
    offset: byte offset of the first element in it (in the decompressed stream for .gz);
    keyval: the other header entries (repeated keys joined by newlines)."""
    dim: Tuple[int, ...]
    vox: Tuple[float, ...]
    layout: Tuple[Tuple[int, int], ...]
    dtype: object
    transform: np.ndarray
    scaling: Tuple[float, float]
    data_file: str
    offset: int
    keyval: Dict[str, str]


def is_mif(path: str) -> bool:
    """Whether ``path`` names an MRtrix image by its extension (.mif, .mif.gz, .mih)."""
    return path.lower().endswith(EXTENSIONS)


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _header_lines(path: str) -> List[str]:
    """The text lines between the magic line and ``END``."""
    lines = []
    with _open(path) as fh:
        try:
            first = fh.readline(64).decode("latin-1").rstrip("\r\n")
        except (OSError, EOFError) as e:
            raise MifError(f"cannot be read ({type(e).__name__}: {e})") from None
        if first != MAGIC:
            raise MifError(f"not an MRtrix image (first line {first[:20]!r}; expected {MAGIC!r})")
        for raw in fh:
            line = raw.decode("latin-1").rstrip("\r\n")
            if line.strip() == "END":
                return lines
            lines.append(line)
            if len(lines) > 100000:
                break
        else:
            if path.lower().endswith(".mih"):   # a header-only file may end without END
                return lines
    raise MifError("header has no END line")


def _floats(value: str, key: str) -> List[float]:
    try:
        return [float(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise MifError(f"{key}: {value!r} is not a list of numbers") from None


def _layout(value: str, n: int) -> Tuple[Tuple[int, int], ...]:
    out = []
    for item in value.split(","):
        item = item.strip()
        sign = -1 if item.startswith("-") else 1
        try:
            rank = int(item.lstrip("+-"))
        except ValueError:
            raise MifError(f"layout: {value!r}; expected one signed stride rank per axis (e.g. -0,+1,+2)") from None
        out.append((sign, rank))
    if len(out) != n or sorted(r for _, r in out) != sorted(set(r for _, r in out)):
        raise MifError(f"layout: {value!r}; expected {n} distinct stride ranks")
    return tuple(out)


def read_header(path: str) -> MifHeader:
    """Parse the header of an MRtrix image file (see the module docstring for the keys)."""
    kv: Dict[str, List[str]] = {}
    for line in _header_lines(path):
        if ":" not in line or line.lstrip().startswith("#"):
            continue
        key, value = line.split(":", 1)
        kv.setdefault(key.strip(), []).append(value.strip())
    low = {k.lower(): v for k, v in kv.items()}
    for key in ("dim", "vox", "layout", "datatype"):
        if key not in low:
            raise MifError(f"header lacks the {key!r} entry")
    try:
        dim = tuple(int(v) for v in low["dim"][0].split(","))
    except ValueError:
        raise MifError(f"dim: {low['dim'][0]!r} is not a list of integers") from None
    if any(d < 1 for d in dim):
        raise MifError(f"dim: {dim}; expected positive sizes")
    vox = _floats(low["vox"][0], "vox")
    if len(vox) < min(3, len(dim)):
        raise MifError(f"vox: {len(vox)} entries for {len(dim)} axes")
    vox = tuple(vox[:len(dim)]) + (1.0,) * (len(dim) - len(vox))
    dname = low["datatype"][0].strip().lower()
    if dname not in _DTYPES:
        raise MifError(f"datatype {low['datatype'][0]!r} is not supported (expected Bit, [U]Int8..64, Float32/64 "
                       "with LE/BE)")
    dtype = None if _DTYPES[dname] is None else np.dtype(_DTYPES[dname])
    T = np.eye(4)[:3]
    if "transform" in low:
        rows = [_floats(r, "transform") for r in low["transform"]]
        if len(rows) != 3 or any(len(r) != 4 for r in rows):
            raise MifError("transform: expected 3 rows of 4 numbers")
        T = np.array(rows, dtype=np.float64)
    scaling = (0.0, 1.0)
    if "scaling" in low:
        s = _floats(low["scaling"][0], "scaling")
        if len(s) != 2:
            raise MifError("scaling: expected 'offset,multiplier'")
        scaling = (s[0], s[1])
    files = low.get("file", [])
    if len(files) != 1:
        raise MifError(f"{len(files)} 'file' entries; expected one (multi-file images are not supported)")
    parts = files[0].split()
    name = parts[0] if parts else "."
    try:
        offset = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise MifError(f"file: {files[0]!r}; expected a file name and an optional integer byte offset") from None
    if offset < 0:
        raise MifError(f"file: offset {offset}; expected a non-negative byte offset")
    if name == ".":
        data_file = path
    else:
        data_file = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    reserved = {"dim", "vox", "layout", "datatype", "transform", "scaling", "file"}
    keyval = {k: "\n".join(v) for k, v in kv.items() if k.lower() not in reserved}
    return MifHeader(dim, vox, _layout(low["layout"][0], len(dim)), dtype, T, scaling, data_file, offset, keyval)


def _raw(h: MifHeader) -> np.ndarray:
    """The stored elements (prod(dim),) in on-disk order (packed bits unpacked to uint8)."""
    n = int(np.prod(h.dim))
    nbytes = (n + 7) // 8 if h.dtype is None else n * h.dtype.itemsize
    if not os.path.exists(h.data_file):
        raise MifError(f"data file {h.data_file} not found")
    with _open(h.data_file) as fh:
        try:
            fh.seek(h.offset)
            buf = bytearray(fh.read(nbytes))
        except (OSError, EOFError) as e:
            raise MifError(f"data cannot be read ({type(e).__name__}: {e})") from None
    if len(buf) < nbytes:
        raise MifError(f"data holds {len(buf)} bytes from offset {h.offset}; expected {nbytes} for dim {h.dim}")
    if h.dtype is None:   # MRtrix3 packs bit i of the image into byte i // 8, bit 7 - i % 8 (most significant first)
        return np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="big")[:n]
    return np.frombuffer(buf, h.dtype)


def disk_axes(layout) -> Tuple[List[int], List[bool]]:
    """The spatial axes (first three) in on-disk order, fastest first, and whether each runs backwards
    on disk -- the axis order and flips MRtrix3's NIfTI writer gives them."""
    order = sorted(range(3), key=lambda a: layout[a][1])
    return order, [layout[a][0] < 0 for a in order]


def nifti_affine(h: MifHeader) -> np.ndarray:
    """Voxel -> scanner affine (4, 4) of the array :func:`read` returns: ``transform`` times the voxel
    sizes, axes permuted and flipped to the on-disk order of the spatial axes."""
    A = np.eye(4)
    A[:3, :3] = h.transform[:, :3] * np.asarray(h.vox[:3], dtype=np.float64)
    A[:3, 3] = h.transform[:, 3]
    order, flip = disk_axes(h.layout)
    out = np.eye(4)
    out[:3, 3] = A[:3, 3]
    for k, (a, f) in enumerate(zip(order, flip)):
        out[:3, k] = -A[:3, a] if f else A[:3, a]
        if f:
            out[:3, 3] += (h.dim[a] - 1) * A[:3, a]
    return out


def read(path: str) -> Tuple[np.ndarray, np.ndarray, tuple, MifHeader]:
    """Load an MRtrix image: (data, affine (4, 4) voxel -> scanner mm, voxel sizes (3,) mm, header).

    data: (X, Y, Z, ...) in the file's own dtype (native byte order; float64 where ``scaling`` applies),
    spatial axes in on-disk order (see the module docstring).  Raises :class:`MifError` on a malformed
    file; needs at least 3 axes."""
    h = read_header(path)
    if len(h.dim) < 3:
        raise MifError(f"image has {len(h.dim)} axes {h.dim}; expected at least 3 (X, Y, Z)")
    flat = _raw(h)
    n = len(h.dim)
    fastest_first = sorted(range(n), key=lambda a: h.layout[a][1])
    arr = flat.reshape([h.dim[a] for a in reversed(fastest_first)])        # disk order, slowest first
    arr = np.transpose(arr, [n - 1 - fastest_first.index(a) for a in range(n)])   # image axes, disk direction
    order, _ = disk_axes(h.layout)
    extra = list(range(3, n))
    for a in extra:   # non-spatial axes keep image order (coefficient / volume index)
        if h.layout[a][0] < 0:
            arr = np.flip(arr, a)
    arr = np.transpose(arr, order + extra)
    if arr.dtype.byteorder not in ("=", "|"):   # stored in the other byte order: swap to native
        arr = arr.astype(arr.dtype.newbyteorder("="))
    off, mult = h.scaling
    if (off, mult) != (0.0, 1.0):
        arr = arr * np.float64(mult) + np.float64(off)
    vox = tuple(float(h.vox[a]) for a in order)
    return arr, nifti_affine(h), vox, h
