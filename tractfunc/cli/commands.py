"""Command line: ``tractfunc track | demo | parity | bench | info | convert | fod | render | map | sample |
connectome | sift2`` -- a thin layer over the Python API (the last four: :mod:`tractfunc.cli.maps`).

``track`` in float32 on the CPU runs the native kernel (:mod:`tractfunc.sdstream.native`) without importing torch;
other settings (float64, CUDA, ``--engine eager``, ``--compile``, ``--workers``, torchrun) run a
PyTorch engine.  The engine is chosen by :func:`tractfunc.sdstream.engine.choose`, the rule the Python API's
:func:`tractfunc.track` applies, with the same defaults.  Seeds and random start directions come from ``numpy.random.default_rng(--rng-seed)``
on both routes, so the two draw the same seeds."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import numpy as np

from ..tools import distributed
from .. import io
from ..core import params as P, seeds as S
from ..errors import TractfuncError
from ..tools.inputs import act_field, load_regions, native_kernel, state_dtype, torch_inputs
from . import args as cli_args, header as tck_header, outputs, preflight


STATE_HELP = ("precision in which positions, directions, Newton iterates and FOD samples are kept between "
              "operations (default: the --dtype's, as in the Python API; float32 with --dtype float64 keeps "
              "tckgen's float32 rounding under float64 arithmetic)")

EXAMPLES_TRACK = """examples:
  tractfunc track fod.nii.gz out.tck --seed-image wm.nii.gz --mask brain.nii.gz --select 5000
  tractfunc track fod.nii.gz out.tck --seed-points seeds.csv --seed-directions dirs.txt --rk4
  tractfunc track fod.nii.gz out.trk --seed-image wm.nii.gz --seeds 20000 --dtype float64
