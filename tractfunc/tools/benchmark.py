"""Forward-tracking benchmark: tractfunc vs MRtrix3 tckgen (and DIPY) on the same data, seeds and cores.

Each contender runs as its own subprocess, end to end as a user would run it (load, track, write), with
the same FOD, seed image, mask, streamline count (``-select``) and thread count.  Reported per run: wall
time, vertices written, vertices per second, peak resident memory of the process, and the ratio of
tractfunc's wall time to tckgen's.  ``tractfunc bench --help`` for the options; results also go to JSON.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional


def _count_vertices(tck: str) -> int:
    import nibabel as nib
    t = nib.streamlines.load(tck, lazy_load=True)
    return int(sum(len(s) for s in t.streamlines))


def _timed(cmd: List[str], env: Optional[dict] = None) -> dict:
    """Run ``cmd``: wall time, CPU time and the child's own peak RSS (MiB, from GNU time's %M when
    /usr/bin/time exists; otherwise the max over children so far, an upper bound)."""
    gnu_time = os.path.exists("/usr/bin/time")
    full = (["/usr/bin/time", "-f", "BENCH_MAXRSS_KB=%M"] + cmd) if gnu_time else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_kb = after.ru_maxrss
    if gnu_time:
        rss_kb = int(p.stderr.rsplit("BENCH_MAXRSS_KB=", 1)[1].split()[0])
    return {"wall_s": wall, "peak_rss_mib": rss_kb / 1024.0,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def _dipy_script() -> str:
    return r'''
import sys, time, numpy as np, nibabel as nib
from dipy.data import default_sphere
from dipy.direction import DeterministicMaximumDirectionGetter
from dipy.tracking.local_tracking import LocalTracking
from dipy.tracking.stopping_criterion import BinaryStoppingCriterion
from dipy.tracking import utils
from dipy.tracking.streamline import Streamlines
fod, seed, mask, n, step, out = sys.argv[1:7]
img = nib.load(fod); sh = np.asarray(img.dataobj, dtype=np.float64)
seeds_mask = np.asarray(nib.load(seed).dataobj) > 0
brain = np.asarray(nib.load(mask).dataobj) > 0
dg = DeterministicMaximumDirectionGetter.from_shcoeff(sh, max_angle=60.0, sphere=default_sphere,
                                                      sh_to_pmf=True, basis_type="tournier07", legacy=False)
seeds = utils.random_seeds_from_mask(seeds_mask, img.affine, seeds_count=int(n), seed_count_per_voxel=False,
                                     random_seed=0)
lt = LocalTracking(dg, BinaryStoppingCriterion(brain), seeds, img.affine, step_size=float(step))
sl = Streamlines(lt)
nib.streamlines.save(nib.streamlines.Tractogram(sl, affine_to_rasmm=np.eye(4)), out)
'''


def run(fod: str, seed_image: str, mask: str, select: int, threads: int, dtype: str = "float32",
        device: str = "cpu", rk4: bool = False, dipy: bool = False, repeats: int = 1,
        json_path: Optional[str] = None, workers: int = 1, compiled: bool = False, engine: str = "auto") -> dict:
    """Run the benchmark; returns (and optionally writes) a dict of results.  compiled: tractfunc runs
    with ``--compile`` (its wall time then includes compilation)."""
    if shutil.which("tckgen") is None:
        raise RuntimeError("tckgen (MRtrix3) not on PATH: apt-get install -y mrtrix3")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MRTRIX_RNG_SEED="7")
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
               "inputs": {"fod": fod, "seed_image": seed_image, "mask": mask, "select": select,
                          "threads": threads, "workers": workers, "dtype": dtype, "device": device, "rk4": rk4,
                          "compiled": compiled, "engine": engine},
               "runs": []}
    import torch
    results["machine"]["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            out = os.path.join(tmp, f"tckgen{rep}.tck")
            cmd = ["tckgen", "-algorithm", "SD_Stream", fod, out, "-seed_image", seed_image, "-select",
                   str(select), "-nthreads", str(threads), "-force", "-quiet"] + (["-mask", mask] if mask else []) \
                + (["-rk4"] if rk4 else [])
            r = _timed(cmd, env)
            r.update(tool="tckgen", vertices=_count_vertices(out))
            results["runs"].append(r)
            out = os.path.join(tmp, f"tractfunc{rep}.tck")
            cmd = [sys.executable, "-m", "tractfunc.cli", "track", fod, out, "--seed-image", seed_image,
                   "--select", str(select), "--threads", str(max(1, threads // workers)), "--workers", str(workers),
                   "--dtype", dtype, "--device", device, "--engine", engine,
                   "--quiet"] + (["--mask", mask] if mask else []) + (["--rk4"] if rk4 else []) \
                + (["--compile"] if compiled else [])
            r = _timed(cmd, env)
            r.update(tool="tractfunc", vertices=_count_vertices(out))
            results["runs"].append(r)
            if dipy:
                from ..io.images import load_fod
                from ..core.params import resolve
                step = resolve(load_fod(fod).voxel_sizes, rk4=rk4).step
                out = os.path.join(tmp, f"dipy{rep}.tck")
                r = _timed([sys.executable, "-c", _dipy_script(), fod, seed_image, mask, str(select), str(step), out],
                           env)
                r.update(tool="dipy (seeds=select)", vertices=_count_vertices(out))
                results["runs"].append(r)
    for r in results["runs"]:
        r["vertices_per_s"] = r["vertices"] / r["wall_s"]
    best = {}
    for r in results["runs"]:
        if r["tool"] not in best or r["wall_s"] < best[r["tool"]]["wall_s"]:
            best[r["tool"]] = r
    results["best"] = best
    if "tckgen" in best and "tractfunc" in best:
        results["ratio_wall_tractfunc_over_tckgen"] = best["tractfunc"]["wall_s"] / best["tckgen"]["wall_s"]
    if json_path:
        from ..io.atomic import atomic_path
        with atomic_path(json_path) as tmp, open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def format_table(results: dict) -> str:
    rows = ["| tool | wall s | vertices | vertices/s | peak RSS MiB | wall / tckgen |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    ref = results["best"].get("tckgen", {}).get("wall_s")
    for tool, r in results["best"].items():
        ratio = f"{r['wall_s'] / ref:.2f}" if ref else "-"
        rows.append(f"| {tool} | {r['wall_s']:.2f} | {r['vertices']} | {r['vertices_per_s']:,.0f} | "
                    f"{r['peak_rss_mib']:.0f} | {ratio} |")
    m, i = results["machine"], results["inputs"]
    rows.append("")
    rows.append(f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}; "
                f"threads {i['threads']} (tractfunc: {i.get('workers', 1)} processes, engine {i.get('engine', i.get('backend', 'auto'))}), "
                f"select {i['select']}, dtype {i['dtype']}, device {i['device']}"
                f"{', rk4' if i['rk4'] else ''}; best of {len(results['runs']) // max(len(results['best']), 1)}")
    return "\n".join(rows)
