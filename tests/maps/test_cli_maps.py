"""``tractfunc map`` (and the other maps commands): outputs MRtrix3 reads back and equal to its commands', one-line
errors with no partial output."""

import nibabel as nib
import numpy as np
import pytest

from conftest import leftovers, require_tckgen, run_cli
from mapsdata import mrtrix, philips_tck  # noqa: F401 (fixture)


def test_map_equals_tckmap_and_mrtrix_reads_it(philips_tck, tmp_path):
    require_tckgen("tckmap")
    ours, ref = str(tmp_path / "ours.nii.gz"), str(tmp_path / "ref.nii.gz")
    run_cli("map", philips_tck["tck"], ours, "--template", philips_tck["fa"], "--precise", "--tck-weights-in",
            philips_tck["weights"], "--quiet")
    mrtrix("tckmap", philips_tck["tck"], ref, "-template", philips_tck["fa"], "-precise", "-tck_weights_in",
           philips_tck["weights"])
    a, b = nib.load(ours), nib.load(ref)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    x, y = np.asarray(a.dataobj, np.float64), np.asarray(b.dataobj, np.float64)
    assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max()
    mrtrix("mrconvert", ours, str(tmp_path / "back.mif"))          # MRtrix3 reads the output


@pytest.mark.parametrize("bad,match", [("short", "weights for"), ("nan", "NaN"), ("text", "cannot be read")])
def test_map_bad_weights_fail_without_output(philips_tck, tmp_path, bad, match):
    w = tmp_path / "w.txt"
    n = int(open(philips_tck["weights"]).read().count("\n"))
    w.write_text({"short": "1\n" * (n - 1), "nan": "1\n" * (n - 1) + "nan\n", "text": "one two\n"}[bad])
    out = tmp_path / "o.nii.gz"
    p = run_cli("map", philips_tck["tck"], str(out), "--template", philips_tck["fa"], "--tck-weights-in", str(w),
                check=False)
    assert p.returncode != 0 and match in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists() and not leftovers(tmp_path)


def test_map_empty_tractogram_and_force(philips_tck, tmp_path):
    from tractfunc import io
    from tractfunc.io.tractogram import load_tractogram
    empty = str(tmp_path / "empty.tck")
    io.write_tractogram(empty, [], None, {})
    assert len(load_tractogram(empty).lengths) == 0
    out = tmp_path / "o.nii.gz"
    p = run_cli("map", empty, str(out), "--template", philips_tck["fa"], check=False)
    assert p.returncode != 0 and "no streamline" in p.stderr and not out.exists()
    out.write_bytes(b"old")
    p = run_cli("map", philips_tck["tck"], str(out), "--template", philips_tck["fa"], check=False)
    assert p.returncode != 0 and "--force" in p.stderr and out.read_bytes() == b"old"
    run_cli("map", philips_tck["tck"], str(out), "--template", philips_tck["fa"], "--force", "--quiet")
    img = nib.load(str(out))
    assert img.shape == nib.load(philips_tck["fa"]).shape and img.get_data_dtype() == np.uint32   # tckmap's type