"""


def _progress(enabled: bool):
    """Progress line on stderr: done/total (seeds, or streamlines with --select), accepted/attempted
    seeds, streamlines per second and ETA."""
    t0 = time.time()

    def report(done, total, accepted, attempted=None):
        if not enabled:
            return
        dt = max(time.time() - t0, 1e-9)
        rate = done / dt
        eta = (total - done) / rate if rate > 0 and total else 0.0
        tried = f" / {attempted} seeds" if attempted is not None else ""
        sys.stderr.write(f"\r{done:>9} of {total}  [{accepted} accepted{tried}]  {accepted / dt:,.0f} streamlines/s  "
                         f"ETA {eta:5.0f}s ")
        sys.stderr.flush()
        if done >= total:
            sys.stderr.write("\n")
    return report


def _engine(a) -> str:
    """The engine ``track`` runs (:func:`tractfunc.sdstream.engine.choose`, as the Python API decides; no torch
    import).  --workers and torchrun split seeds across PyTorch processes, so they exclude the native kernel."""
    from ..sdstream import engine as E, native
    device = a.device.split(":")[0]
    processes = a.workers > 1 or distributed.launched()
    job = E.Job(dtype=a.dtype, device=device, grad=False, lut=not a.exact_sh, polish=0,
                state32=a.state_dtype != "float64",
                numeric_step=True, lmax_ok=True, compiled=a.compile, kernel=native.available()[0],
                rk4=a.rk4, narrow=a.dtype == "float64" and a.state_dtype == "float32")
    if processes:
        if a.engine == "native":
            raise TractfuncError("--engine native runs in this process; --workers and torchrun split seeds across "
                                 "PyTorch processes (use --engine eager or follow with them)")
        job = job._replace(kernel=job.kernel and a.engine == "follow")   # the follow engine decides per process
    try:
        return E.choose(job, a.engine)
    except TractfuncError as e:
        raise TractfuncError(f"--engine {a.engine}: {str(e).split(': ', 1)[-1]}") from None


def _inside_image(fod: io.Image, pts: np.ndarray) -> np.ndarray:
    A = np.linalg.inv(fod.affine)
    v = pts @ A[:3, :3].T + A[:3, 3]
    dims = np.array(fod.data.shape[:3])
    return np.all((v > -0.5) & (v < dims - 0.5), axis=1)


class _Sink:
    """Where accepted streamlines go: streamed to disk chunk by chunk for .tck (bounded memory; the file
    appears only when complete), collected then written for .trk.  Under a ``torchrun`` launch each rank
    streams its own streamlines to a part file and rank 0 merges the parts (see
    :mod:`tractfunc.tools.distributed`)."""

    def __init__(self, path, fod, header, shard=None):
        self.path, self.fod, self.header, self.shard = path, fod, header, shard
        self.count = 0
        self.rejected = 0   # seeds rejected at the seed point (outside the mask or image, no peak)
        self.outside = 0    # of which seed points skipped outside the FOD image (--outside skip)
        self.seed_pts, self.sidx = [], []
        self.lines = []
        self.segments = []   # per add(): (first byte, end byte, streamlines) of this rank's part
        tck = path.lower().endswith(".tck")
        if shard is not None and not tck:
            raise TractfuncError(f"{path}: a torchrun launch writes .tck (ranks stream parts that are merged)")
        self.part = self._part_name(shard.rank) if shard is not None else path
        self.writer = io.TckWriter(self.part, header) if tck else None

    def _part_name(self, rank: int) -> str:
        return f"{self.path[:-4]}.rank{rank}.tck"

    def add(self, batch, k: int, seed_pts):
        """The first k streamlines of a tracked ``batch`` (:class:`tractfunc.tools.distributed.Batch`), with
        their seed points (k, 3)."""
        verts, lengths = batch.local_prefix(k)
        if self.writer is not None:
            start = self.writer.tell()
            self.writer.write_packed(verts, lengths)
            self.segments.append((start, self.writer.tell(), len(lengths)))
        elif len(lengths):
            self.lines += np.split(np.asarray(verts, dtype=np.float64), np.cumsum(lengths)[:-1])
        self.seed_pts += list(seed_pts)
        self.sidx += batch.seed_index[:k].tolist()
        self.count += k

    def close(self, n_seeds):
        if self.writer is None:
            io.write_tractogram(self.path, self.lines, self.fod, {**self.header, "total_count": n_seeds})
            return
        self.writer.total_count = n_seeds
        self.writer.close()
        if self.shard is None:
            return
        parts = self.shard.all_gather(self.segments)
        if self.shard.rank == 0:   # interleave the parts' byte ranges: batch by batch, rank by rank
            with io.TckWriter(self.path, {**self.header, "total_count": n_seeds}) as out:
                files = [open(self._part_name(r), "rb") for r in range(self.shard.world)]
                try:
                    for j in range(len(self.segments)):
                        for fh, segs in zip(files, parts):
                            start, end, n = segs[j]
                            fh.seek(start)
                            out.write_raw(fh.read(end - start), n)
                finally:
                    for fh in files:
                        fh.close()
        self.shard.barrier()
        os.remove(self.part)

    def abort(self):
        if self.writer is not None:
            self.writer.abort()
        if self.shard is not None and os.path.exists(self.part):
            os.remove(self.part)


def _seed_sphere(spec: str):
    """--seed-sphere x,y,z,r -> (centre (3,), radius); one-line error for anything else or a negative radius."""
    try:
        x, y, z, r = (float(v) for v in spec.split(","))
    except ValueError:
        raise TractfuncError(f"--seed-sphere {spec!r}: expected x,y,z,r (scanner mm)") from None
    if not (np.isfinite([x, y, z, r]).all() and r >= 0):
        raise TractfuncError(f"--seed-sphere {spec!r}: expected a finite centre and a radius >= 0 mm")
    return (x, y, z), r


def _per_voxel(pair):
    """--seed-random-per-voxel / --seed-grid-per-voxel IMAGE N -> (mask image, N)."""
    path, n = pair
    try:
        n = int(n)
    except ValueError:
        n = 0
    if n < 1:
        raise TractfuncError(f"{path} {pair[1]}: expected a number of seeds per voxel >= 1")
    img = io.load_mask(path)
    if not img.data.any():
        raise TractfuncError(f"{path}: seed image has no non-zero voxel; expected a non-empty seed region")
    return img, n


def finite_seeds(a, gen):
    """The seed points (n, 3) scanner mm of the finite seeding mechanisms (--seed-points, --seed-random-per-voxel,
    --seed-grid-per-voxel: every point is tracked once) and their name, or None for the random ones."""
    if a.seed_points:
        return io.read_seed_points(a.seed_points), a.seed_points
    if a.seed_random_per_voxel:
        img, n = _per_voxel(a.seed_random_per_voxel)
        return S.random_per_voxel_np(img.data, img.affine, n, gen), a.seed_random_per_voxel[0]
    if a.seed_grid_per_voxel:
        img, n = _per_voxel(a.seed_grid_per_voxel)
        return S.grid_per_voxel_np(img.data, img.affine, n), a.seed_grid_per_voxel[0]
    return None


def _track_points(a, fod, run, gen, sink, report, pts, name):
    outside = ~_inside_image(fod, pts)
    dirs = io.read_directions(a.seed_directions, len(pts)) if a.seed_directions else None
    if dirs is None:   # tckgen draws a random start direction per seed
        dirs = S.random_directions_np(len(pts), gen)
    if outside.any():
        what = (f"{name}: {int(outside.sum())} of {len(pts)} seed points lie outside the FOD image "
                f"(first: row {int(np.argmax(outside)) + 1})")
        if a.outside == "fail":
            raise TractfuncError(f"{what}; expected scanner-mm points inside it (or --outside skip)")
        if not a.quiet:
            sys.stderr.write(f"tractfunc track: {what}; skipped (--outside skip)\n")
        pts, dirs = pts[~outside], dirs[~outside]
        sink.rejected += int(outside.sum())
        sink.outside += int(outside.sum())
    n_used = int(outside.sum())
    for start in range(0, len(pts), a.chunk):
        if a.select and sink.count >= a.select:
            break
        sl = slice(start, start + a.chunk)
        batch = run(pts[sl], dirs[sl])
        ids = batch.seed_ids
        keep = len(ids) if not a.select else min(len(ids), a.select - sink.count)
        # seeds up to the one that produced the select-th streamline count as used (as with --seed-image)
        used = int(ids[keep - 1]) + 1 if a.select and keep and sink.count + keep >= a.select else len(batch.seed_ok)
        sink.rejected += int((~batch.seed_ok[:used]).sum())
        n_used += used
        sink.add(batch, keep, [pts[sl][i] for i in ids[:keep].tolist()])
        report(min(sl.stop, len(pts)), len(pts), sink.count)
    return n_used


def _gmwmi_seeds(a):
    """draw(n, gen) of --seed-gmwmi IMAGE on --act's GM-WM interface (:func:`tractfunc.sdstream.native.gmwmi_seeder`)."""
    from ..sdstream import native as native_mod
    if not a.act:
        raise TractfuncError("--seed-gmwmi needs --act (the interface is that of the 5TT image, as in tckgen)")
    ok, why = native_mod.available()
    if not ok:
        raise TractfuncError(f"--seed-gmwmi needs the native library: {why}")
    data, affine, _ = io.read_image(a.seed_gmwmi)
    data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise TractfuncError(f"{a.seed_gmwmi}: seed image has shape {data.shape}; expected a 3-D image")
    tt = io.load_5tt(a.act)
    try:
        draw = native_mod.gmwmi_seeder(tt.data, tt.affine, tt.voxel_sizes, data, affine)
    except ValueError as e:
        raise TractfuncError(f"{a.seed_gmwmi}: {e}") from None

    def checked(n, gen):
        try:
            return draw(n, gen)
        except ValueError as e:
            raise TractfuncError(f"--seed-gmwmi {a.seed_gmwmi}: {e}") from None
    return checked


def _random_seeds(a):
    """draw(n, gen) -> (n, 3) scanner mm seeds of --seed-image or --seed-sphere."""
    if a.seed_sphere:
        centre, r = _seed_sphere(a.seed_sphere)
        return lambda n, gen: S.sphere_points_np(centre, r, n, gen)
    if a.seed_gmwmi:
        return _gmwmi_seeds(a)
    if a.seed_rejection:
        data, affine, _ = io.read_image(a.seed_rejection)
        data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
        if data.ndim != 3:
            raise TractfuncError(f"{a.seed_rejection}: seed image has shape {data.shape}; expected a 3-D image")
        try:
            S.weighted_in_image_np(data, affine, 1, np.random.default_rng(0))
        except ValueError as e:
            raise TractfuncError(f"{a.seed_rejection}: {e}") from None
        return lambda n, gen: S.weighted_in_image_np(data, affine, n, gen)
    seed_img = io.load_mask(a.seed_image)
    if not seed_img.data.any():
        raise TractfuncError(f"{a.seed_image}: seed image has no non-zero voxel; expected a non-empty seed region")
    return lambda n, gen: S.random_in_mask_np(seed_img.data, seed_img.affine, n, gen)


