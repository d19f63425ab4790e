"""Anatomically-constrained tracking (tckgen ``-act``): the 5TT image, ACT's defaults, and parity with tckgen.

tckgen with a fixed start direction (``-seed_direction``) leaves nothing unknown, so with the same 5TT image the
native kernel must reproduce its ACT streamlines bit for bit: the tissue tests after each step, the seed test, the
unidirectional seeds at the GM-WM interface, the rejections (CSF, too long, poor termination) and the kept vertex
on entering cortical GM.  Measured on the Philips data (dwi_5tt.nii.gz): 5000 / 5000 bit-identical, Euler and RK4;
the follow engine (float64 values along the kernel's decisions) 100 % within 0.1 mm; grid seeding with ACT and
ROIs: none missing, none extra (154 / 154).
"""
import numpy as np
import pytest
import torch

from tractfunc import io, make_act
from tractfunc.core import params as P
from tractfunc.errors import TractfuncError
from tractfunc.tools import parity

from conftest import START, require_philips, require_tckgen
from test_native import _kernel_available


def _gmwmi_map(tmp_path, d):
    """5tt2gmwmi of the Philips 5TT (tractfunc.tools.gmwmi, equal to MRtrix3's), as a NIfTI file."""
    import nibabel as nib
    from tractfunc.tools.gmwmi import gmwmi
    path = str(tmp_path / "gmwmi.nii.gz")
    img = nib.load(d["5tt"])
    nib.save(nib.Nifti1Image(gmwmi(np.asarray(img.dataobj)), img.affine), path)
    return path


def _act_parity(tmp_path, n, rk4, dtype, rng_seed=7, crop=False):
    """tckgen -act (with -crop_at_gmwmi and -seed_gmwmi when ``crop``) from a known start, re-tracked here."""
    d = require_philips()
    require_tckgen()
    _kernel_available()
    tck, csv = str(tmp_path / "ref.tck"), str(tmp_path / "seeds.csv")
    seed, how = (_gmwmi_map(tmp_path, d), "-seed_gmwmi") if crop else (d["seed"], "-seed_image")
    parity.run_tckgen(d["fod"], tck, csv, seed, None, n, rk4=rk4, nthreads=0, rng_seed=rng_seed,
                      seed_direction=START, extra=["-act", d["5tt"]] + (["-crop_at_gmwmi"] if crop else []),
                      seed_option=how)
    ref = parity.load_reference(tck, csv)
    r = parity.compare(ref, d["fod"], None, rk4, dtype, start=START, act_path=d["5tt"], crop_at_gmwmi=crop)
    print(f"ACT crop={crop} rk4={rk4} {dtype}: {r.identical:.4f} bit-identical, {r.within_01:.4f} within 0.1 mm, "
          f"lost {r.lost}, too short {r.too_short}, engine {r.engine}")
    assert len(ref.streamlines) == n and r.lost == 0 and r.too_short == 0
    return r


@pytest.mark.parametrize("rk4", [False, True])
def test_act_bit_identical_to_tckgen_real_data(tmp_path, rk4):
    """tckgen -act dwi_5tt.nii.gz -seed_direction: every streamline equal bit for bit (500 seeds)."""
    r = _act_parity(tmp_path, 500, rk4, torch.float32)
    assert r.engine == "native" and r.identical >= 0.999 and r.within_01 >= 0.999


