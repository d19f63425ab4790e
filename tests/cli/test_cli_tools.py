"""The user-facing tools (``fod``, ``render``, ``--help``, ``track``'s progress and summary), run as
subprocesses like a user would, on the Philips in-vivo data in ../shared/data."""
import os
import pty
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import PHILIPS, require_philips

SUBCOMMANDS = ("track", "demo", "parity", "bench", "info", "convert", "fod", "render")
BLOCK = (slice(49, 73), slice(52, 76), slice(27, 32))   # 24 x 24 x 5 voxels through the corpus callosum


def run(*args, check=True, **kw):
    p = subprocess.run([sys.executable, "-m", "tractfunc.cli", *args], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def test_help_lists_every_subcommand_and_each_has_examples():
    out = run("--help").stdout
    listed = re.search(r"\{([a-z0-9,]+)\}", out).group(1).split(",")
    assert set(SUBCOMMANDS) <= set(listed)
    for sub in listed:
        assert re.search(rf"^\s+{sub}\s+\S", out, re.M), f"{sub} has no one-line help"
        assert "examples:" in run(sub, "--help").stdout, f"{sub} --help has no examples"


@pytest.fixture(scope="module")
def philips_block(tmp_path_factory):
    """The Philips DWI, brain mask, WM mask and MRtrix3 FOD cropped to BLOCK (nibabel keeps the affine)."""
    require_philips()
    d = tmp_path_factory.mktemp("block")
    out = {}
    for key, name in [("dwi", "dwi"), ("mask", "dwi_brainmask"), ("wm", "dwi_wmmask_FA0.3"), ("ref", "dwi_fod_lmax8")]:
        img = nib.load(os.path.join(PHILIPS, name + ".nii.gz"))
        crop = img.slicer[BLOCK]
        out[key] = str(d / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine, crop.header), out[key])
    out["dir"] = d
    return out


def _peak_agreement(fod_path, block):
    from tractfunc.tools.csd import peak_angles
    wm = np.asarray(nib.load(block["wm"]).dataobj) > 0
    ours = np.asarray(nib.load(fod_path).dataobj)[wm]
    ref = np.asarray(nib.load(block["ref"]).dataobj)[wm]
    return peak_angles(ours, ref), ours, ref


def test_fod_matches_mrtrix_peaks_with_its_response(philips_block):
    b = philips_block
    out = str(b["dir"] / "fod_file.nii.gz")
    p = run("fod", b["dwi"], os.path.join(PHILIPS, "dwi.bval"), os.path.join(PHILIPS, "dwi.bvec"), out,
            "--mask", b["mask"], "--response", os.path.join(PHILIPS, "dwi_response.txt"))
    assert "MRtrix3 basis" in p.stdout
    img, dwi = nib.load(out), nib.load(b["dwi"])
    assert img.shape == dwi.shape[:3] + (45,) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, dwi.affine)
    mask = np.asarray(nib.load(b["mask"]).dataobj) > 0
    fod = np.asarray(img.dataobj)
    assert np.all(fod[~mask] == 0) and np.all(np.isfinite(fod)) and np.all(fod[mask][:, 0] > 0)
    ang, ours, ref = _peak_agreement(out, b)
    # dominant peak per WM voxel vs dwi2fod's (same response): basis and scanner frame both right
    assert len(ang) > 500
    assert np.nanmedian(ang) < 5 and np.mean(ang < 15) > 0.8, (np.nanmedian(ang), np.mean(ang < 15))
    # same response, same CSD equation: the amplitude scale is MRtrix3's
    assert 0.9 < np.median(ours[:, 0] / ref[:, 0]) < 1.1


def test_fod_automatic_response_and_bvec_frame(philips_block, tmp_path):
    b = philips_block
    out = str(tmp_path / "fod_auto.nii.gz")
    p = run("fod", b["dwi"], os.path.join(PHILIPS, "dwi.bval"), os.path.join(PHILIPS, "dwi.bvec"), out,
            "--mask", b["mask"])
    assert "response automatic" in p.stdout
    ang, _, _ = _peak_agreement(out, b)
    assert np.nanmedian(ang) < 15 and np.mean(ang < 15) > 0.5, (np.nanmedian(ang), np.mean(ang < 15))
    # bvecs read as if already in the scanner frame (DIPY's default; an x mirror for this LAS image): the
    # peaks disagree with MRtrix3's, so the agreement above does test the frame conversion
    bvec = np.loadtxt(os.path.join(PHILIPS, "dwi.bvec"))
    bvec[0] = -bvec[0]
    np.savetxt(tmp_path / "mirrored.bvec", bvec)
    bad = str(tmp_path / "fod_mirrored.nii.gz")
    run("fod", b["dwi"], os.path.join(PHILIPS, "dwi.bval"), str(tmp_path / "mirrored.bvec"), bad, "--mask", b["mask"])
    ang_bad, _, _ = _peak_agreement(bad, b)
    assert np.nanmedian(ang_bad) > 2 * np.nanmedian(ang)


