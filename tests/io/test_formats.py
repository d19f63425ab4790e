"""File formats: the MRtrix .mif reader against mrconvert, .tck/.trk/.trx round trips checked by MRtrix3
(tckinfo, tckconvert, tckstats) and DIPY (load_tractogram), the one-call converters, and the ``info`` /
``convert`` subcommands (and ``track`` on .mif input / .trx output) run as subprocesses on real data."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import require_philips, require_tckgen
from tractfunc import io
from tractfunc.io import mif, tractogram as T
from tractfunc.errors import TractfuncError

TOL_MM = 1e-4


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "tractfunc.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def mrtrix(*args):
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def world_index_map(A, A_ref, shape):
    """For every voxel of an image with affine A and spatial shape ``shape``, the voxel index (3, n) of
    the same point in an image with affine A_ref; asserts the grids coincide (signed permutation)."""
    M = np.linalg.inv(A_ref) @ A
    P, t = np.round(M[:3, :3]), np.round(M[:3, 3])
    assert np.allclose(M[:3, :3], P, atol=1e-6) and np.allclose(M[:3, 3], t, atol=1e-5), M
    idx = np.indices(shape).reshape(3, -1)
    return (P @ idx + t[:, None]).astype(int)


def assert_same_lines(a: T.TrackFile, b: T.TrackFile, tol=TOL_MM):
    assert np.array_equal(a.lengths, b.lengths)
    assert np.abs(a.vertices.astype(np.float64) - b.vertices).max() <= tol


# ---------------------------------------------------------------------------------------------------
# .mif reader vs mrconvert


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """A real FOD crop (20 x 30 x 10 x 45, LAS like the source) and its white-matter mask, as NIfTI."""
    require_tckgen("mrconvert")
    p = require_philips()
    d = tmp_path_factory.mktemp("crop")
    sl = (slice(40, 60), slice(50, 80), slice(25, 35))
    fod, msk = nib.load(p["fod"]), nib.load(p["seed"])
    nib.save(fod.slicer[sl], d / "fod.nii.gz")
    nib.save(msk.slicer[sl], d / "mask.nii.gz")
    return d


@pytest.mark.parametrize("strides,dtype,ext", [
    (None, "float32le", ".mif"),          # mrconvert's default: the NIfTI's own layout (-0,+1,+2,+3)
    ("1,2,3,4", "float32le", ".mif"),
    ("-1,2,3,4", "float64be", ".mif.gz"),
    ("4,1,2,3", "float32be", ".mif"),     # coefficients slowest... and x after y, z on disk
    ("-2,3,-1,-4", "float64le", ".mif.gz"),
])
def test_mif_fod_matches_mrconvert(crop, tmp_path, strides, dtype, ext):
    src = crop / "fod.nii.gz"
    out = tmp_path / f"fod{ext}"
    mrtrix("mrconvert", "-quiet", src, out, "-datatype", dtype, *(["-strides", strides] if strides else []))
    img = io.load_fod(str(out))
    ref = io.load_fod(str(src))
    # 1. what MRtrix3 itself writes as NIfTI from this .mif: the same array and affine (except where the
    # coefficient axis runs backwards on disk: MRtrix3 3.0.3's NIfTI writer then stores the volumes in
    # reverse order, which its own reader does not undo; the check against the source below covers it)
    if not (strides or "").endswith("-4"):
        back = tmp_path / "back.nii"
        mrtrix("mrconvert", "-quiet", out, back)
        nb = nib.load(back)
        assert img.data.shape == nb.shape and np.array_equal(img.data, np.asarray(nb.dataobj, dtype=np.float32))
        assert np.allclose(img.affine, nb.affine, atol=1e-5)
    # 2. the same world-space image as the source NIfTI (data equal voxel for voxel, same voxel sizes)
    j = world_index_map(img.affine, ref.affine, img.data.shape[:3])
    assert np.array_equal(img.data.reshape(-1, 45), ref.data[j[0], j[1], j[2]])
    assert sorted(img.voxel_sizes) == pytest.approx(sorted(ref.voxel_sizes))
    if strides is None:   # default strides: identical to the NIfTI route
        assert np.array_equal(img.data, ref.data) and np.allclose(img.affine, ref.affine, atol=1e-9)
        assert img.voxel_sizes == pytest.approx(ref.voxel_sizes)
    # mrinfo's transform (direction cosines, translation) is the header's
    h = mif.read_header(str(out))
    tr = np.array([[float(v) for v in r.split()] for r in
                   mrtrix("mrinfo", "-quiet", out, "-transform").strip().splitlines()])
    assert np.allclose(tr[:3], h.transform, atol=1e-9)


@pytest.mark.parametrize("strides,dtype,ext", [(None, "bit", ".mif"), ("3,-1,2", "uint8", ".mif.gz"),
                                               ("-1,-2,3", "int16be", ".mif")])
def test_mif_mask_matches_nifti(crop, tmp_path, strides, dtype, ext):
    src = crop / "mask.nii.gz"
    out = tmp_path / f"mask{ext}"
    mrtrix("mrconvert", "-quiet", src, out, "-datatype", dtype, *(["-strides", strides] if strides else []))
    m, ref = io.load_mask(str(out)), io.load_mask(str(src))
    assert ref.data.any() and not ref.data.all()
    j = world_index_map(m.affine, ref.affine, m.data.shape)
    assert np.array_equal(m.data.reshape(-1), ref.data[j[0], j[1], j[2]])


def test_mif_scaling_and_separate_data_file(crop, tmp_path):
    """``scaling`` is applied (as in the NIfTI mrconvert writes), and a .mih header reads its data file."""
    out = tmp_path / "scaled.mif"
    mrtrix("mrconvert", "-quiet", crop / "fod.nii.gz", out, "-datatype", "int16le", "-scaling", "0.5,0.001")
    h = mif.read_header(str(out))
    assert h.scaling == (0.5, 0.001)
    back = tmp_path / "scaled.nii"
    mrtrix("mrconvert", "-quiet", out, back)
    img = io.load_fod(str(out), dtype=np.float64)
    assert np.allclose(img.data, np.asarray(nib.load(back).dataobj, dtype=np.float64), rtol=0, atol=1e-6)
    mih = tmp_path / "fod.mih"
    mrtrix("mrconvert", "-quiet", crop / "fod.nii.gz", mih)
    assert mif.read_header(str(mih)).data_file != str(mih)
    assert np.array_equal(io.load_fod(str(mih)).data, io.load_fod(str(crop / "fod.nii.gz")).data)


def test_mif_errors(tmp_path):
    bad = tmp_path / "bad.mif"
    bad.write_bytes(b"not an image\n")
    with pytest.raises(TractfuncError, match="not an MRtrix image"):
        io.load_fod(str(bad))
    head = "mrtrix image\ndim: 2,2,2\nvox: 1,1,1\nlayout: +0,+1,+2\ndatatype: Float32LE\nfile: . {}\nEND\n"
    text = head.format(200).encode()
    (tmp_path / "short.mif").write_bytes(text + b"\0" * (200 - len(text)) + b"\0" * 8)   # 8 of 32 bytes
    with pytest.raises(TractfuncError, match="expected 32"):
        io.load_mask(str(tmp_path / "short.mif"))
    (tmp_path / "nolayout.mif").write_bytes(head.replace("layout: +0,+1,+2\n", "").format(0).encode())
    with pytest.raises(TractfuncError, match="layout"):
        io.load_mask(str(tmp_path / "nolayout.mif"))
    with pytest.raises(TractfuncError, match="no such file"):
        io.load_fod(str(tmp_path / "missing.mif"))
    (tmp_path / "badoffset.mif").write_bytes(head.format("x12").encode())
    with pytest.raises(TractfuncError, match="integer byte offset"):
        io.load_mask(str(tmp_path / "badoffset.mif"))


def test_lengths_and_header_only_grid(tmp_path):
    """Arc lengths with 0-vertex streamlines (one last); the grid of a .trk/.trx from its header."""
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=np.float32)
    assert np.array_equal(T.streamline_lengths(v, np.array([2, 0, 1, 0])), [1.0, 0.0, 0.0, 0.0])
    A = np.array([[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1.0]])
    t = T.TrackFile(v, np.array([2, 1]), A, (40, 50, 30), {})
    for ext in (".trk", ".trx"):
        path = str(tmp_path / ("x" + ext))
        T.save_tractogram(t, path)
        affine, dims = T.reference_grid(path)
        assert np.allclose(affine, A) and dims == (40, 50, 30)


# ---------------------------------------------------------------------------------------------------
# tracking on Philips, then formats


@pytest.fixture(scope="module")
def philips_run(tmp_path_factory):
    """300 Philips streamlines tracked by the CLI into .tck and (same seed) .trx."""
    p = require_philips()
    d = tmp_path_factory.mktemp("philips")
    args = ["--seed-image", p["seed"], "--mask", p["mask"], "--select", 300, "--rng-seed", 5, "--threads", 2,
            "--quiet"]
    cli("track", p["fod"], d / "a.tck", *args)
    cli("track", p["fod"], d / "a.trx", *args)
    return dict(p, dir=d, tck=d / "a.tck", trx=d / "a.trx", args=args)


@pytest.fixture(scope="module")
def philips_mif(philips_run):
    """The Philips FOD converted by mrconvert to .mif (default strides)."""
    require_tckgen("mrconvert")
    fod = philips_run["dir"] / "fod.mif"
    mrtrix("mrconvert", "-quiet", philips_run["fod"], fod)
    return fod


def test_track_writes_trx_with_tckgen_header(philips_run):
    tck, trx = T.load_tractogram(str(philips_run["tck"])), T.load_tractogram(str(philips_run["trx"]))
    assert len(tck.lengths) == 300
    assert np.array_equal(tck.lengths, trx.lengths) and np.array_equal(tck.vertices, trx.vertices)
    fod = nib.load(philips_run["fod"])
    assert np.allclose(trx.affine, fod.affine, atol=1e-9) and trx.dims == fod.shape[:3]
    for key in ("step_size", "max_angle", "threshold", "min_dist", "max_dist", "method", "source"):
        assert trx.header[key] == tck.header[key]
    assert int(trx.header["total_count"]) >= 300
    assert float(trx.header["step_size"]) == pytest.approx(0.1 * 1.75, rel=0.2)


def test_roundtrip_tck_trk_trx_tck_with_mrtrix(philips_run, tmp_path):
    require_tckgen("tckconvert")
    src = philips_run["tck"]
    ref = philips_run["fod"]
    cli("convert", src, tmp_path / "a.trk", "--reference", ref, "--quiet")
    cli("convert", tmp_path / "a.trk", tmp_path / "a.trx", "--quiet")
    cli("convert", tmp_path / "a.trx", tmp_path / "b.tck", "--quiet")
    orig = T.load_tractogram(str(src))
    for f in ("a.trk", "a.trx", "b.tck"):
        assert_same_lines(orig, T.load_tractogram(str(tmp_path / f)))
    # MRtrix3 reads the result: count from tckinfo, vertices through tckconvert's own writer
    info = mrtrix("tckinfo", tmp_path / "b.tck", "-count")
    assert "actual count in file: 300" in " ".join(info.split())
    mrtrix("tckconvert", "-quiet", tmp_path / "b.tck", tmp_path / "c.tck")
    assert_same_lines(orig, T.load_tractogram(str(tmp_path / "c.tck")))
    # the .trk grid is the reference's
    trk = nib.streamlines.load(str(tmp_path / "a.trk"))
    assert np.allclose(trk.header["voxel_to_rasmm"], nib.load(ref).affine, atol=1e-5)


def test_dipy_load_tractogram_agrees(philips_run, tmp_path):
    from dipy.io.streamline import load_tractogram
    ref = philips_run["fod"]
    orig = T.load_tractogram(str(philips_run["tck"]))
    cli("convert", philips_run["tck"], tmp_path / "a.trk", "--reference", ref, "--quiet")
    for path, reference in ((philips_run["tck"], ref), (tmp_path / "a.trk", "same"), (philips_run["trx"], "same")):
        sft = load_tractogram(str(path), reference)
        sft.to_rasmm()
        got = T.TrackFile(np.asarray(sft.streamlines.get_data()), np.array([len(s) for s in sft.streamlines]))
        assert_same_lines(orig, got)
        assert np.allclose(sft.affine, nib.load(ref).affine, atol=1e-5)


def test_info_cli_agrees_with_tckinfo_and_tckstats(philips_run, tmp_path):
    require_tckgen("tckstats")
    p = cli("info", philips_run["tck"], philips_run["trx"])
    assert p.stdout.count("count:            300") == 2 and "step_size" in p.stdout and "total_count" in p.stdout
    js = json.loads(cli("info", philips_run["tck"], "--json", "-").stdout)
    assert js["count"] == 300 and js["vertices"] == int(T.load_tractogram(str(philips_run["tck"])).lengths.sum())
    stats = mrtrix("tckstats", "-quiet", philips_run["tck"]).split()
    mean, _, _, lo, hi, count = (float(v) for v in stats[-6:])
    assert count == js["count"]
    assert js["length_mean_mm"] == pytest.approx(mean, rel=1e-4)
    assert js["length_min_mm"] == pytest.approx(lo, rel=1e-4) and js["length_max_mm"] == pytest.approx(hi, rel=1e-4)
    cli("info", philips_run["trx"], "--json", tmp_path / "i.json")
    assert json.loads((tmp_path / "i.json").read_text())["header"]["method"] == "SDStream"   # as tckgen writes it
    assert "examples:" in cli("info", "--help").stdout


def test_convert_cli_needs_reference_for_trk(philips_run, tmp_path):
    p = cli("convert", philips_run["tck"], tmp_path / "x.trk", check=False)
    assert p.returncode == 2 and "--reference" in p.stderr and not (tmp_path / "x.trk").exists()
    p = cli("convert", philips_run["tck"], tmp_path / "x.vtk", check=False)
    assert p.returncode == 2 and "extension" in p.stderr
    assert "examples:" in cli("convert", "--help").stdout
    # .tck -> .trx with a .mif reference: the grid recorded is the image's
    mrtrix("mrconvert", "-quiet", philips_run["mask"], tmp_path / "mask.mif")
    cli("convert", philips_run["tck"], tmp_path / "x.trx", "--reference", tmp_path / "mask.mif", "--quiet")
    t = T.load_tractogram(str(tmp_path / "x.trx"))
    assert np.allclose(t.affine, nib.load(philips_run["mask"]).affine, atol=1e-9)
    assert t.header["step_size"] == T.load_tractogram(str(philips_run["tck"])).header["step_size"]


def test_track_mif_input_matches_nifti(philips_run, philips_mif, tmp_path):
    """The FOD and mask converted by mrconvert track (native kernel) like the NIfTI originals.  The .mif
    stores the transform to 15 significant digits, so the scanner->voxel transform differs from the
    NIfTI's in the last bits of double precision: equal up to rounding-level drift (< 1e-3 mm)."""
    fod, mask = philips_mif, tmp_path / "mask.mif.gz"
    mrtrix("mrconvert", "-quiet", philips_run["mask"], mask, "-datatype", "bit")
    args = list(philips_run["args"])
    args[args.index(philips_run["mask"])] = mask
    cli("track", fod, tmp_path / "m.tck", *args)
    a, b = T.load_tractogram(str(philips_run["tck"])), T.load_tractogram(str(tmp_path / "m.tck"))
    assert_same_lines(a, b, tol=1e-3)