def _track_image(a, run, gen, sink, report, overshoot: float = 1.15, min_batch: int = 512):
    if a.seed_directions:
        raise TractfuncError("--seed-directions needs --seed-points (one direction per seed point)")
    draw = _random_seeds(a)
    select, max_seeds = preflight.limits(a)   # tckgen's meanings: --select 0 / --seeds 0 = no limit
    hopeless = preflight.SEEDS_PER_SELECT * max(select, 1)   # unlimited seeds: give up if none accepted by then
    n_seeds = 0
    while n_seeds < max_seeds and (not select or sink.count < select):
        if sink.count == 0 and n_seeds >= hopeless:
            break
        # size the next chunk from the acceptance rate so far (tckgen seeds until --select is reached)
        # (first guess 0.7: typical white-matter seeding); the PyTorch tracker overshoots a little rather
        # than run a tiny extra batch, whose per-tick overhead would dominate; the native kernel has no
        # such overhead and tops up in small batches instead of tracking seeds for nothing
        rate = max(sink.count / n_seeds, 0.05) if n_seeds else 0.7
        want = overshoot * (select - sink.count) / rate if select else max_seeds
        n = int(min(max(want, min_batch), a.chunk, max_seeds - n_seeds, hopeless))
        pts = draw(n, gen)
        batch = run(pts, S.random_directions_np(n, gen))
        keep = batch.seed_ids.tolist()
        if select and sink.count + len(keep) >= select:
            k = select - sink.count
            # count seeds up to and including the one that produced the select-th streamline
            used = keep[k - 1] + 1
            keep = keep[:k]
        else:
            used = n
        n_seeds += used
        sink.rejected += int((~batch.seed_ok[:used]).sum())
        sink.add(batch, len(keep), [pts[i] for i in keep])
        report(n_seeds if not select else sink.count, int(max_seeds) if not select else select, sink.count, n_seeds)
    return n_seeds


def cmd_track(a) -> int:
    preflight.check_track(a)   # limits, and whether any seed can land in the FOD and the mask: before any work
    if a.backtrack:   # tckgen's rule for SD_Stream
        raise TractfuncError("--backtrack: backtracking is not valid for deterministic algorithms (SD_Stream)"
                             if a.act else "--backtrack needs --act (and is not valid for SD_Stream)")
    if a.crop_at_gmwmi and not a.act:
        sys.stderr.write("tractfunc track: warning: --crop-at-gmwmi ignored: only valid with --act (as tckgen)\n")
    rois = (a.act or a.include or a.include_ordered or a.exclude or a.stop or a.seed_unidirectional or a.seed_sphere
            or a.seed_rejection or a.seed_gmwmi
            or a.seed_random_per_voxel or a.seed_grid_per_voxel)
    if rois and (a.algorithm != "sd_stream" or a.workers > 1 or distributed.launched()):
        raise TractfuncError("--act, the ROI options and the per-voxel / sphere seeding run with --algorithm "
                             "sd_stream in one process (no --workers / torchrun)")
    if a.seed_cutoff is not None and not (np.isfinite(a.seed_cutoff) and a.seed_cutoff >= 0):
        raise TractfuncError(f"--seed-cutoff {a.seed_cutoff}: expected an FOD amplitude >= 0")
    if a.max_attempts_per_seed is not None and a.max_attempts_per_seed < 1:
        raise TractfuncError(f"--max-attempts-per-seed {a.max_attempts_per_seed}: expected a number >= 1")
    if a.include_ordered and not a.seed_unidirectional:
        raise TractfuncError("--include-ordered requires --seed-unidirectional (as tckgen)")
    if a.algorithm != "sd_stream":   # DIPY-style local tracking (tractfunc.local.tracker, docs/dipy_getters.md)
        if a.chunk < 1:
            raise TractfuncError(f"--chunk must be a positive number of seeds, got {a.chunk}")
        from . import local
        return local.track_command(a)
    if a.workers < 1:
        raise TractfuncError(f"--workers must be a positive number of processes, got {a.workers}")
    if a.chunk < 1:
        raise TractfuncError(f"--chunk must be a positive number of seeds, got {a.chunk}")
    gen = np.random.default_rng(a.rng_seed)
    pool = shard = None
    native = _engine(a) == "native"
    if native:
        from ..sdstream import native as native_mod
        threads = a.threads or os.cpu_count() or 1
        fod, prm, kernel = native_kernel(a, threads)

        def run_here(pts: np.ndarray, dirs: np.ndarray):
            v, ln, ids, sidx, reasons, _ = kernel.track(pts, dirs, threads)
            return v, ln, ids, sidx, reasons[:, 0] != int(native_mod.SEED_REJECTED)
    else:
        import torch
        from ..sdstream.track import track
        dtype = {"float32": torch.float32, "float64": torch.float64}[a.dtype]
        device = torch.device(a.device)
        if a.threads:
            torch.set_num_threads(a.threads)
        if distributed.launched():
            if a.workers > 1:
                raise TractfuncError("--workers and a torchrun launch both split seeds; use one of them")
            shard = distributed.Shard(device)
            device = shard.device(device)
        fod, prm, fld, msk = torch_inputs(a, dtype, device)
        actf, regions = act_field(a, device), load_regions(a, fod)
        if a.workers > 1:
            if device.type != "cpu":
                raise TractfuncError("--workers splits seeds across CPU processes; use it with --device cpu")
            from ..tools.workers import Pool
            pool = Pool(a, a.dtype, a.workers, threads_each=a.threads or 1)

        def run_here(pts: np.ndarray, dirs: np.ndarray):
            """Track seeds (S, 3) with start directions (S, 3) -> packed streamlines (vertices (V, 3),
            lengths (A,)), seed ids (A,), seed vertex indices (A,), seed accepted (S,); NumPy."""
            if pool is not None:
                return pool.track(pts, dirs)
            res = track(fld, prm, torch.as_tensor(pts, dtype=dtype, device=device),
                        torch.as_tensor(dirs, dtype=dtype, device=device), mask=msk, compiled=a.compile,
                        engine=a.engine, act=actf, regions=regions)
            return (*(x.cpu().numpy() for x in (res.vertices, res.lengths, res.seed_ids, res.seed_index)),
                    res.seeds_ok().cpu().numpy())

    leader = shard is None or shard.rank == 0
    report = _progress(leader and not a.quiet and sys.stderr.isatty())
    finite = finite_seeds(a, gen)
    if finite is not None:
        limit_seeds, limit_tracks = 0, a.select or 0
    else:
        limit_tracks, limit_seeds = preflight.limits(a)
    header = tck_header.track_header(a, prm, 0 if limit_seeds == float("inf") else int(limit_seeds), limit_tracks)
    sink = _Sink(a.output, fod, header, shard)

    def run(pts: np.ndarray, dirs: np.ndarray) -> distributed.Batch:
        """Track a seed batch (here, or this rank's share of it)."""
        if shard is not None:
            return shard.track(run_here, pts, dirs)
        v, ln, ids, sidx, ok = run_here(pts, dirs)
        return distributed.Batch(v, ln, ids, sidx, seed_ok=ok)

    try:
        if finite is not None:
            n_seeds = _track_points(a, fod, run, gen, sink, report, *finite)
        else:
            batching = dict(overshoot=1.02, min_batch=64) if native else {}
            n_seeds = _track_image(a, run, gen, sink, report, **batching)
        # tckgen's total_count: streamlines generated (written + rejected for their length), not seeds
        generated = max(n_seeds - sink.rejected, sink.count)
        if sink.count == 0:
            raise TractfuncError(f"no streamline accepted from {n_seeds} seeds: {_rejections(sink, generated, prm, bool(a.act or a.include or a.include_ordered or a.exclude))}; "
                                 "nothing written")
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
    sink.close(generated)
    if shard is not None:
        shard.close()
    if a.output_seeds and leader:
        io.write_seeds_csv(a.output_seeds, np.asarray(sink.seed_pts).reshape(-1, 3), sink.sidx)
    if not a.quiet and leader:
        print(f"{a.output}: {sink.count} streamlines from {n_seeds} seeds (count/total_count = "
              f"{sink.count}/{generated}; {_rejections(sink, generated, prm, bool(a.act or a.include or a.include_ordered or a.exclude))})")
    return 0


