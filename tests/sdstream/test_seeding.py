"""tckgen's other seeding mechanisms on the command line: ``--seed-sphere``, ``--seed-random-per-voxel``,
``--seed-grid-per-voxel``.  Random mechanisms compare with tckgen as distributions (tckgen does not record its
random draws): the per-voxel counts of accepted seeds (``-output_seeds``) by a chi-squared test of homogeneity,
the distances of sphere seeds from the centre by a two-sample Kolmogorov-Smirnov test."""
import numpy as np
import pytest

from tractfunc.core import seeds as S

from conftest import require_philips, require_tckgen, run_cli


def test_grid_and_random_per_voxel_positions():
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[1, 2, 3] = mask[2, 2, 2] = True
    A = np.diag([2.0, 2.0, 2.0, 1.0])
    g = S.grid_per_voxel_np(mask, A, 2)
    assert g.shape == (16, 3)
    assert np.allclose(np.unique(g[:8, 0]), [1.5, 2.5]) and np.allclose(np.unique(g[:8, 2]), [5.5, 6.5])
    r = S.random_per_voxel_np(mask, A, 100, np.random.default_rng(0))
    vox = np.rint(r / 2.0).astype(int)
    assert (np.unique(vox, axis=0, return_counts=True)[1] == 100).all()
    p = S.sphere_points_np((1.0, 2.0, 3.0), 5.0, 4000, np.random.default_rng(1))
    d = np.linalg.norm(p - [1.0, 2.0, 3.0], axis=1)
    assert d.max() <= 5.0 and abs(np.mean((d / 5.0) ** 3) - 0.5) < 0.02   # uniform in the ball: (r/R)^3 ~ U(0, 1)


def _roi(tmp_path):
    import nibabel as nib
    d = require_philips()
    wm = nib.load(d["seed"])
    roi = np.zeros(wm.shape, dtype=np.uint8)
    roi[58:66, 62:70, 28:32] = np.asarray(wm.dataobj)[58:66, 62:70, 28:32] != 0
    path = str(tmp_path / "roi.nii.gz")
    nib.save(nib.Nifti1Image(roi, wm.affine, wm.header), path)
    return d, path, wm.affine


def _seeds(csv):
    return np.loadtxt(csv, delimiter=",", comments="#", usecols=(2, 3, 4), ndmin=2)