# ---------------------------------------------------------------------------------------------------
# one-call converters


def test_converters_from_track_results(phantom_field):
    import torch
    from dipy.io.stateful_tractogram import StatefulTractogram
    from conftest import phantom_seeds
    from tractfunc.sdstream.track import track
    f = phantom_field
    pts, dirs, field = phantom_seeds(f, 40, 0)
    res = track(field, f["params"], pts, dirs, mask=f["mask"])
    packed = track(field, f["params"], pts, dirs, mask=f["mask"])
    lines = [s.numpy() for s in res.streamlines()]
    assert len(lines) > 10
    for r in (res, packed):
        nt = T.to_nibabel_tractogram(r)
        assert len(nt.streamlines) == len(lines)
        assert all(np.array_equal(a, b) for a, b in zip(nt.streamlines, lines))
        sft = T.to_stateful_tractogram(r, f["img"])
        assert isinstance(sft, StatefulTractogram) and len(sft) == len(lines)
        assert np.allclose(sft.affine, f["img"].affine)
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(sft.streamlines, lines))
        sft.to_vox()   # the voxel frame DIPY derives from the reference is the image's
        v0 = np.linalg.inv(f["img"].affine) @ np.append(lines[0][0], 1.0)
        assert np.allclose(sft.streamlines[0][0], v0[:3], atol=1e-4)
    with pytest.raises(TractfuncError, match="reference"):
        T.to_stateful_tractogram(res)
    assert torch.is_tensor(res.streamlines()[0])