def _rejections(sink, generated: int, prm, constrained: bool = False) -> str:
    """The per-reason counts of a run: seeds rejected at the seed point, streamlines rejected for length (and,
    when ``constrained``, by ACT's tissue rules or the ROIs)."""
    where = f" ({sink.outside} seed points outside the FOD image)" if sink.outside else ""
    seed_rule, line_rule = (" or tissue (ACT) or exclusion region",
                            " or rejected by ACT or the ROIs (entered CSF or an exclusion region, missed an include "
                            "region, too long, poor termination)") if constrained else ("", "")
    return (f"{sink.rejected} seeds rejected at the seed point: outside the mask or image{seed_rule}, or no FOD peak "
            f"above the cutoff {prm.cutoff:.6g}{where}; {generated - sink.count} streamlines shorter than the minimum "
            f"length {prm.min_length:.6g} mm{line_rule}")


def cmd_demo(a) -> int:
    if a.seeds < 1:
        raise TractfuncError(f"--seeds {a.seeds}: expected a number of seeds >= 1 to track the phantom from")
    import torch
    from ..core import field as F
    from ..tools.phantom import make_phantom, save_phantom
    from ..sdstream.track import track
    os.makedirs(a.out, exist_ok=True)
    ph = make_phantom()
    paths = save_phantom(ph, os.path.join(a.out, "phantom"))
    img = io.load_fod(paths["fod"])
    prm = P.resolve(img.voxel_sizes)
    fld = F.make_field(torch.as_tensor(img.data), img.affine)
    msk = F.make_mask(torch.as_tensor(ph.mask), ph.affine)
    gen = torch.Generator().manual_seed(a.rng_seed)
    pts = S.random_in_mask(torch.as_tensor(ph.seed_mask), ph.affine, a.seeds, gen).float()
    t0 = time.time()
    res = track(fld, prm, pts, None, mask=msk, generator=gen)
    dt = time.time() - t0
    arrays = [l.double().numpy() for l in res.streamlines()]
    out_tck = os.path.join(a.out, "phantom.tck")
    io.write_tractogram(out_tck, arrays, img, {"method": "SDStream", "step_size": np.float32(prm.step),
                                               "command_history": tck_header.command_history(a.argv),
                                               "timestamp": tck_header.timestamp()})
    png = os.path.join(a.out, "phantom.png")
    from ..tools.render import render
    render(np.concatenate(arrays) if arrays else np.zeros((0, 3)), np.array([len(x) for x in arrays], dtype=np.int64),
           png, background=(ph.fod[..., 0], ph.affine),
           title="tractfunc SD_Stream on the built-in phantom (colour = direction, RGB = |x|,|y|,|z|; neurological)")
    n_vert = sum(len(x) for x in arrays)
    print(f"phantom demo: {len(arrays)} of {a.seeds} seeds accepted, {n_vert} vertices in {dt:.1f}s")
    print(f"wrote {paths['fod']}, {paths['mask']}, {out_tck}, {png}")
    return 0


def cmd_parity(a) -> int:
    import torch
    from ..tools import parity
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        tck, csv = os.path.join(tmp, "ref.tck"), os.path.join(tmp, "seeds.csv")
        parity.run_tckgen(a.fod, tck, csv, a.seed_image, a.mask, a.select, rk4=a.rk4, nthreads=a.threads)
        ref = parity.load_reference(tck, csv)
        dtype = {"float32": torch.float32, "float64": torch.float64}[a.dtype]
        r = parity.compare(ref, a.fod, a.mask, a.rk4, dtype, state_dtype=state_dtype(a.state_dtype),
                           engine=a.engine)
    print(f"parity vs tckgen SD_Stream{' -rk4' if a.rk4 else ''} ({a.dtype}, {r.engine} engine): "
          f"{len(r.distances)} streamlines, {100 * r.identical:.2f}% bit-identical, "
          f"{100 * r.within_01:.2f}% within 0.1 mm, {100 * r.within_1:.2f}% within 1 mm, {r.lost} seeds lost, "
          f"{r.too_short} shorter than the minimum length, tractfunc {r.seconds:.1f}s")
    return 0


