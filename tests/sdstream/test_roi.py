"""tckgen's ROIs (``-include``, ``-include_ordered``, ``-exclude``, ``-stop``, ``-seed_unidirectional``): parity and
bad input.

With a known start (``-seed_direction``) the native kernel must reproduce tckgen's streamlines bit for bit: the
exclusion test after each step (rejecting the streamline, keeping the vertex that entered), the seed rejected in an
exclusion region, the include visitation from the seed on (ordered regions in order), ``-stop`` (keeping the vertex
that completed the set).  Measured on the Philips data: include + exclude spheres 100 / 100 bit-identical (Euler);
with ACT, RK4 and -stop 1000 / 1000 (float64 follow: 1000 / 1000 within 0.1 mm); ordered include spheres with
-seed_unidirectional 100 / 100.
"""
import numpy as np
import pytest
import torch

from tractfunc import Regions, Sphere
from tractfunc.errors import TractfuncError
from tractfunc.sdstream import native
from tractfunc.tools import parity

from conftest import START, require_philips, require_tckgen, run_cli
from test_native import _kernel_available

INCLUDE, EXCLUDE, INCLUDE2 = (0.0, 10.0, 15.0, 25.0), (0.0, -30.0, 10.0, 10.0), (20.0, 0.0, 20.0, 15.0)


def _sphere(spec):
    return Sphere(spec[:3], spec[3])


def _arg(spec):
    return ",".join(repr(v) for v in spec)


def _roi_parity(tmp_path, n, rk4, dtype, extra, regions, act=False):
    d = require_philips()
    require_tckgen()
    _kernel_available()
    tck, csv = str(tmp_path / "ref.tck"), str(tmp_path / "seeds.csv")
    extra = list(extra) + (["-act", d["5tt"]] if act else [])
    parity.run_tckgen(d["fod"], tck, csv, d["seed"], None, n, rk4=rk4, nthreads=0, rng_seed=7, seed_direction=START,
                      extra=extra)
    ref = parity.load_reference(tck, csv)
    r = parity.compare(ref, d["fod"], None, rk4, dtype, start=START, act_path=d["5tt"] if act else None,
                       regions=regions)
    print(f"ROIs {extra[:6]} rk4={rk4} {dtype}: {len(ref.streamlines)} streamlines, {r.identical:.4f} bit-identical, "
          f"{r.within_01:.4f} within 0.1 mm, lost {r.lost}, too short {r.too_short}")
    assert len(ref.streamlines) > 0 and r.lost == 0 and r.too_short == 0
    return r


def test_include_exclude_bit_identical_to_tckgen(tmp_path):
    """-include and -exclude spheres (100 streamlines, Euler, float32)."""
    r = _roi_parity(tmp_path, 100, False, torch.float32, ["-include", _arg(INCLUDE), "-exclude", _arg(EXCLUDE)],
                    Regions(include=(_sphere(INCLUDE),), exclude=(_sphere(EXCLUDE),)))
    assert r.identical >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_act_include_exclude_stop_rk4(tmp_path, dtype):
    """ACT with include / exclude spheres and -stop, RK4 (1000 streamlines)."""
    r = _roi_parity(tmp_path, 1000, True, dtype, ["-include", _arg(INCLUDE), "-exclude", _arg(EXCLUDE), "-stop"],
                    Regions(include=(_sphere(INCLUDE),), exclude=(_sphere(EXCLUDE),), stop=True), act=True)
    assert r.within_01 >= 0.999 and (dtype == torch.float64 or r.identical >= 0.999)


@pytest.mark.slow
def test_ordered_include_unidirectional(tmp_path):
    """-include_ordered (two spheres) with -seed_unidirectional."""
    r = _roi_parity(tmp_path, 100, False, torch.float32,
                    ["-include_ordered", _arg(INCLUDE), "-include_ordered", _arg(INCLUDE2), "-seed_unidirectional"],
                    Regions(include_ordered=(_sphere(INCLUDE), _sphere(INCLUDE2)), unidirectional=True))
    assert r.identical >= 0.999


def test_bad_regions_are_one_line_errors():
    """A negative radius, a non-finite centre, ordered include regions without unidirectional seeding."""
    for regions, what in ((Regions(include=(Sphere((0, 0, 0), -1.0),)), "radius"),
                          (Regions(exclude=(Sphere((0, np.nan, 0), 1.0),)), "finite"),
                          (Regions(include_ordered=(Sphere((0, 0, 0), 1.0),)), "unidirectional")):
        with pytest.raises(TractfuncError, match=what):
            native.check_regions(regions)


def test_cli_rejects_unreachable_and_bad_regions(tmp_path, phantom_files):
    """An include region outside the FOD image, a negative radius, --include-ordered without
    --seed-unidirectional: one line, non-zero exit, no output file."""
    ph, paths = phantom_files
    out = tmp_path / "out.tck"
    for extra, what in ((["--include", "500,0,0,5"], "does not overlap"), (["--exclude", "0,0,0,-2"], "radius"),
                        (["--include-ordered", "0,0,0,5"], "seed-unidirectional")):
        p = run_cli("track", paths["fod"], str(out), "--seed-image", paths["mask"], "--select", "10", *extra,
                    check=False)
        assert p.returncode != 0 and what in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert not out.exists()
