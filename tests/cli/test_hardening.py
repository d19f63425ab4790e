"""Issue 16 (hardening): what a new user hits on real files.  Every failure is one line on stderr, a non-zero exit,
no traceback, and never a lost or partial file.  Runs the command line in-process (``main(argv)``) on the
built-in phantom, so the whole file stays fast; the header is compared with tckgen's own where MRtrix3 is present.
"""
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import leftovers, require_tckgen, seed_voxel_points
from tractfunc.cli.commands import build_parser, main


def cli(capsys, *args):
    """Run ``tractfunc ARGS`` in-process: (exit code, stdout, stderr); argparse errors are exit codes too."""
    try:
        rc = main([str(x) for x in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *words):
    assert rc not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def ph(phantom_files, tmp_path_factory):
    """Phantom FOD / mask paths, seed points inside the seed region and a small tractogram."""
    p, paths = phantom_files
    d = tmp_path_factory.mktemp("hard")
    g = np.random.default_rng(0)
    pts = d / "pts.txt"
    np.savetxt(pts, seed_voxel_points(p, 30, g))
    tck = d / "small.tck"
    assert main(["track", paths["fod"], str(tck), "--seed-image", paths["mask"], "--select", "20", "--quiet"]) == 0
    return dict(p=p, fod=paths["fod"], mask=paths["mask"], pts=str(pts), tck=str(tck), dir=d)


# 1. existing outputs ---------------------------------------------------------------------------------------------


def test_track_refuses_an_existing_output_unless_forced(ph, tmp_path, capsys):
    out = tmp_path / "existing.tck"
    out.write_bytes(b"precious")
    rc, _, err = cli(capsys, "track", ph["fod"], out, "--seed-image", ph["mask"], "--select", "10")
    one_line_error(rc, err, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    rc, _, err = cli(capsys, "track", ph["fod"], out, "--seed-image", ph["mask"], "--select", "10", "--force",
                     "--quiet")
    assert rc == 0, err
    assert len(nib.streamlines.load(str(out)).streamlines) == 10 and not leftovers(tmp_path)


@pytest.mark.parametrize("cmd", ["convert", "fod", "render", "info", "demo", "track_seeds"])
def test_every_writing_command_refuses_an_existing_output_before_any_work(ph, tmp_path, capsys, cmd):
    """Inputs that do not even exist: the output check comes first, so no work (or input error) happens."""
    missing = str(tmp_path / "missing.nii.gz")
    target = tmp_path / {"convert": "o.trk", "fod": "o.nii.gz", "render": "o.png", "info": "o.json",
                         "demo": "phantom.tck", "track_seeds": "seeds.csv"}[cmd]
    target.write_bytes(b"old")
    args = {"convert": ["convert", ph["tck"], target, "--reference", ph["fod"]],
            "fod": ["fod", missing, missing, missing, target],
            "render": ["render", ph["tck"], target],
            "info": ["info", ph["tck"], "--json", target],
            "demo": ["demo", "--out", tmp_path, "--seeds", "10"],
            "track_seeds": ["track", ph["fod"], tmp_path / "t.tck", "--seed-image", ph["mask"], "--output-seeds",
                            target]}[cmd]
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "already exists", "--force")
    assert target.read_bytes() == b"old" and not (tmp_path / "t.tck").exists()


def test_an_output_that_is_an_input_is_refused_even_with_force(ph, tmp_path, capsys):
    tck = tmp_path / "a.tck"
    tck.write_bytes(open(ph["tck"], "rb").read())
    before = tck.read_bytes()
    rc, _, err = cli(capsys, "convert", tck, tck, "--force")
    one_line_error(rc, err, "is also the input")
    alias = tmp_path / "alias.tck"
    os.symlink(tck, alias)   # the same file by another name
    rc, _, err = cli(capsys, "convert", tck, alias, "--force")
    one_line_error(rc, err, "is also the input")
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-points", ph["pts"], "--output-seeds",
                     ph["pts"], "--force")
    one_line_error(rc, err, "is also the input", "--seed-points")
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", ph["mask"], "--output-seeds",
                     tmp_path / "o.tck", "--force")
    one_line_error(rc, err, "given as both")
    assert tck.read_bytes() == before