def cmd_bench(a) -> int:
    from ..tools import benchmark
    try:
        res = benchmark.run(a.fod, a.seed_image, a.mask, a.select, a.threads, a.dtype, a.device, a.rk4,
                            a.dipy, a.repeats, a.json, a.workers, a.compile, a.engine)
    except RuntimeError as e:
        raise TractfuncError(str(e)) from None
    print(benchmark.format_table(res))
    return 0


EXAMPLES_BENCH = """examples:
  tractfunc bench fod.nii.gz --seed-image wm.nii.gz --mask brain.nii.gz --select 10000 --threads 2
  tractfunc bench fod.nii.gz --seed-image wm.nii.gz --mask brain.nii.gz --dipy --json bench.json
"""


def cmd_info(a) -> int:
    import json
    from ..io import tractogram as T
    reports = []
    for path in a.files:
        s = T.summary(T.load_tractogram(path))
        reports.append({"file": path, **s})
        if a.json:
            continue
        print(path)
        print(f"  count:            {s['count']}")
        if s["total_count"] is not None:
            print(f"  total_count:      {s['total_count']}")
        print(f"  vertices:         {s['vertices']}")
        if s["count"]:
            print(f"  length (mm):      min {s['length_min_mm']:.4g}  mean {s['length_mean_mm']:.4g}  "
                  f"max {s['length_max_mm']:.4g}")
            print(f"  points:           min {s['points_min']}  max {s['points_max']}")
        if "dims" in s:
            print(f"  reference grid:   {' x '.join(map(str, s['dims']))}")
            for row in s["voxel_to_rasmm"][:3]:
                print("  voxel_to_rasmm:   " + "  ".join(f"{v:10.4f}" for v in row))
        for k, v in s["header"].items():
            print(f"  {k + ':':<17} {v}")
    if a.json:
        out = json.dumps(reports if len(reports) > 1 else reports[0], indent=2)
        if a.json == "-":
            print(out)
        else:
            from ..io.atomic import atomic_path
            with atomic_path(a.json) as tmp, open(tmp, "w") as fh:
                fh.write(out + "\n")
    return 0


def cmd_convert(a) -> int:
    from ..io import tractogram as T
    if os.path.splitext(a.output)[1].lower() not in T.FORMATS:
        raise TractfuncError(f"{a.output}: unknown tractogram extension; expected .tck, .trk or .trx")
    tracks = T.load_tractogram(a.input, reference=a.reference)
    T.save_tractogram(tracks, a.output, reference=a.reference)
    if not a.quiet:
        print(f"{a.output}: {len(tracks.lengths)} streamlines from {a.input}")
    return 0


EXAMPLES_5TT2GMWMI = """examples:
  tractfunc 5tt2gmwmi 5tt.nii.gz gmwmi.nii.gz
  tractfunc 5tt2gmwmi 5tt.nii.gz gmwmi.nii.gz --mask brain.nii.gz --force
"""

EXAMPLES_INFO = """examples:
  tractfunc info out.tck
  tractfunc info a.tck b.trk c.trx --json -
  tractfunc info out.trx --json info.json
"""

EXAMPLES_CONVERT = """examples:
  tractfunc convert out.tck out.trk --reference fod.nii.gz
  tractfunc convert out.tck out.trx --reference fod.mif
  tractfunc convert out.trk out.tck
  tractfunc convert out.trx out.trk
(.trk and .trx record a voxel grid: converting from .tck needs --reference; coordinates are kept in scanner mm)
"""


ENGINE_HELP = ("native: the C kernel with tckgen's exact float32 arithmetic (bit-identical to tckgen, fastest; float32 "
               "on the CPU); follow: PyTorch in --dtype along the kernel's discrete decisions (tckgen's streamlines "
               "in float64); eager: PyTorch deciding in its own arithmetic (any dtype/device; differs from tckgen on "
               "~0.1%% of streamlines, at rounding-level ties); auto (default, as "
               "tractfunc.track): native, else follow on the CPU, else eager (docs/api.md)")


EXAMPLES_DEMO = """examples:
  tractfunc demo
  tractfunc demo --out demo_dir --seeds 5000 --rng-seed 1
"""

EXAMPLES_PARITY = """examples:
  tractfunc parity fod.nii.gz --seed-image wm.nii.gz --mask brain.nii.gz --select 10000
  tractfunc parity fod.nii.gz --seed-image wm.nii.gz --mask brain.nii.gz --rk4 --dtype float64
"""

EXAMPLES_FOD = """examples:
  tractfunc fod dwi.nii.gz dwi.bval dwi.bvec fod.nii.gz --mask brain.nii.gz
  tractfunc fod dwi.nii.gz dwi.bval dwi.bvec fod.nii.gz --response dwi_response.txt --jobs 4
  tractfunc track fod.nii.gz out.tck --seed-image brain.nii.gz --mask brain.nii.gz --select 5000
"""

EXAMPLES_RENDER = """examples:
  tractfunc render out.tck out.png --background fod.nii.gz
  tractfunc render out.tck out.png --background dwi.nii.gz --slab 10 --max-streamlines 20000

orientation: neurological (subject's right on the right of the coronal and axial views); colour = segment
direction in scanner axes, RGB = |x|, |y|, |z| (red left-right, green anterior-posterior, blue inferior-superior)
"""


def cmd_fod(a) -> int:
    from ..tools import csd
    t0 = time.time()
    res = csd.fod_from_files(a.dwi, a.bval, a.bvec, a.output, a.mask, a.lmax, a.response, a.fa_thr, a.roi_radii,
                             a.jobs, a.tau)
    resp = ("automatic, from " + f"{res.response_voxels} voxels" if res.response[0] == "auto"
            else f"from {a.response}")
    print(f"{a.output}: lmax {a.lmax} FODs (MRtrix3 basis) in {int(res.mask.sum())} voxels; response {resp}: "
          + " ".join(f"{c:.6g}" for c in res.response[1]) + f"; {res.not_converged} voxels did not converge; "
          f"fit {res.seconds:.1f}s, total {time.time() - t0:.1f}s")
    return 0


