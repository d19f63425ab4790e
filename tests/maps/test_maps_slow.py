"""Parity of tractfunc.maps with tckmap, tcksample and tck2connectome on 100k tckgen streamlines of the Philips
data (slow: ``pytest -m slow tests/maps``). Prints the measured agreement (the numbers in docs/maps.md)."""
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import require_philips, require_tckgen
from mapsdata import make_tractogram, mrtrix, parcellation
from tractfunc.io.tractogram import load_tractogram
from tractfunc.maps import connectome, density, sample_stat

pytestmark = pytest.mark.slow
N_LARGE = 100_000


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    data = require_philips()
    require_tckgen("tckgen")
    files = make_tractogram(str(tmp_path_factory.mktemp("maps_large")), N_LARGE, data, seed=1)
    tf = load_tractogram(files["tck"])
    return dict(files, tf=tf, tracks=(torch.from_numpy(tf.vertices), torch.from_numpy(tf.lengths)))


@pytest.mark.parametrize("case", ["count", "precise", "ends", "dec", "dec_precise", "count_weighted",
                                  "precise_weighted"])
def test_tckmap_parity_large(large, case):
    require_tckgen("tckmap")
    opts = {"count": [], "precise": ["-precise"], "ends": ["-ends_only"], "dec": ["-dec"],
            "dec_precise": ["-dec", "-precise"], "count_weighted": [], "precise_weighted": ["-precise"]}[case]
    weighted = case.endswith("weighted")
    out = os.path.join(large["dir"], f"{case}.nii.gz")
    t0 = time.time()
    mrtrix("tckmap", large["tck"], out, "-template", large["fa"], *opts,
           *(["-tck_weights_in", large["weights"]] if weighted else []))
    t_ref = time.time() - t0
    ref = np.asarray(nib.load(out).dataobj, dtype=np.float64)
    tmpl = nib.load(large["fa"])
    kw = dict(mode="length" if "precise" in case else "ends" if case == "ends" else "count", dec="dec" in case)
    t0 = time.time()
    got = density(large["tracks"], tmpl.affine, tmpl.shape, step_size=float(large["tf"].header["step_size"]),
                  weights=torch.tensor(np.loadtxt(large["weights"])) if weighted else None, **kw).numpy()
    t_ours = time.time() - t0
    nz = ref != 0
    rel = np.abs(got[nz] - ref[nz]) / np.abs(ref[nz])
    print(f"\ntckmap {case}: {int(nz.sum())} non-zero values, {int((got != ref).sum())} differ, max relative "
          f"{rel.max():.2e}, zero pattern equal {np.array_equal(got != 0, nz)}; tckmap {t_ref:.1f}s, ours {t_ours:.1f}s")
    assert np.array_equal(got != 0, nz)
    if case in ("count", "ends"):
        assert np.array_equal(got, ref)
    else:
        assert rel.max() <= 1e-4


@pytest.mark.parametrize("stat", ["mean", "median", "min", "max"])
def test_tcksample_parity_large(large, stat):
    require_tckgen("tcksample")
    out = os.path.join(large["dir"], f"s_{stat}.txt")
    mrtrix("tcksample", large["tck"], large["fa"], out, "-stat_tck", stat)
    ref = np.loadtxt(out).ravel()
    fa = nib.load(large["fa"])
    got = sample_stat(large["tracks"], torch.from_numpy(np.asarray(fa.dataobj, dtype=np.float32)), fa.affine,
                      stat).numpy()
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-6)
    print(f"\ntcksample {stat}: max relative {rel.max():.2e} over {len(ref)} streamlines")
    assert rel.max() <= 1e-5


@pytest.mark.parametrize("mode", ["radial", "end_voxels"])
def test_tck2connectome_parity_large(large, mode):
    require_tckgen("tck2connectome")
    parc = parcellation(large)
    out = os.path.join(large["dir"], f"c_{mode}.csv")
    mrtrix("tck2connectome", large["tck"], parc, out, *(["-assignment_end_voxels"] if mode == "end_voxels" else []))
    ref = np.loadtxt(out, delimiter=",")
    pc = nib.load(parc)
    got = connectome(large["tracks"], torch.from_numpy(np.asarray(pc.dataobj).astype(np.int64)), pc.affine,
                     assignment=mode).numpy()
    print(f"\ntck2connectome {mode}: {int(ref.sum())} assigned streamlines, max |difference| "
          f"{np.abs(got - ref).max():g}")
    assert np.array_equal(got, ref)