def test_stateful_roundtrip_through_dipy_save(phantom_files, tmp_path):
    from dipy.io.streamline import save_tractogram
    ph, paths = phantom_files
    rng = np.random.default_rng(0)
    lines = [np.cumsum(rng.normal(size=(n, 3)), 0).astype(np.float32) + 10 for n in (2, 5, 17)]
    tracks = T.TrackFile(np.concatenate(lines), np.array([2, 5, 17]))
    sft = T.to_stateful_tractogram(tracks, paths["fod"])
    save_tractogram(sft, str(tmp_path / "d.trk"), bbox_valid_check=False)
    save_tractogram(sft, str(tmp_path / "d.trx"), bbox_valid_check=False)
    for f in ("d.trk", "d.trx"):
        back = T.load_tractogram(str(tmp_path / f))
        assert_same_lines(tracks, back)
        assert np.allclose(back.affine, io.load_fod(paths["fod"]).affine, atol=1e-5)
    assert np.allclose(T.streamline_lengths(tracks.vertices, tracks.lengths),
                       [np.linalg.norm(np.diff(s, axis=0), axis=1).sum() for s in lines], rtol=1e-6)


def test_mif_fod_bit_identical_to_tckgen_on_the_same_mif(philips_run, philips_mif, tmp_path):
    """tckgen and tractfunc both reading the .mif FOD and a bit-packed .mif mask (strides unlike the
    NIfTI's), tckgen given the start direction: every streamline equal bit for bit, so the reader hands the
    kernel the image tckgen sees (layout, transform, voxel sizes, mask bits)."""
    require_tckgen("tckgen")
    from tractfunc.sdstream import native
    from tractfunc.tools import parity
    if not native.available()[0]:
        pytest.skip(f"native kernel unavailable: {native.available()[1]}")
    fod, mask = philips_mif, tmp_path / "mask.mif"
    mrtrix("mrconvert", "-quiet", philips_run["mask"], mask, "-datatype", "bit", "-strides", "3,1,2")
    tck, csv, start = str(tmp_path / "ref.tck"), str(tmp_path / "seeds.csv"), (0.3, 0.5, 0.81)
    parity.run_tckgen(str(fod), tck, csv, philips_run["seed"], str(mask), 300, nthreads=0, rng_seed=3,
                      seed_direction=start)
    r = parity.compare(parity.load_reference(tck, csv), str(fod), str(mask), False, start=start)
    assert r.engine == "native" and r.lost == 0 and r.identical == 1.0
