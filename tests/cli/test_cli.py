"""The command line, run as a subprocess like a user would."""
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import require_philips, require_tckgen, run_cli, tck_content


run = run_cli


def test_help_lists_subcommands_and_examples():
    out = run("--help").stdout
    for sub in ("track", "demo", "parity"):
        assert sub in out
    assert "examples:" in run("track", "--help").stdout


def test_track_phantom_seed_image_tck_and_trk(tmp_path, phantom_files):
    ph, paths = phantom_files
    out = tmp_path / "t.tck"
    p = run("track", paths["fod"], str(out), "--seed-image", paths["mask"], "--mask", paths["mask"],
            "--select", "40", "--output-seeds", str(tmp_path / "s.csv"), "--rng-seed", "3")
    assert "40 streamlines" in p.stdout
    t = nib.streamlines.load(str(out))
    assert len(t.streamlines) == 40
    assert float(t.header["step_size"]) == pytest.approx(0.2, rel=1e-6)
    rows = np.loadtxt(tmp_path / "s.csv", delimiter=",", comments="#", usecols=(0, 1, 2, 3, 4))
    assert rows.shape == (40, 5)
    for (k, si, x, y, z), line in zip(rows, t.streamlines):
        assert np.allclose(line[int(si)], [x, y, z], atol=1e-4)
    # same rng seed -> identical file content
    out2 = tmp_path / "t2.tck"
    run("track", paths["fod"], str(out2), "--seed-image", paths["mask"], "--mask", paths["mask"],
        "--select", "40", "--rng-seed", "3")
    t2 = nib.streamlines.load(str(out2))
    assert all(np.array_equal(a, b) for a, b in zip(t.streamlines, t2.streamlines))
    trk = tmp_path / "t.trk"
    run("track", paths["fod"], str(trk), "--seed-image", paths["mask"], "--select", "10", "--quiet")
    assert len(nib.streamlines.load(str(trk)).streamlines) == 10


def test_track_seed_points_and_directions_in_seed_order(tmp_path, phantom_files):
    ph, paths = phantom_files
    import torch
    from tractfunc.core.seeds import random_in_mask
    pts = random_in_mask(torch.as_tensor(ph.mask), ph.affine, 30, torch.Generator().manual_seed(0)).numpy()
    np.savetxt(tmp_path / "pts.txt", pts)
    dirs = np.tile([0.7, -0.7, 0.1], (30, 1))
    np.savetxt(tmp_path / "dirs.txt", dirs)
    out = tmp_path / "o.tck"
    run("track", paths["fod"], str(out), "--seed-points", str(tmp_path / "pts.txt"), "--seed-directions",
        str(tmp_path / "dirs.txt"), "--output-seeds", str(tmp_path / "s.csv"))
    lines = nib.streamlines.load(str(out)).streamlines
    rows = np.loadtxt(tmp_path / "s.csv", delimiter=",", comments="#", usecols=(1, 2, 3, 4), ndmin=2)
    idx = [int(np.argmin(np.linalg.norm(pts - r[1:], axis=1))) for r in rows]
    assert idx == sorted(idx) and len(lines) == len(rows) > 0     # written in seed order


def _nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "coeffs", "nan", "grid", "outside", "baddirs", "affine"])
def test_bad_input_one_line_error(tmp_path, phantom_files, case):
    ph, paths = phantom_files
    fod, mask = paths["fod"], paths["mask"]
    args = ["--seed-image", mask]
    if case == "missing":
        fod = str(tmp_path / "nope.nii.gz")
        expect = "no such file"
    elif case == "coeffs":
        fod = _nifti(tmp_path / "c.nii.gz", np.ones((4, 4, 4, 44), np.float32))
        expect = "even-degree"
    elif case == "nan":
        d = ph.fod.copy(); d[5, 5, 5, 3] = np.nan
        fod = _nifti(tmp_path / "n.nii.gz", d, ph.affine)
        expect = "NaN"
    elif case == "grid":
        args += ["--mask", _nifti(tmp_path / "m.nii.gz", np.ones((5, 5, 5), np.uint8))]
        expect = "does not match"
    elif case == "outside":
        np.savetxt(tmp_path / "p.txt", [[1000.0, 0, 0], [0, 0, 0]])
        args = ["--seed-points", str(tmp_path / "p.txt")]
        expect = "outside the FOD image"
    elif case == "baddirs":
        np.savetxt(tmp_path / "p.txt", [[0.0, 0, 0], [1, 1, 1]])
        np.savetxt(tmp_path / "d.txt", [[0.0, 0, 0], [1, 1, 1]])
        args = ["--seed-points", str(tmp_path / "p.txt"), "--seed-directions", str(tmp_path / "d.txt")]
        expect = "zero or non-finite"
    else:
        fod = str(tmp_path / "a.nii")
        nib.Nifti1Image(ph.fod, ph.affine).to_filename(fod)
        raw = bytearray(open(fod, "rb").read())   # patch the header as a broken converter might write it
        raw[252:254] = np.int16(0).tobytes()        # qform_code = 0
        raw[254:256] = np.int16(1).tobytes()        # sform_code = 1
        raw[312:328] = np.zeros(4, np.float32).tobytes()   # srow_z = 0: singular
        open(fod, "wb").write(bytes(raw))
        assert abs(np.linalg.det(nib.load(fod).affine[:3, :3])) < 1e-12
        raw = nib.load(fod)
        expect = "not invertible"
    p = run("track", fod, str(tmp_path / "o.tck"), *args, check=False)
    assert p.returncode != 0
    assert expect in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o.tck").exists()


