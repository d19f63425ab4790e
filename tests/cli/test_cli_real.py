"""The tckgen-facing subcommands (`parity`, `bench`, `track --dtype float64`) run as subprocesses on the real
Philips data (the other subcommands' real-data subprocess tests: tests/cli/test_cli_tools.py, tests/io/test_formats.py)."""
import json
import re

import nibabel as nib
import numpy as np

from conftest import require_philips, require_tckgen
from conftest import run_cli as run


def test_parity_subcommand_on_real_data():
    """`tractfunc parity` runs tckgen and re-tracks its 300 streamlines with the native kernel."""
    require_tckgen()
    d = require_philips()
    p = run("parity", d["fod"], "--seed-image", d["seed"], "--mask", d["mask"], "--select", "300")
    m = re.search(r"300 streamlines, ([\d.]+)% bit-identical, ([\d.]+)% within 0.1 mm, ([\d.]+)% within 1 mm, "
                  r"(\d+) seeds lost", p.stdout)
    assert m, p.stdout
    assert "native engine" in p.stdout
    assert float(m.group(3)) >= 99.0 and int(m.group(4)) == 0 and float(m.group(1)) > 30


def test_bench_subcommand_on_real_data(tmp_path):
    """`tractfunc bench` times tckgen and tractfunc on the same job and writes the ratio."""
    require_tckgen()
    d = require_philips()
    out = tmp_path / "bench.json"
    p = run("bench", d["fod"], "--seed-image", d["seed"], "--mask", d["mask"], "--select", "300", "--threads", "1",
            "--json", str(out))
    res = json.loads(out.read_text())
    assert set(res["best"]) == {"tckgen", "tractfunc"}
    assert all(r["vertices"] > 300 * 20 for r in res["best"].values())     # both tracked the 300 streamlines
    assert res["ratio_wall_tractfunc_over_tckgen"] > 0 and "tckgen" in p.stdout


def test_track_float64_on_real_data_draws_the_native_streamlines(tmp_path):
    """`--dtype float64` (the PyTorch tracker, decisions from the kernel) writes the float32 run's
    streamlines from the same seeds (``--seeds``: the same draws on both routes): same count, same vertex
    counts, vertices within 0.01 mm."""
    d = require_philips()
    outs = {}
    for dt in ("float32", "float64"):
        outs[dt] = str(tmp_path / f"{dt}.tck")
        run("track", d["fod"], outs[dt], "--seed-image", d["seed"], "--mask", d["mask"], "--seeds", "150",
            "--rng-seed", "3", "--dtype", dt, "--state-dtype", dt, "--quiet")
    a, b = (list(nib.streamlines.load(outs[k]).streamlines) for k in ("float32", "float64"))
    assert len(a) == len(b) > 80
    assert [len(x) for x in a] == [len(x) for x in b]
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 0.01