@pytest.mark.parametrize("rk4", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_act_float64_follows_tckgen(tmp_path, rk4):
    """float64 (the follow engine: values along the kernel's ACT decisions) within 0.1 mm of tckgen
    (measured: 200 / 200, Euler and RK4)."""
    r = _act_parity(tmp_path, 200 if rk4 else 100, rk4, torch.float64)
    assert r.engine == "follow" and r.within_01 >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("rk4", [False, True])
def test_act_bit_identical_to_tckgen_real_data_5000(tmp_path, rk4):
    r = _act_parity(tmp_path, 5000, rk4, torch.float32, rng_seed=11)
    assert r.identical >= 0.999 and r.within_01 >= 0.999


@pytest.mark.parametrize("rk4", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_crop_at_gmwmi_bit_identical_to_tckgen(tmp_path, rk4):
    """tckgen -act -seed_gmwmi -crop_at_gmwmi -seed_direction: the seeds at the GM-WM interface tracked one way,
    the ends entering cortical GM moved onto the interface: every streamline equal bit for bit (300 seeds)."""
    r = _act_parity(tmp_path, 300, rk4, torch.float32, crop=True)
    assert r.engine == "native" and r.identical >= 0.999 and r.within_01 >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("rk4", [False, True])
def test_crop_at_gmwmi_float64_follows_tckgen(tmp_path, rk4):
    """float64 on the follow engine, which crops the followed ends in PyTorch (core.tissues.crop_at_interface):
    within 0.1 mm of tckgen."""
    r = _act_parity(tmp_path, 500 if rk4 else 100, rk4, torch.float64, crop=True)
    assert r.engine == "follow" and r.within_01 >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("rk4", [False, True])
def test_crop_at_gmwmi_bit_identical_to_tckgen_5000(tmp_path, rk4):
    r = _act_parity(tmp_path, 5000, rk4, torch.float32, rng_seed=13, crop=True)
    assert r.identical >= 0.999 and r.within_01 >= 0.999


def test_crop_moves_ends_onto_the_interface():
    """core.tissues.crop_at_interface on a synthetic 5TT (GM for x > 5 mm, WM below, linear across one voxel):
    an end in GM moves back to where GM = WM, an end already on the interface or in WM stays, and the new end is
    differentiable wrt the vertices."""
    from tractfunc.core.tissues import crop_at_interface, gm_minus_wm, sample_tissues
    x = torch.arange(12, dtype=torch.float64)
    gm = ((x - 4.5).clamp(0, 1)).view(-1, 1, 1).expand(12, 6, 6)
    tt = torch.zeros(12, 6, 6, 5, dtype=torch.float64)
    tt[..., 0], tt[..., 2] = gm, 1 - gm
    act = make_act(tt, np.eye(4))
    line = torch.tensor([[[5.6, 2.0, 2.0], [4.6, 2.0, 2.0], [3.6, 2.0, 2.0]],
                         [[4.4, 2.0, 2.0], [3.4, 2.0, 2.0], [2.4, 2.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    out = crop_at_interface(act, line)
    d = gm_minus_wm(sample_tissues(act, out)[0])
    assert 0 <= float(d[0]) < 0.01 and abs(float(out[0, 0]) - 5.0) < 0.01
    assert torch.equal(out[1].detach(), line[1].detach()[0])
    out[0, 0].backward()
    assert line.grad is not None and float(line.grad.abs().sum()) > 0


def test_act_defaults_follow_tckgen():
    """Under -act tckgen halves the default cutoff (0.05) and the minimum length is 2 voxels (not 5)."""
    plain, act = P.resolve((2.0, 2.0, 2.0)), P.resolve((2.0, 2.0, 2.0), act=True)
    assert act.cutoff == np.float32(np.float32(0.1) * 0.5) and plain.cutoff == np.float32(0.1)
    assert act.min_points < plain.min_points
    assert P.resolve((2.0, 2.0, 2.0), act=True, cutoff=0.2).cutoff == np.float32(0.2)


def _nifti(tmp_path, data, name="tt.nii.gz"):
    import nibabel as nib
    path = str(tmp_path / name)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def test_bad_5tt_images_are_one_line_errors(tmp_path):
    """What 5ttcheck rejects: not 5 volumes, fractions not summing to 1 in the brain, values outside [0, 1]."""
    good = np.zeros((4, 4, 4, 5), dtype=np.float32)
    good[1:3, 1:3, 1:3, 2] = 1.0
    assert io.load_5tt(_nifti(tmp_path, good)).data.shape == (4, 4, 4, 5)
    for bad, what in ((good[..., :4], "5 volumes"), (good * 0.5, "sum to 1"), (good * 2 - 0.5, "[0, 1]")):
        with pytest.raises(TractfuncError, match=what.replace("[", r"\[").replace("]", r"\]")) as e:
            io.load_5tt(_nifti(tmp_path, bad))
        assert "\n" not in str(e.value)
    with pytest.raises(TractfuncError, match="5 volumes"):
        make_act(torch.zeros(4, 4, 4, 3), np.eye(4))


def test_act_runs_on_native_and_follow_only(phantom_field):
    """ACT's rules live in the kernel: the eager / fixed engines say so instead of ignoring the 5TT image."""
    from tractfunc import track
    fld, prm = phantom_field["field32"], phantom_field["params"]
    tt = torch.zeros(*fld.sh.shape[:3], 5)
    tt[..., 2] = 1.0
    act = make_act(tt, torch.linalg.inv(fld.world_to_voxel))
    seeds = torch.zeros(1, 3, dtype=fld.sh.dtype)
    with pytest.raises(TractfuncError, match="ACT"):
        track(fld, prm, seeds, torch.tensor([[1.0, 0.0, 0.0]], dtype=fld.sh.dtype), engine="eager", act=act)


def test_cli_act_reproduces_tckgen(tmp_path):
    """``tractfunc track --act`` from tckgen's seeds and start direction writes tckgen's streamlines (to 0.1 mm),
    with tckgen's ACT header keys; --backtrack (invalid for SD_Stream) and a bad 5TT image exit non-zero with
    one line and no output file."""
    import nibabel as nib
    from conftest import run_cli
    d = require_philips()
    require_tckgen()
    _kernel_available()
    tck, csv = str(tmp_path / "ref.tck"), str(tmp_path / "seeds.csv")
    parity.run_tckgen(d["fod"], tck, csv, d["seed"], None, 200, nthreads=0, rng_seed=3, seed_direction=START,
                      extra=["-act", d["5tt"]])
    dirs, pts = tmp_path / "dirs.txt", tmp_path / "seeds.txt"
    np.savetxt(dirs, np.tile(START, (200, 1)))
    np.savetxt(pts, parity.load_reference(tck, csv).seeds, fmt="%.9g")   # the exact float32 seed vertices
    out = tmp_path / "out.tck"
    run_cli("track", d["fod"], str(out), "--seed-points", str(pts), "--seed-directions", str(dirs), "--act", d["5tt"],
            "--quiet")
    ref, got = nib.streamlines.load(tck), nib.streamlines.load(str(out))
    assert len(got.streamlines) == 200
    # (the command line normalises --seed-directions in float64 first, so the start differs from tckgen's in the
    # last bit: the streamlines agree to rounding, not bit for bit)
    H = np.array([parity.hausdorff(a, b) for a, b in zip(ref.streamlines, got.streamlines)])
    assert (H < 0.1).mean() >= 0.99
    assert got.header["act"] == d["5tt"] and float(got.header["threshold"]) == float(ref.header["threshold"])
    for extra, what in ((["--act", d["5tt"], "--backtrack"], "deterministic"), (["--act", d["fod"]], "5 volumes")):
        bad = tmp_path / "bad.tck"
        p = run_cli("track", d["fod"], str(bad), "--seed-points", csv, *extra, check=False)
        assert p.returncode != 0 and what in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert not bad.exists()


@pytest.mark.parametrize("rk4,crop", [(False, False), (True, False), pytest.param(False, True, marks=pytest.mark.slow),
                                      pytest.param(True, True, marks=pytest.mark.slow)])
def test_act_grid_seeds_none_missing_none_extra(tmp_path, rk4, crop):
    """Every seed of a grid (tckgen -seed_grid_per_voxel, finite: tckgen tracks each once) with a known start:
    the streamlines tckgen accepts are exactly those accepted here (none missing, none extra), within 0.1 mm,
    with ACT and an include and an exclude sphere.  The grid points are computed here (not read from tckgen),
    so they may differ from tckgen's in the last bit."""
    import nibabel as nib
    from tractfunc import Regions, Sphere, make_field, track
    from tractfunc.core import seeds as S
    d = require_philips()
    require_tckgen()
    _kernel_available()
    wm = nib.load(d["seed"])
    roi = np.zeros(wm.shape, dtype=np.uint8)
    roi[56:70, 60:74, 28:34] = np.asarray(wm.dataobj)[56:70, 60:74, 28:34] != 0
    roi_path = str(tmp_path / "roi.nii.gz")
    nib.save(nib.Nifti1Image(roi, wm.affine, wm.header), roi_path)
    inc, exc = (0.0, 10.0, 15.0, 30.0), (0.0, -30.0, 10.0, 10.0)
    tck = str(tmp_path / "grid.tck")
    cmd = ["tckgen", d["fod"], tck, "-algorithm", "SD_Stream", "-seed_grid_per_voxel", roi_path, "1", "-select", "0",
           "-seed_direction", ",".join(map(str, START)), "-act", d["5tt"], "-include", ",".join(map(str, inc)),
           "-exclude", ",".join(map(str, exc)), "-nthreads", "0", "-force", "-quiet"] + (["-rk4"] if rk4 else []) + \
        (["-crop_at_gmwmi"] if crop else [])
    import subprocess
    subprocess.run(cmd, check=True)
    ref = [np.asarray(t, dtype=np.float64) for t in nib.streamlines.load(tck).streamlines]
    fod, tt = io.load_fod(d["fod"]), io.load_5tt(d["5tt"])
    pts = S.grid_per_voxel_np(roi, wm.affine, 1)
    out = track(make_field(torch.as_tensor(fod.data), fod.affine, voxel_sizes=fod.voxel_sizes),
                P.resolve(fod.voxel_sizes, rk4=rk4, act=True), torch.as_tensor(pts, dtype=torch.float32),
                torch.as_tensor(np.tile(START, (len(pts), 1)), dtype=torch.float32),
                act=make_act(torch.as_tensor(tt.data), tt.affine, tt.voxel_sizes, crop),
                regions=Regions(include=(Sphere(inc[:3], inc[3]),), exclude=(Sphere(exc[:3], exc[3]),)))
    mine = [l.double().numpy() for l in out.streamlines()]
    seeds_mine = pts[out.seed_ids.numpy()]
    # match tckgen's streamlines to seeds: the grid seed lying on each (its seed vertex)
    H = []
    for t in ref:
        j = int(np.argmin(np.linalg.norm(seeds_mine[:, None, :] - t[None, :, :], axis=2).min(1)))
        H.append(parity.hausdorff(t, mine[j]))
    H = np.array(H)
    print(f"grid ACT+ROIs rk4={rk4} crop={crop}: {len(pts)} seeds, tckgen {len(ref)}, here {len(mine)}, "
          f"{(H < 0.1).mean():.4f} within 0.1 mm")
    assert len(ref) > 20 and len(mine) == len(ref) and (H < 0.1).mean() >= 0.999