def test_outside_seed_points_skipped_on_request(tmp_path, phantom_files):
    """--outside skip: points outside the image are reported on stderr and skipped; the others are tracked
    exactly as if the bad points had not been there."""
    ph, paths = phantom_files
    g = np.random.default_rng(3)
    vox = np.argwhere(ph.seed_mask)[g.choice(int(ph.seed_mask.sum()), 12, replace=False)]
    inside = vox @ ph.affine[:3, :3].T + ph.affine[:3, 3]
    dirs = g.standard_normal((12, 3))
    np.savetxt(tmp_path / "in.txt", inside)
    np.savetxt(tmp_path / "din.txt", dirs)
    np.savetxt(tmp_path / "all.txt", np.vstack([inside[:5], [[1e4, 0, 0]], inside[5:], [[0, -1e4, 0]]]))
    np.savetxt(tmp_path / "dall.txt", np.vstack([dirs[:5], [[1, 0, 0]], dirs[5:], [[0, 1, 0]]]))
    common = ["--mask", paths["mask"], "--max-length", "30"]
    q = run("track", paths["fod"], str(tmp_path / "a.tck"), "--seed-points", str(tmp_path / "in.txt"),
            "--seed-directions", str(tmp_path / "din.txt"), *common)
    p = run("track", paths["fod"], str(tmp_path / "b.tck"), "--seed-points", str(tmp_path / "all.txt"),
            "--seed-directions", str(tmp_path / "dall.txt"), "--outside", "skip", "--mask", paths["mask"],
            "--max-length", "30")
    assert "2 of 14 seed points lie outside the FOD image" in p.stderr and "skipped" in p.stderr
    rejected = [int(re.search(r"; (\d+) seeds rejected", x.stdout).group(1)) for x in (q, p)]
    assert rejected[1] == rejected[0] + 2   # the skipped points count as rejected seeds
    a = nib.streamlines.load(str(tmp_path / "a.tck")).streamlines
    b = nib.streamlines.load(str(tmp_path / "b.tck")).streamlines
    assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_chunked_run_writes_every_streamline_once(tmp_path, phantom_files):
    """Seed points tracked in many small chunks or in one: byte-identical files, and the file's streamline
    count equals the count in the summary line (the small-scale check of the 1M-streamline run)."""
    ph, paths = phantom_files
    g = np.random.default_rng(11)
    vox = np.argwhere(ph.seed_mask)[g.choice(int(ph.seed_mask.sum()), 150, replace=False)] + g.uniform(-0.4, 0.4, (150, 3))
    np.savetxt(tmp_path / "p.txt", vox @ ph.affine[:3, :3].T + ph.affine[:3, 3])
    outs = []
    for chunk in ("7", "1000"):
        out = tmp_path / f"c{chunk}.tck"
        p = run("track", paths["fod"], str(out), "--seed-points", str(tmp_path / "p.txt"), "--mask", paths["mask"],
                "--max-length", "30", "--chunk", chunk, "--rng-seed", "2")
        n = int(re.search(r": (\d+) streamlines from 150 seeds", p.stdout).group(1))
        assert len(nib.streamlines.load(str(out)).streamlines) == n > 50
        outs.append(tck_content(out))
    assert outs[0] == outs[1]