@pytest.mark.parametrize("mechanism", ["random", "grid"])
def test_per_voxel_seeding_matches_tckgen_distribution(tmp_path, mechanism):
    """ACT with 6 random / 2 x 2 x 2 grid seeds per voxel of a small WM block (random start directions): the
    accepted seeds per voxel are homogeneous with tckgen's, and as many (to sampling noise)."""
    import subprocess
    from scipy.stats import chi2_contingency
    d, roi, affine = _roi(tmp_path)
    require_tckgen()
    opt, n = {"random": ("seed_random_per_voxel", "6"), "grid": ("seed_grid_per_voxel", "2")}[mechanism]
    ref_csv, our_csv = str(tmp_path / "ref.csv"), str(tmp_path / "our.csv")
    subprocess.run(["tckgen", d["fod"], str(tmp_path / "ref.tck"), "-algorithm", "SD_Stream", f"-{opt}", roi, n,
                    "-act", d["5tt"], "-output_seeds", ref_csv, "-nthreads", "0", "-force", "-quiet"], check=True)
    run_cli("track", d["fod"], str(tmp_path / "our.tck"), f"--{opt.replace('_', '-')}", roi, n, "--act", d["5tt"],
            "--output-seeds", our_csv, "--quiet")
    inv = np.linalg.inv(affine)
    counts = []
    for csv in (ref_csv, our_csv):
        v = np.rint(_seeds(csv) @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        counts.append(v)
    keys = np.unique(np.concatenate(counts), axis=0)
    table = np.array([[np.all(c == k, axis=1).sum() for k in keys] for c in counts])
    table = table[:, table.sum(0) >= 5]   # the chi-squared approximation needs non-tiny cells
    p = chi2_contingency(table)[1]
    print(f"{mechanism} per voxel: tckgen {len(counts[0])} accepted, tractfunc {len(counts[1])}; chi-squared p = {p:.3f}")
    a, b = len(counts[0]), len(counts[1])
    assert p > 1e-3 and abs(a - b) < 4 * np.sqrt(a + b)   # the same acceptance rate, to sampling noise


def test_seed_sphere_matches_tckgen_distribution(tmp_path):
    """--seed-sphere: the accepted seeds' distances from the centre agree with tckgen's (KS test)."""
    from scipy.stats import ks_2samp
    d = require_philips()
    require_tckgen()
    centre, r = (0.0, 10.0, 15.0), 8.0
    spec = ",".join(map(str, centre + (r,)))
    ref_csv, our_csv = str(tmp_path / "ref.csv"), str(tmp_path / "our.csv")
    import subprocess
    subprocess.run(["tckgen", d["fod"], str(tmp_path / "ref.tck"), "-algorithm", "SD_Stream", "-seed_sphere", spec,
                    "-select", "400", "-output_seeds", ref_csv, "-nthreads", "0", "-force", "-quiet"], check=True)
    run_cli("track", d["fod"], str(tmp_path / "our.tck"), "--seed-sphere", spec, "--select", "400", "--output-seeds",
            our_csv, "--quiet")
    dr, do = (np.linalg.norm(_seeds(c) - centre, axis=1) for c in (ref_csv, our_csv))
    p = ks_2samp(dr, do).pvalue
    print(f"seed sphere: KS p = {p:.3f}")
    assert dr.max() <= r + 1e-3 and do.max() <= r + 1e-3 and p > 1e-3


def test_bad_seeding_options_are_one_line_errors(tmp_path, phantom_files):
    ph, paths = phantom_files
    out = tmp_path / "out.tck"
    for extra, what in ((["--seed-sphere", "0,0,0,-1"], "radius"), (["--seed-sphere", "1,2"], "x,y,z,r"),
                        (["--seed-grid-per-voxel", paths["mask"], "0"], "per voxel")):
        p = run_cli("track", paths["fod"], str(out), *extra, check=False)
        assert p.returncode != 0 and what in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_5tt2gmwmi_equals_mrtrix(tmp_path):
    """``tractfunc 5tt2gmwmi`` on the Philips 5TT: equal to MRtrix3 5tt2gmwmi voxel for voxel, bit for bit
    (measured: 0 of 983 040 voxels differ); a bad 5TT image is a one-line error with nothing written."""
    import subprocess
    import nibabel as nib
    d = require_philips()
    require_tckgen("5tt2gmwmi")
    ref, out = str(tmp_path / "ref.nii.gz"), str(tmp_path / "out.nii.gz")
    subprocess.run(["5tt2gmwmi", d["5tt"], ref, "-quiet", "-force"], check=True)
    run_cli("5tt2gmwmi", d["5tt"], out, "--quiet")
    a, b = (np.asarray(nib.load(p).dataobj) for p in (ref, out))
    assert a.shape == b.shape and np.array_equal(a, b)
    assert np.allclose(nib.load(out).affine, nib.load(ref).affine, atol=1e-4)
    bad = str(tmp_path / "bad.nii.gz")
    p = run_cli("5tt2gmwmi", d["fod"], bad, check=False)
    assert p.returncode != 0 and "5 volumes" in p.stderr and not (tmp_path / "bad.nii.gz").exists()


def test_seed_cutoff_and_attempts_are_recorded_without_effect(tmp_path, phantom_files):
    """tckgen's -seed_cutoff and -max_attempts_per_seed only act in iFOD: for SD_Stream they are recorded in the
    header and change no streamline; invalid values are one-line errors."""
    import nibabel as nib
    ph, paths = phantom_files
    outs = []
    for i, extra in enumerate(([], ["--seed-cutoff", "0.3", "--max-attempts-per-seed", "7"])):
        out = str(tmp_path / f"o{i}.tck")
        run_cli("track", paths["fod"], out, "--seed-image", paths["mask"], "--select", "30", "--quiet", *extra)
        outs.append(nib.streamlines.load(out))
    assert all(np.array_equal(a, b) for a, b in zip(outs[0].streamlines, outs[1].streamlines))
    assert float(outs[1].header["init_threshold"]) == np.float32(0.3) and outs[1].header["max_seed_attempts"] == "7"
    for extra, what in ((["--seed-cutoff", "-1"], "seed-cutoff"), (["--max-attempts-per-seed", "0"], "attempts")):
        p = run_cli("track", paths["fod"], str(tmp_path / "bad.tck"), "--seed-image", paths["mask"], *extra,
                    check=False)
        assert p.returncode != 0 and what in p.stderr and not (tmp_path / "bad.tck").exists()


def test_seed_rejection_matches_tckgen_distribution(tmp_path):
    """--seed-rejection on the GM-WM interface map (5tt2gmwmi) with ACT: the map's values at the accepted seeds
    agree with tckgen's (two-sample KS test)."""
    import subprocess
    import nibabel as nib
    from scipy.stats import ks_2samp
    d = require_philips()
    require_tckgen()
    gm = str(tmp_path / "gmwmi.nii.gz")
    run_cli("5tt2gmwmi", d["5tt"], gm, "--quiet")
    ref_csv, our_csv = str(tmp_path / "ref.csv"), str(tmp_path / "our.csv")
    subprocess.run(["tckgen", d["fod"], str(tmp_path / "ref.tck"), "-algorithm", "SD_Stream", "-seed_rejection", gm,
                    "-act", d["5tt"], "-select", "300", "-output_seeds", ref_csv, "-nthreads", "0", "-force",
                    "-quiet"], check=True)
    run_cli("track", d["fod"], str(tmp_path / "our.tck"), "--seed-rejection", gm, "--act", d["5tt"], "--select",
            "300", "--output-seeds", our_csv, "--quiet")
    img = nib.load(gm)
    data, inv = np.asarray(img.dataobj), np.linalg.inv(img.affine)
    vals = [data[tuple(np.rint(_seeds(c) @ inv[:3, :3].T + inv[:3, 3]).astype(int).T)] for c in (ref_csv, our_csv)]
    p = ks_2samp(*vals).pvalue
    print(f"seed rejection: KS p = {p:.3f} (mean value tckgen {vals[0].mean():.3f}, tractfunc {vals[1].mean():.3f})")
    assert p > 1e-3 and (vals[1] > 0).all()
    bad = run_cli("track", d["fod"], str(tmp_path / "bad.tck"), "--seed-rejection", d["5tt"], check=False)
    assert bad.returncode != 0 and "3-D" in bad.stderr and not (tmp_path / "bad.tck").exists()


def test_seed_gmwmi_matches_tckgen_distribution(tmp_path):
    """--seed-gmwmi (tckgen -seed_gmwmi) with ACT and --crop-at-gmwmi, seeding from the interface map of a cortical
    block: accepted seeds per voxel homogeneous with tckgen's -output_seeds (chi-squared), as many accepted per
    seed drawn, and every seed on the interface (|GM - WM| < 0.01 in the 5TT image, as tckgen's search ends)."""
    import subprocess
    import nibabel as nib
    from scipy.stats import chi2_contingency
    from tractfunc.core.tissues import gm_minus_wm, sample_tissues
    from tractfunc import io, make_act
    import torch
    from tractfunc.tools.gmwmi import gmwmi
    d = require_philips()
    require_tckgen()
    img = nib.load(d["5tt"])
    g = gmwmi(np.asarray(img.dataobj))
    block = np.zeros_like(g)
    block[40:52, 70:82, 30:38] = g[40:52, 70:82, 30:38]
    path = str(tmp_path / "gmwmi_block.nii.gz")
    nib.save(nib.Nifti1Image(block, img.affine), path)
    ref_csv, our_csv = str(tmp_path / "ref.csv"), str(tmp_path / "our.csv")
    common = ["--act", d["5tt"], "--crop-at-gmwmi", "--select", "1500"]
    subprocess.run(["tckgen", d["fod"], str(tmp_path / "ref.tck"), "-algorithm", "SD_Stream", "-seed_gmwmi", path,
                    "-act", d["5tt"], "-crop_at_gmwmi", "-select", "1500", "-output_seeds", ref_csv, "-nthreads", "0",
                    "-force", "-quiet"], check=True)
    run_cli("track", d["fod"], str(tmp_path / "our.tck"), "--seed-gmwmi", path, *common, "--output-seeds", our_csv,
            "--quiet")
    inv = np.linalg.inv(img.affine)
    vox = [np.rint(_seeds(c) @ inv[:3, :3].T + inv[:3, 3]).astype(int) for c in (ref_csv, our_csv)]
    keys, idx = np.unique(np.concatenate(vox), axis=0, return_inverse=True)
    idx = idx.ravel()
    table = np.stack([np.bincount(idx[:len(vox[0])], minlength=len(keys)),
                      np.bincount(idx[len(vox[0]):], minlength=len(keys))])
    table = table[:, table.sum(0) >= 5]   # the chi-squared approximation needs non-tiny cells
    p = chi2_contingency(table)[1]
    counts = [int(nib.streamlines.load(str(tmp_path / f)).header["total_count"]) for f in ("ref.tck", "our.tck")]
    tt = io.load_5tt(d["5tt"])
    act = make_act(torch.as_tensor(tt.data, dtype=torch.float64), tt.affine, tt.voxel_sizes)
    off = [gm_minus_wm(sample_tissues(act, torch.as_tensor(_seeds(c)))[0]).abs() for c in (ref_csv, our_csv)]
    print(f"seed gmwmi: {table.shape[1]} voxels, chi-squared p = {p:.3f}; streamlines generated for 1500 accepted: "
          f"tckgen {counts[0]}, tractfunc {counts[1]}; |GM - WM| < 0.01 at {float((off[0] < 0.01).double().mean()):.3f}"
          f" / {float((off[1] < 0.01).double().mean()):.3f} of the seeds")
    assert table.shape[1] >= 20 and p > 1e-3
    assert abs(counts[0] - counts[1]) < 5 * np.sqrt(counts[0])
    assert float((off[1] < 0.0101).double().mean()) >= 0.99 and float((off[0] < 0.0101).double().mean()) >= 0.99


def test_seed_gmwmi_needs_act(tmp_path, phantom_files):
    ph, paths = phantom_files
    out = tmp_path / "out.tck"
    p = run_cli("track", paths["fod"], str(out), "--seed-gmwmi", paths["mask"], check=False)
    assert p.returncode != 0 and "--act" in p.stderr and len(p.stderr.strip().splitlines()) == 1 and not out.exists()