@pytest.mark.parametrize("where", ["no_folder", "folder", "extension"])
def test_output_paths_that_cannot_be_written(ph, tmp_path, capsys, where):
    out = {"no_folder": tmp_path / "nope" / "o.tck", "folder": tmp_path, "extension": tmp_path / "o.txt"}[where]
    rc, _, err = cli(capsys, "track", ph["fod"], out, "--seed-image", ph["mask"], "--select", "5")
    one_line_error(rc, err, {"no_folder": "does not exist", "folder": "is a folder", "extension": ".tck"}[where])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(ph, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = cli(capsys, "convert", ph["tck"], ro / "o.tck")
        one_line_error(rc, err, "cannot write")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("ext", [".tck", ".trk"])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(ph, tmp_path, capsys, monkeypatch, failure, ext):
    """A full disk or Ctrl-C in the middle of writing: the file that was there survives, no temporary remains."""
    from tractfunc.io import images
    out = tmp_path / ("o" + ext)
    out.write_bytes(b"old")

    def boom(*a, **k):
        raise failure
    monkeypatch.setattr(images.TckWriter, "write_raw", boom)
    monkeypatch.setattr(nib.streamlines.TrkFile, "save", boom)
    rc, _, err = cli(capsys, "convert", ph["tck"], out, "--reference", ph["fod"], "--force")
    if isinstance(failure, KeyboardInterrupt):
        assert rc == 130 and "interrupted" in err
    else:
        one_line_error(rc, err, "No space left")
    assert out.read_bytes() == b"old" and not leftovers(tmp_path)


# 2. memory follows the streamlines, not max_length / step ------------------------------------------------------


def test_huge_max_length_tracks_in_memory_of_the_streamlines(ph, tmp_path, capsys):
    """--max-length 1e9 makes the vertex budget ~5e9 points per streamline; the buffers grow with what is traced
    (a (seeds, budget, 3) buffer would be terabytes)."""
    from tractfunc import io
    from tractfunc.core.params import resolve
    from tractfunc.sdstream import native
    if not native.available()[0]:
        pytest.skip("native kernel unavailable")
    img = io.load_fod(ph["fod"])
    prm = resolve(img.voxel_sizes, max_length=1e9)
    assert prm.max_points > 1e9
    k = native.Kernel(img.data, img.affine, prm)
    pts = np.loadtxt(ph["pts"])
    v, lengths, ids, sidx, reasons, acc = k.track(pts, np.tile([1.0, 0.0, 0.0], (len(pts), 1)), threads=1)
    assert len(lengths) > 10 and len(v) == lengths.sum() and lengths.max() < 10000
    rc, out, err = cli(capsys, "track", ph["fod"], tmp_path / "long.tck", "--seed-image", ph["mask"], "--select", "10",
                       "--max-length", "1e9")
    assert rc == 0, err
    assert "max_dist: 1e+09" in open(tmp_path / "long.tck", "rb").read(2000).decode("latin1")


def test_a_step_below_float_resolution_is_refused_up_front(ph, tmp_path, capsys):
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", ph["mask"], "--step", "1e-9")
    one_line_error(rc, err, "--step", "resolution")
    assert not (tmp_path / "o.tck").exists()


# 3. seeds that cannot land, and runs that accept nothing ------------------------------------------------------


def _shifted(src, dst, shift_mm=None, keep=None):
    img = nib.load(src)
    A = img.affine.copy()
    if shift_mm is not None:
        A[:3, 3] += shift_mm
    data = np.asarray(img.dataobj)
    if keep is not None:
        data = np.zeros_like(data)
        data[keep] = 1
    nib.save(nib.Nifti1Image(data, A), str(dst))
    return str(dst)


def test_seed_image_outside_the_fod_fails_before_tracking(ph, tmp_path, capsys):
    seed = _shifted(ph["mask"], tmp_path / "far.nii.gz", shift_mm=[500.0, 0, 0])
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", seed)
    one_line_error(rc, err, "field of view")
    assert not (tmp_path / "o.tck").exists()


def test_seed_image_disjoint_from_the_mask_fails_before_tracking(ph, tmp_path, capsys):
    mask = _shifted(ph["mask"], tmp_path / "corner.nii.gz", keep=(slice(0, 2), slice(0, 2), slice(0, 2)))
    seed = _shifted(ph["mask"], tmp_path / "centre.nii.gz", keep=(slice(20, 22), slice(20, 22), slice(8, 10)))
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", seed, "--mask", mask)
    one_line_error(rc, err, "inside the mask")


def test_seed_points_all_outside_fail_even_when_skipping(ph, tmp_path, capsys):
    far = tmp_path / "far.txt"
    np.savetxt(far, np.loadtxt(ph["pts"]) + 1000.0)
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-points", far, "--outside", "skip")
    one_line_error(rc, err, "all 30 seed points lie outside")


@pytest.mark.parametrize("rule,args", [("at the seed point", ["--cutoff", "1e6"]),
                                       ("shorter than the minimum length", ["--min-length", "1e4"])])
def test_no_accepted_streamline_is_an_error_naming_the_rule(ph, tmp_path, capsys, rule, args):
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", ph["mask"], "--seeds", "200",
                     "--select", "5", *args)
    one_line_error(rc, err, "no streamline accepted from 200 seeds", rule)
    n = {"at the seed point": r"(\d+) seeds rejected at the seed point",
         "shorter than the minimum length": r"(\d+) streamlines shorter than the minimum length"}[rule]
    assert int(re.search(n, err).group(1)) > 100
    assert not (tmp_path / "o.tck").exists() and not leftovers(tmp_path)