def test_bad_parameters_rejected(tmp_path, phantom_files):
    ph, paths = phantom_files
    for flag, val in [("--step", "0"), ("--angle", "200"), ("--min-length", "-3")]:
        p = run("track", paths["fod"], str(tmp_path / "o.tck"), "--seed-image", paths["mask"], flag, val, check=False)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1


def test_demo_writes_tractogram_and_figure(tmp_path):
    p = run("demo", "--out", str(tmp_path / "demo"), "--seeds", "200")
    assert "accepted" in p.stdout
    assert len(nib.streamlines.load(str(tmp_path / "demo" / "phantom.tck")).streamlines) > 50
    png = tmp_path / "demo" / "phantom.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_track_real_data_readable_by_tckinfo(tmp_path):
    d = require_philips()
    out = tmp_path / "r.tck"
    run("track", d["fod"], str(out), "--seed-image", d["seed"], "--mask", d["mask"], "--select", "100")
    assert len(nib.streamlines.load(str(out)).streamlines) == 100
    if shutil.which("tckinfo"):
        info = subprocess.run(["tckinfo", str(out), "-count"], capture_output=True, text=True).stdout
        assert "actual count in file:       100" in info or " 100" in info


def test_parity_subcommand_on_phantom(tmp_path, phantom_files):
    require_tckgen()
    ph, paths = phantom_files
    p = run("parity", paths["fod"], "--seed-image", paths["mask"], "--mask", paths["mask"], "--select", "100")
    assert "100.00% within 1 mm" in p.stdout or "within 1 mm" in p.stdout


def test_workers_give_the_same_tractogram(tmp_path, phantom_files):
    """--workers splits seeds across processes of the PyTorch tracker; the file must be byte-identical to
    one process."""
    ph, paths = phantom_files
    outs = []
    for w in ("1", "2"):
        out = tmp_path / f"w{w}.tck"
        run("track", paths["fod"], str(out), "--seed-image", paths["mask"], "--mask", paths["mask"],
            "--select", "60", "--rng-seed", "5", "--workers", w, "--max-length", "30", "--quiet",
            "--engine", "eager")
        outs.append(tck_content(out))
    assert outs[0] == outs[1]
    assert run("track", paths["fod"], str(tmp_path / "x.tck"), "--seed-image", paths["mask"], "--workers", "0",
               check=False).returncode == 2


def test_torchrun_two_ranks_give_the_same_tractogram(tmp_path, phantom_files):
    """Seeds sharded over 2 torchrun processes (gloo): the merged file and the seeds CSV are byte-identical
    to one process, with several seed batches (--chunk) so that parts are interleaved batch by batch."""
    ph, paths = phantom_files
    args = ["track", paths["fod"], None, "--seed-image", paths["mask"], "--mask", paths["mask"], "--select", "70",
            "--chunk", "32", "--rng-seed", "9", "--max-length", "30", "--quiet", "--engine", "eager", "--output-seeds",
            None]
    outs = []
    for launch in ("single", "torchrun"):
        a = list(args)
        a[2], a[-1] = str(tmp_path / f"{launch}.tck"), str(tmp_path / f"{launch}.csv")
        cmd = [sys.executable, "-m", "tractfunc.cli", *a]
        if launch == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "tractfunc.cli", *a]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append((tck_content(tmp_path / f"{launch}.tck"), (tmp_path / f"{launch}.csv").read_bytes()))
    assert outs[0] == outs[1]
    assert len(nib.streamlines.load(str(tmp_path / "torchrun.tck")).streamlines) == 70
    assert sorted(x.name for x in tmp_path.iterdir()) == ["single.csv", "single.tck", "torchrun.csv", "torchrun.tck"]


def test_interrupted_output_leaves_no_file(tmp_path):
    """A .tck stream that fails midway is removed, never left truncated."""
    from tractfunc.io.images import TckWriter
    out = tmp_path / "x.tck"
    with pytest.raises(RuntimeError):
        with TckWriter(str(out), {"step_size": 0.2}) as w:
            w.write([np.zeros((3, 3))])
            raise RuntimeError("interrupted")
    assert not out.exists() and not (tmp_path / "x.tck.partial").exists()
    with TckWriter(str(out)) as w:
        w.write([np.arange(9.0).reshape(3, 3)] * 2)
        w.write([np.ones((2, 3))])
    t = nib.streamlines.load(str(out))
    assert len(t.streamlines) == 3 and int(t.header["count"]) == 3
    assert np.allclose(t.streamlines[0], np.arange(9.0).reshape(3, 3))