def test_fod_bad_inputs_one_line_errors(philips_block, tmp_path):
    b = philips_block
    bval, bvec, out = os.path.join(PHILIPS, "dwi.bval"), os.path.join(PHILIPS, "dwi.bvec"), str(tmp_path / "o.nii.gz")
    np.savetxt(tmp_path / "short.bvec", np.ones((3, 5)))
    for args, says in [((b["dwi"], bval, str(tmp_path / "short.bvec"), out), "volumes"),
                       ((b["dwi"], bval, bvec, str(tmp_path / "o.mif")), ".nii"),
                       ((b["dwi"], bval, bvec, out, "--lmax", "7"), "even"),
                       ((b["dwi"], bval, bvec, out, "--mask", os.path.join(PHILIPS, "dwi_brainmask.nii.gz")), "grid")]:
        p = run("fod", *args, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def philips_tracks(tmp_path_factory):
    d = require_philips()
    out = tmp_path_factory.mktemp("tracks") / "p.tck"
    p = run("track", d["fod"], str(out), "--seed-image", d["seed"], "--mask", d["mask"], "--select", "300",
            "--threads", "2")
    return d, out, p


def test_track_summary_like_tckgen_and_quiet(philips_tracks, tmp_path):
    d, out, p = philips_tracks
    m = re.search(r"count/total_count = (\d+)/(\d+)", p.stdout)
    assert m and int(m.group(1)) == 300 <= int(m.group(2))
    assert len(nib.streamlines.load(str(out)).streamlines) == 300
    assert p.stderr == ""   # not a terminal: no progress line
    q = run("track", d["fod"], str(tmp_path / "q.tck"), "--seed-image", d["seed"], "--mask", d["mask"],
            "--select", "50", "--quiet")
    assert q.stdout == "" and q.stderr == ""


def test_track_progress_on_a_terminal(tmp_path):
    d = require_philips()
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "tractfunc.cli", "track", d["fod"], str(tmp_path / "t.tck"),
                            "--seed-image", d["seed"], "--mask", d["mask"], "--select", "200"],
                           stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    err = b"".join(chunks).decode()
    assert p.returncode == 0
    assert "\r" in err and "200 accepted" in err and "seeds]" in err and "streamlines/s" in err and "ETA" in err
    assert "count/total_count = 200/" in p.stdout


def _png(path):
    import matplotlib.pyplot as plt
    return plt.imread(str(path))[..., :3]


def _coloured(rgb):
    return (rgb.max(-1) - rgb.min(-1)) > 0.25


def test_render_philips_tractogram(philips_tracks, tmp_path):
    d, tck, _ = philips_tracks
    png = tmp_path / "p.png"
    p = run("render", str(tck), str(png), "--background", os.path.join(PHILIPS, "dwi_FA.nii.gz"), "--slab", "0")
    assert "300 of 300 streamlines drawn, 1500 x 540 pixels" in p.stdout
    rgb = _png(png)
    assert rgb.shape == (540, 1500, 3)
    col = _coloured(rgb)
    grey = ~col & (rgb.mean(-1) > 0.1)
    assert col.mean() > 0.02 and grey.mean() > 0.02   # streamlines drawn over a visible background
    for third in np.array_split(col, 3, axis=1):       # in each of the three views
        assert third.mean() > 0.01
    # a thin slab shows fewer streamline pixels than the full projection; a subset fewer still
    run("render", str(tck), str(tmp_path / "s.png"), "--background", os.path.join(PHILIPS, "dwi.nii.gz"),
        "--slab", "6", "--max-streamlines", "100")
    assert 0 < _coloured(_png(tmp_path / "s.png")).mean() < col.mean()


def test_render_orientation_is_neurological(tmp_path):
    """Streamlines at x = +40 mm (the subject's right) land right of the brain's centre in the coronal and
    axial views, and the sagittal view shows them with anterior (+y) to the right of posterior."""
    require_philips()
    from tractfunc.tools.render import load_background, render
    t = np.linspace(0, 1, 80)[:, None]
    line = np.array([40.0, -30.0, -30.0]) + t * [0.0, 60.0, 60.0]     # rising from posterior to anterior
    bg = load_background(os.path.join(PHILIPS, "dwi_FA.nii.gz"))
    out = render(line, np.array([80]), str(tmp_path / "r.png"), bg)
    rgb = _png(tmp_path / "r.png")
    assert out["pixels"] == (rgb.shape[1], rgb.shape[0])
    col = _coloured(rgb)
    brain = (rgb.mean(-1) > 0.05) & ~col
    thirds = np.array_split(np.arange(rgb.shape[1]), 3)
    for third in thirds[1:]:   # coronal, axial
        cols_line = np.nonzero(col[:, third])[1]
        assert len(cols_line) > 10
        assert cols_line.mean() > np.nonzero(brain[:, third])[1].mean() + 5
    rows, cols = np.nonzero(col[:, thirds[0]])          # sagittal: the line rises to the right (image rows go down)
    assert np.corrcoef(cols, rows)[0, 1] < -0.9


def test_sift2_parser_defaults_are_the_library_defaults():
    """The torch-free parser's copy of tcksift2's defaults equals tractfunc.maps.sift2's."""
    from tractfunc.cli.maps import SIFT2_DEFAULTS
    from tractfunc.maps.sift2 import DEFAULTS
    names = [n for n in vars(DEFAULTS) if n.isupper()]
    assert len(names) == 7 and all(getattr(SIFT2_DEFAULTS, n) == getattr(DEFAULTS, n) for n in names)