# 4. counts: 0 as tckgen ---------------------------------------------------------------------------------------


def _header(path):
    raw = open(path, "rb").read(4096)
    text = raw[:raw.index(b"\nEND\n")].decode()
    return dict(line.split(": ", 1) for line in text.splitlines()[1:] if not line.startswith("roi:"))


def test_select_zero_means_no_limit_until_seeds(ph, tmp_path, capsys):
    out = tmp_path / "s0.tck"
    rc, so, err = cli(capsys, "track", ph["fod"], out, "--seed-image", ph["mask"], "--select", "0", "--seeds", "60")
    assert rc == 0, err
    n = int(re.search(r": (\d+) streamlines from 60 seeds", so).group(1))
    assert 20 < n <= 60 and len(nib.streamlines.load(str(out)).streamlines) == n
    h = _header(out)
    assert (h["max_num_tracks"], h["max_num_seeds"], h["count"]) == ("0", "60", str(n))
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "x.tck", "--seed-image", ph["mask"], "--select", "0")
    one_line_error(rc, err, "--select 0", "--seeds")


def test_seeds_zero_means_no_seed_limit(ph, tmp_path, capsys):
    out = tmp_path / "n0.tck"
    rc, so, err = cli(capsys, "track", ph["fod"], out, "--seed-image", ph["mask"], "--seeds", "0", "--select", "7")
    assert rc == 0, err
    assert _header(out)["max_num_seeds"] == "0" and _header(out)["count"] == "7"


@pytest.mark.parametrize("flag,value", [("--select", "-1"), ("--seeds", "-5"), ("--threads", "-1"), ("--chunk", "0"),
                                        ("--workers", "0"), ("--step", "nan"), ("--step", "-1"), ("--step", "inf"),
                                        ("--angle", "0"), ("--angle", "nan"), ("--cutoff", "-0.1"),
                                        ("--cutoff", "inf"), ("--min-length", "nan"), ("--max-length", "inf"),
                                        ("--max-length", "0"), ("--max-length", "-3")])
def test_out_of_range_numbers_are_one_line_errors_naming_the_option(ph, tmp_path, capsys, flag, value):
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", ph["mask"], flag, value)
    one_line_error(rc, err, flag, "expected")
    assert not os.listdir(tmp_path)


# 5-6. the header as tckgen writes it ---------------------------------------------------------------------------