def cmd_5tt2gmwmi(a) -> int:
    """``tractfunc 5tt2gmwmi``: MRtrix3's GM-WM interface map of a 5TT image (tractfunc.tools.gmwmi)."""
    from ..tools import gmwmi
    tt = io.load_5tt(a.input)
    mask = None
    if a.mask:
        m = io.load_mask(a.mask)
        if m.data.shape != tt.data.shape[:3]:
            raise TractfuncError(f"{a.mask}: mask grid {m.data.shape} does not match the 5TT grid {tt.data.shape[:3]}")
        mask = m.data
    out = gmwmi.gmwmi(tt.data, mask)
    img, _, _ = io.load_nifti(a.input)
    io.save_nifti(a.output, np.asarray(out, dtype=np.float32), img.affine, descrip="tractfunc 5tt2gmwmi",
                  reference_header=img.header)
    if not a.quiet:
        print(f"{a.output}: GM-WM interface in {int((out > 0).sum())} voxels (max {float(out.max()):.4g})")
    return 0


def cmd_render(a) -> int:
    from ..tools import render
    out = render.render_file(a.tractogram, a.output, a.background, a.max_streamlines, a.slab, a.rng_seed)
    print(f"{a.output}: {out['streamlines']} of {out['total']} streamlines drawn, "
          f"{out['pixels'][0]} x {out['pixels'][1]} pixels")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = cli_args.Parser(prog="tractfunc", description="Differentiable SD_Stream tractography in PyTorch.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("track", help="track streamlines (tckgen -algorithm SD_Stream equivalent)",
                       epilog=EXAMPLES_TRACK, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("fod", help="FOD image, SH coefficients in the MRtrix3 basis (NIfTI or MRtrix .mif/.mif.gz)")
    t.add_argument("output", help="output tractogram (.tck, .trk or .trx)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--seed-image", help="seed uniformly within the non-zero voxels of this image")
    g.add_argument("--seed-points", help="seed points file: rows 'x y z' (scanner mm) or a tckgen -output_seeds CSV")
    g.add_argument("--seed-sphere", metavar="X,Y,Z,R", help="seed uniformly at random in this sphere (scanner mm)")
    g.add_argument("--seed-rejection", metavar="IMAGE",
                   help="seed at random, each voxel with probability proportional to its value in IMAGE (>= 0)")
    g.add_argument("--seed-gmwmi", metavar="IMAGE",
                   help="seed at the GM-WM interface (tckgen -seed_gmwmi; needs --act): points drawn from IMAGE "
                        "(e.g. tractfunc 5tt2gmwmi) as --seed-rejection, then moved onto the 5TT image's interface")
    g.add_argument("--seed-random-per-voxel", nargs=2, metavar=("IMAGE", "N"),
                   help="N seeds at random positions in every non-zero voxel of IMAGE (each tracked once)")
    g.add_argument("--seed-grid-per-voxel", nargs=2, metavar=("IMAGE", "N"),
                   help="an N x N x N grid of seeds in every non-zero voxel of IMAGE (each tracked once)")
    t.add_argument("--seed-directions", help="rows 'dx dy dz', one start direction per seed point")
    t.add_argument("--select", type=int, help="number of streamlines to keep (default 5000 with --seed-image)")
    t.add_argument("--seeds", type=int, help="number of seeds to draw (with --seed-image)")
    t.add_argument("--mask", help="tracking mask: streamlines stop on leaving it")
    t.add_argument("--step", type=float, help="step size in mm (default 0.1 x voxel, 0.25 x voxel with --rk4)")
    t.add_argument("--angle", type=float, help="maximum angle between steps in degrees (default 60)")
    t.add_argument("--cutoff", type=float, help="FOD amplitude cutoff (default 0.1)")
    t.add_argument("--min-length", type=float, help="minimum length in mm (default 5 x voxel)")
    t.add_argument("--max-length", type=float, help="maximum length in mm (default 100 x voxel)")
    t.add_argument("--rk4", action="store_true", help="fourth-order Runge-Kutta integration")
    t.add_argument("--act", metavar="5TT", help="anatomically-constrained tracking with this five-tissue-type image "
                                                "(tckgen -act; cutoff default 0.05, minimum length 2 x voxel)")
    t.add_argument("--crop-at-gmwmi", action="store_true",
                   help="with --act: end streamlines that enter cortical GM on the GM-WM interface (tckgen "
                        "-crop_at_gmwmi)")
    t.add_argument("--include", action="append", metavar="SPEC",
                   help="include region, x,y,z,r (sphere, mm) or an image; streamlines must enter every one (repeatable)")
    t.add_argument("--include-ordered", action="append", metavar="SPEC",
                   help="include region to enter in the order given (repeatable; needs --seed-unidirectional)")
    t.add_argument("--exclude", action="append", metavar="SPEC",
                   help="exclusion region, x,y,z,r or an image: a streamline entering it is rejected (repeatable)")
    t.add_argument("--stop", action="store_true", help="stop a streamline once it has entered every include region")
    t.add_argument("--seed-unidirectional", action="store_true",
                   help="track from each seed in one direction only (the seed is the first vertex)")
    t.add_argument("--seed-cutoff", type=float, metavar="VALUE",
                   help="FOD amplitude cutoff at the seed (tckgen -seed_cutoff); recorded in the header, without "
                        "effect on SD_Stream (tckgen uses it for iFOD only)")
    t.add_argument("--max-attempts-per-seed", type=int, metavar="N",
                   help="start directions tried per seed (tckgen -max_attempts_per_seed); recorded in the header, "
                        "without effect on SD_Stream (deterministic: one attempt)")
    t.add_argument("--backtrack", action="store_true",
                   help="ACT backtracking (tckgen -backtrack): not valid for SD_Stream, a deterministic algorithm")
    t.add_argument("--exact-sh", action="store_true", help="exact SH evaluation in peak search instead of tckgen's lookup table")
    t.add_argument("--sh-basis", default="mrtrix", choices=["mrtrix", "tournier07", "tournier07_legacy", "descoteaux07",
                                                            "descoteaux07_legacy"],
                   help="SH basis of the FOD file (default mrtrix == DIPY tournier07; DIPY's default is "
                        "descoteaux07 legacy): converted to the MRtrix3 basis on loading (see docs/sh_bases.md)")
    t.add_argument("--outside", choices=["fail", "skip"], default="fail",
                   help="--seed-points outside the FOD image: stop with an error (default) or skip them with a "
                        "count on stderr (they count as rejected seeds in total_count)")
    t.add_argument("--output-seeds", help="write seeds as tckgen -output_seeds CSV")
    t.add_argument("--rng-seed", type=int, default=0, help="seed of the random generator (default 0)")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    t.add_argument("--state-dtype", choices=["float32", "float64"], help=STATE_HELP)
    t.add_argument("--threads", type=int, help="CPU threads (default: all; the native kernel's threads, else "
                                                "torch.set_num_threads)")
    t.add_argument("--workers", type=int, default=1,
                   help="CPU processes tracking in parallel (seeds split across them; same output)")
    t.add_argument("--chunk", type=int, default=20000, help="seeds tracked per batch; bounds memory (default 20000)")
    t.add_argument("--compile", action="store_true",
                   help="fuse the Newton move with torch.compile (compiles for tens of seconds first; float32 "
                        "output then differs from tckgen's arithmetic in the last bits; measured slower than "
                        "eager on the CPU: see docs/benchmarks.md)")
    t.add_argument("--engine", default="auto", choices=["auto", "native", "follow", "eager"],
                   help=ENGINE_HELP)
    t.add_argument("--quiet", action="store_true", help="no progress or summary")
    cli_args.add_force(t)
    dg = t.add_argument_group("DIPY-style deterministic tracking (--algorithm closest_peak | det_max; "
                              "docs/dipy_getters.md)")
    dg.add_argument("--algorithm", default="sd_stream",
                    choices=["sd_stream", "closest_peak", "det_max", "prob", "ifod1"],
                    help="sd_stream (default): tckgen SD_Stream; closest_peak / det_max: DIPY's ClosestPeak / "
                         "DeterministicMaximum getters with LocalTracking (fixed step; --step default 0.2 mm, "
                         "--angle default 20, as dipy.tracking.tracker); prob / ifod1: DIPY's Probabilistic getter / "
                         "an iFOD1-like sampler (--cutoff, default 0.1; --angle 15 and a 2000-vertex Fibonacci "
                         "sphere unless given) with the same loop, random draws from --rng-seed "
                         "(docs/probabilistic.md)")
    dg.add_argument("--fa-map", help="scalar map (FA, GFA): stop where its trilinear value <= --stop-threshold "
                                     "(DIPY ThresholdStoppingCriterion); else --mask stops (BinaryStoppingCriterion)")
    dg.add_argument("--stop-threshold", type=float, default=0.2, help="threshold on --fa-map (default 0.2)")
    dg.add_argument("--sphere", default="default", help="DIPY sphere name (default: dipy.data.default_sphere)")
    dg.add_argument("--pmf-threshold", type=float, default=0.1, help="DIPY pmf_threshold (default 0.1)")
    dg.add_argument("--relative-peak-threshold", type=float, default=0.5, help="peak_directions (default 0.5)")
    dg.add_argument("--min-separation-angle", type=float, default=25.0, help="peak_directions, degrees (default 25)")
    dg.add_argument("--max-cross", type=int, help="at most this many peaks tracked per seed (default all)")
    dg.add_argument("--maxlen", type=int, default=500, help="points per half streamline (DIPY maxlen, default 500)")
    dg.add_argument("--valid-only", action="store_true",
                    help="DIPY return_all=False: keep streamlines whose ends both reach ENDPOINT/OUTSIDEIMAGE")
    dg.add_argument("--sh-frame", choices=["scanner", "voxel"],
                    help="frame of the FOD's directions: voxel (default, as the API and DIPY read SH: the array "
                         "axes) or scanner (MRtrix3 FODs on a mirrored or oblique grid)")
    t.set_defaults(func=cmd_track)
    d = sub.add_parser("demo", help="generate the built-in phantom, track it, write .tck + PNG",
                       epilog=EXAMPLES_DEMO, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", default="tractfunc_demo", help="output folder (default ./tractfunc_demo)")
    d.add_argument("--seeds", type=int, default=2000)
    d.add_argument("--rng-seed", type=int, default=0)
    cli_args.add_force(d)
    d.set_defaults(func=cmd_demo)
    q = sub.add_parser("parity", help="run tckgen SD_Stream and re-track its streamlines; report agreement",
                       epilog=EXAMPLES_PARITY, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("fod")
    q.add_argument("--seed-image", required=True)
    q.add_argument("--mask")
    q.add_argument("--select", type=int, default=2000)
    q.add_argument("--rk4", action="store_true")
    q.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    q.add_argument("--state-dtype", choices=["float32", "float64"], help=STATE_HELP)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--engine", default="auto", choices=["auto", "native", "follow", "eager"],
                   help=ENGINE_HELP)
    q.set_defaults(func=cmd_parity)
    b = sub.add_parser("bench", help="time tractfunc against tckgen (and DIPY) on the same data and cores",
                       epilog=EXAMPLES_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("fod")
    b.add_argument("--seed-image", required=True)
    b.add_argument("--mask")
    b.add_argument("--select", type=int, default=10000)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--device", default="cpu")
    b.add_argument("--compile", action="store_true", help="tractfunc with --compile (wall time includes compiling)")
    b.add_argument("--rk4", action="store_true")
    b.add_argument("--dipy", action="store_true", help="also time DIPY deterministic tracking (seeds = select)")
    b.add_argument("--repeats", type=int, default=1, help="runs per tool; the best is reported")
    b.add_argument("--workers", type=int, default=1,
                   help="tractfunc processes sharing the --threads cores (e.g. 2 workers x 1 thread)")
    b.add_argument("--engine", default="auto", choices=["auto", "native", "follow", "eager"],
                   help="tractfunc's engine (as for track; default auto: the native kernel for float32 on the CPU)")
    b.add_argument("--json", help="write all results to this JSON file")
    cli_args.add_force(b)
    b.add_argument("--grad", action="store_true",
                   help="instead: differentiable routes vs the native forward in one run (tractfunc.tools.gradbench; "
                        "options --data --n --steps --threads --dtype --routes --repeats --rk4 --quick --json; see docs/benchmarks.md)")
    b.set_defaults(func=cmd_bench)
    w = sub.add_parser("5tt2gmwmi", help="GM-WM interface map of a 5TT image, for seeding (MRtrix3 5tt2gmwmi)",
                       epilog=EXAMPLES_5TT2GMWMI, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("input", help="five-tissue-type image (cGM, sGM, WM, CSF, pathological), NIfTI or .mif")
    w.add_argument("output", help="output interface map (.nii or .nii.gz)")
    w.add_argument("--mask", help="only compute the interface in the non-zero voxels of this image")
    w.add_argument("--quiet", action="store_true", help="no summary line")
    cli_args.add_force(w)
    w.set_defaults(func=cmd_5tt2gmwmi)
    n = sub.add_parser("info", help="tractogram summary like tckinfo: count, lengths, header (.tck/.trk/.trx)",
                       epilog=EXAMPLES_INFO, formatter_class=argparse.RawDescriptionHelpFormatter)
    n.add_argument("files", nargs="+", help="tractograms (.tck, .trk or .trx)")
    n.add_argument("--json", help="write the summary as JSON to this file ('-': stdout) instead of the text")
    cli_args.add_force(n)
    n.set_defaults(func=cmd_info)
    c = sub.add_parser("convert", help="convert between .tck, .trk and .trx (coordinates kept in scanner mm)",
                       epilog=EXAMPLES_CONVERT, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("input", help="input tractogram (.tck, .trk or .trx)")
    c.add_argument("output", help="output tractogram (.tck, .trk or .trx)")
    c.add_argument("--reference", help="reference image (NIfTI or .mif, or a .trk/.trx) giving the voxel grid "
                                       "that .trk/.trx output records; needed when the input is a .tck")
    c.add_argument("--quiet", action="store_true", help="no summary line")
    cli_args.add_force(c)
    c.set_defaults(func=cmd_convert)
    f = sub.add_parser("fod", help="FODs from a single-shell DWI (DIPY CSD) in the MRtrix3 basis, for tracking "
                                   "without MRtrix3",
                       epilog=EXAMPLES_FOD, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("dwi", help="diffusion-weighted image (4-D NIfTI)")
    f.add_argument("bval", help="FSL bvals file")
    f.add_argument("bvec", help="FSL bvecs file (image axes, as dcm2niix writes them)")
    f.add_argument("output", help="output FOD image (.nii or .nii.gz): SH coefficients, MRtrix3 basis, float32")
    f.add_argument("--mask", help="voxels to fit (default: a DIPY median_otsu brain mask from the b=0 volumes)")
    f.add_argument("--lmax", type=int, default=8, help="maximum SH order (even; default 8)")
    f.add_argument("--response", default="auto",
                   help="'auto' (default: single-fibre voxels with FA > --fa-thr near the volume centre) or an "
                        "MRtrix3 single-shell response file (dwi2response output: one row of zonal coefficients)")
    f.add_argument("--fa-thr", type=float, default=0.7, help="FA threshold of the automatic response (default 0.7)")
    f.add_argument("--roi-radii", type=int, default=10,
                   help="radius in voxels of the central region the automatic response is taken from (default 10)")
    f.add_argument("--tau", type=float, default=0.0,
                   help="CSD non-negativity threshold, fraction of the mean FOD amplitude (default 0, as MRtrix3 "
                        "dwi2fod; DIPY's default is 0.1)")
    f.add_argument("--jobs", type=int, default=1, help="processes fitting voxels in parallel (default 1)")
    cli_args.add_force(f)
    f.set_defaults(func=cmd_fod)
    r = sub.add_parser("render", help="PNG of a tractogram: direction-coloured streamlines on three orthogonal views",
                       epilog=EXAMPLES_RENDER, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("tractogram", help="input tractogram (.tck, .trk or .trx)")
    r.add_argument("output", help="output figure (.png)")
    r.add_argument("--background", help="image drawn underneath (NIfTI or .mif; a 4-D image gives its first volume, "
                                        "e.g. the b=0 of a DWI or the l=0 term of an FOD)")
    r.add_argument("--max-streamlines", type=int, help="draw a random subset of at most this many streamlines")
    r.add_argument("--slab", type=float, default=10.0,
                   help="show only a slab this thick (mm) around the centre of each view (default 10; 0: "
                        "everything, projected)")
    r.add_argument("--rng-seed", type=int, default=0, help="seed of the --max-streamlines subset (default 0)")
    cli_args.add_force(r)
    r.set_defaults(func=cmd_render)
    from . import maps as map_cli
    map_cli.add_parsers(sub, cli_args.add_force)
    return p


def main(argv: Optional[list] = None) -> int:
    """Parse, check every option and output before any work, run; errors are one line on stderr (exit 2),
    an interrupt exits 130; no traceback (TRACTFUNC_DEBUG=1 shows the one of an unexpected error)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["bench"] and "--grad" in args:   # differentiable speed: tractfunc.tools.gradbench's own options
        from ..tools import gradbench
        a = gradbench.parser().parse_args([x for x in args[1:] if x != "--grad"])
        a.cmd, a.func = "bench", _bench_grad
    else:
        a = build_parser().parse_args(argv)
        a.argv = list(args)
    try:
        if a.func is not _bench_grad:
            cli_args.check_ranges(a)
            if getattr(a, "threads", None) == 0:
                a.threads = 1   # tckgen -nthreads 0: no extra threads, the work runs on the main thread
            outputs.check(a)
        return a.func(a)
    except KeyboardInterrupt:
        sys.stderr.write(f"tractfunc {a.cmd}: interrupted; no output written\n")
        return 130
    except (TractfuncError, ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"tractfunc {a.cmd}: error: {_one_line(e)}\n")
        return 2
    except MemoryError as e:
        sys.stderr.write(f"tractfunc {a.cmd}: error: out of memory ({_one_line(e) or 'allocation failed'})\n")
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        sys.stderr.write(f"tractfunc {a.cmd}: error: {where}{e.strerror or _one_line(e)}\n")
        return 2
    except Exception as e:   # a bug: still one line, the traceback on request
        if os.environ.get("TRACTFUNC_DEBUG"):
            raise
        sys.stderr.write(f"tractfunc {a.cmd}: internal error: {type(e).__name__}: {_one_line(e)} "
                         "(TRACTFUNC_DEBUG=1 shows the traceback; please report it)\n")
        return 1


def _bench_grad(a) -> int:
    """``tractfunc bench --grad``: its ``--json`` checked as every output is (an existing file only with ``--force``)
    before the run; the file is written whole or not at all."""
    from ..tools import gradbench
    if a.json_path:
        outputs.check_output(a.json_path, "--json", a.force)
    return gradbench.run_cli(a)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