def test_header_keys_and_numbers_as_tckgen(ph, tmp_path, capsys):
    require_tckgen()
    ours, theirs = tmp_path / "tf.tck", tmp_path / "mr.tck"
    rc, so, err = cli(capsys, "track", ph["fod"], ours, "--seed-image", ph["mask"], "--select", "20")
    assert rc == 0, err
    subprocess.run(["tckgen", "-algorithm", "SD_Stream", ph["fod"], str(theirs), "-seed_image", ph["mask"], "-select",
                    "20", "-nthreads", "0", "-quiet"], check=True)
    a, b = _header(ours), _header(theirs)
    assert set(a) - {"tractfunc_version"} == set(b) - {"mrtrix_version"}
    for key in ("step_size", "max_dist", "min_dist", "threshold", "init_threshold", "max_angle", "method", "rk4",
                "max_num_tracks", "max_num_seeds", "sh_precomputed", "unidirectional", "datatype"):
        assert a[key] == b[key], key
    raw = open(ours, "rb").read(4096)
    assert raw.startswith(b"mrtrix tracks    \n") and re.search(rb"\ncount: 20\ntotal_count: \d+\nEND\n", raw)
    assert int(a["file"].split()[1]) % 4 == 0
    assert a["command_history"].startswith("tractfunc track ") and float(a["timestamp"]) > 1.7e9
    info = subprocess.run(["tckinfo", str(ours)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\n\s+count:\s+20\n", info) and re.search(r"\n\s+total_count:\s+[1-9]\d*\n", info)
    # total_count as tckgen's: streamlines generated (written + too short), not seeds drawn
    m = re.search(r"from (\d+) seeds \(count/total_count = 20/(\d+); (\d+) seeds rejected.*; (\d+) streamlines shorter",
                  so)
    seeds, total, rejected, short = map(int, m.groups())
    assert int(a["total_count"]) == total == 20 + short == seeds - rejected
    assert int(b["total_count"]) <= int(b["count"]) + 1000 and int(b["total_count"]) >= int(b["count"])


def test_total_count_excludes_seeds_rejected_at_the_seed(ph, tmp_path, capsys):
    """Seed points half of which lie outside the mask: they count in neither count nor total_count."""
    p = ph["p"]
    far = np.argwhere(~p.mask)[:30] @ p.affine[:3, :3].T + p.affine[:3, 3]
    pts = tmp_path / "mixed.txt"
    np.savetxt(pts, np.vstack([np.loadtxt(ph["pts"]), far]))
    out = tmp_path / "m.tck"
    rc, so, err = cli(capsys, "track", ph["fod"], out, "--seed-points", pts, "--mask", ph["mask"])
    assert rc == 0, err
    h = _header(out)
    assert int(h["count"]) <= int(h["total_count"]) <= 30


# 7. the command line does not guess ----------------------------------------------------------------------------


def test_no_abbreviated_options_and_the_subcommands_usage(ph, tmp_path, capsys):
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-points", ph["pts"], "--seed-direction",
                     "0.3,0.5,0.81")
    assert rc == 2 and "usage: tractfunc track" in err and "did you mean --seed-directions?" in err
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", ph["mask"], "-select", "10")
    assert rc == 2 and "usage: tractfunc track" in err and "two dashes: --select" in err
    rc, _, err = cli(capsys, "convert", "a.tck", "b.tck", "--ref", "x.nii")
    assert rc == 2 and "usage: tractfunc convert" in err and "--ref" in err
    assert not os.listdir(tmp_path)


def test_threads_zero_means_no_extra_threads(ph, tmp_path, capsys):
    rc, so, err = cli(capsys, "track", ph["fod"], tmp_path / "t0.tck", "--seed-image", ph["mask"], "--select", "5",
                      "--threads", "0")
    assert rc == 0 and "5 streamlines" in so, err


def test_no_traceback_from_a_subprocess(ph, tmp_path):
    """The real entry point: exit code 2 and one line for a refused run."""
    p = subprocess.run([sys.executable, "-m", "tractfunc.cli", "track", ph["fod"], ph["tck"], "--seed-image",
                        ph["mask"]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "already exists" in p.stderr


# 8. render ------------------------------------------------------------------------------------------------------


def test_render_defaults_to_a_slab_and_one_scale(ph, tmp_path, capsys):
    from tractfunc.tools import render
    assert build_parser().parse_args(["render", "a.tck", "b.png"]).slab == 10.0
    full = render.render_file(ph["tck"], str(tmp_path / "full.png"), slab=0)
    slab = render.render_file(ph["tck"], str(tmp_path / "slab.png"), slab=10.0)
    assert sum(slab["segments"]) < sum(full["segments"])
    for out in (full, slab):
        s = np.array(out["mm_per_pixel"])
        assert np.allclose(s, s[0, 0], rtol=0.02), s   # three views, both axes: the same mm per pixel
    rc, so, err = cli(capsys, "render", ph["tck"], tmp_path / "cli.png")
    assert rc == 0 and (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG" and not leftovers(tmp_path)


# empty inputs ---------------------------------------------------------------------------------------------------


def test_empty_tractograms(ph, tmp_path, capsys):
    from tractfunc import io
    empty = tmp_path / "empty.tck"
    io.write_tractogram(str(empty), [], None)
    rc, so, err = cli(capsys, "info", empty)
    assert rc == 0 and "count:            0" in so
    rc, _, err = cli(capsys, "convert", empty, tmp_path / "e.trk", "--reference", ph["fod"])
    assert rc == 0, err
    rc, _, err = cli(capsys, "render", empty, tmp_path / "e.png")
    one_line_error(rc, err, "no streamline")
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image",
                     _shifted(ph["mask"], tmp_path / "zero.nii.gz", keep=(slice(0, 0),) * 3))
    one_line_error(rc, err, "no non-zero voxel")


# other inputs users hit --------------------------------------------------------------------------------------------


def test_a_device_that_is_not_here_is_refused_up_front(ph, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for dev, words in (("cuda", "no CUDA device"), ("cuda:3", "no CUDA device"), ("gpu0", "not a torch device")):
        rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "o.tck", "--seed-image", ph["mask"], "--device", dev)
        one_line_error(rc, err, "--device", words)


def test_extreme_lengths(ph, tmp_path, capsys):
    """A max length beyond any vertex count is no limit; a min length above the max accepts nothing (an error
    naming the rule); infinities are refused by the public resolve() as by the command line."""
    from tractfunc.core.params import resolve
    assert resolve((2, 2, 2), max_length=1e30).max_points == 2 ** 62
    for kw in ({"max_length": float("inf")}, {"min_length": float("inf")}, {"max_length": float("nan")}):
        with pytest.raises(ValueError, match="finite"):
            resolve((2, 2, 2), **kw)
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "a.tck", "--seed-image", ph["mask"], "--select", "3",
                     "--max-length", "1e30")
    assert rc == 0, err
    rc, _, err = cli(capsys, "track", ph["fod"], tmp_path / "b.tck", "--seed-image", ph["mask"], "--seeds", "50",
                     "--min-length", "50", "--max-length", "20")
    one_line_error(rc, err, "shorter than the minimum length")


def test_demo_needs_seeds(tmp_path, capsys):
    rc, _, err = cli(capsys, "demo", "--out", tmp_path / "d", "--seeds", "0")
    one_line_error(rc, err, "--seeds")
    assert not (tmp_path / "d").exists()


# the pure helpers behind the checks ------------------------------------------------------------------------------


def _affine(rng):
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    A = np.eye(4)
    A[:3, :3] = q * rng.uniform(0.5, 3.0, 3)
    A[:3, 3] = rng.uniform(-20, 20, 3)
    return A


@pytest.mark.parametrize("seed", range(12))
def test_reachable_never_misses_a_seed_that_lands_in_the_target(seed):
    """The up-front test is conservative: any point drawn inside a seed voxel whose nearest target voxel is
    non-zero belongs to a seed voxel reported reachable (random oblique grids, sparse targets)."""
    from tractfunc.core import seeds as S
    rng = np.random.default_rng(seed)
    A_seed, A_tgt = _affine(rng), _affine(rng)
    target = rng.random((9, 8, 7)) < 0.03
    vox = np.argwhere(np.ones((6, 6, 6), bool))
    ok = S.reachable(vox, A_seed, target, A_tgt)
    pick = rng.integers(0, len(vox), 20000)
    pts = S.voxel_points(vox, pick, rng.random((20000, 3)) - 0.5, A_seed)
    inv = np.linalg.inv(A_tgt)
    ijk = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < target.shape), axis=1)
    hit = np.zeros(len(pts), bool)
    hit[inside] = target[tuple(ijk[inside].T)]
    assert ok[pick[hit]].all()
    assert S.points_reach(pts[hit], target, A_tgt).all()
    A_far = A_seed.copy()
    A_far[:3, 3] += 1e4   # the same seed grid 10 m away
    assert not S.reachable(vox, A_far, target, A_tgt).any()


def test_tck_header_layout_follows_tckgen(tmp_path):
    """Keys sorted, multi-line values split, roi lines last, the data offset 65 bytes past 'datatype' rounded to
    4, plain counts; an interrupted writer leaves nothing."""
    from tractfunc.io.images import TckWriter
    out = tmp_path / "h.tck"
    with TckWriter(str(out), {"zeta": 1, "alpha": np.float32(0.1), "roi": ["seed a", "mask b"], "multi": "x\ny",
                              "total_count": 9}) as w:
        w.write([np.zeros((2, 3))] * 3)
    raw = out.read_bytes()
    head = raw[:raw.index(b"END\n") + 4].decode()
    assert head.splitlines() == ["mrtrix tracks    ", "alpha: 0.100000001", "multi: x", "multi: y", "zeta: 1",
                                 "roi: seed a", "roi: mask b", "datatype: Float32LE", head.splitlines()[8],
                                 "count: 3", "total_count: 9", "END"]
    offset = int(head.splitlines()[8].split()[-1])
    assert offset == len(head[:head.index("file:")]) + 65 + (-(len(head[:head.index("file:")]) + 65)) % 4
    assert set(raw[len(head):offset]) <= {0}
    assert len(nib.streamlines.load(str(out)).streamlines) == 3
