"""Prototype of issue 15's "compile-first" design, measured next to the native forward and the fused engine.

For the record, not an engine: it answers "how fast would a fixed-shape, compiled PyTorch step be on the CPU?"
with numbers from one run on the same data, seeds and threads as the alternatives.

The design:

* a fixed-shape chunk of ``--chunk`` SD_Stream Euler steps (exact SH): sample the FOD (trilinear, MRtrix3's rules),
  ``--line`` of MRtrix3's uphill line moves and ``--newton`` full Newton iterations on the sphere from the previous
  direction (no convergence test, no data-dependent control flow; full Newton alone from the previous direction
  reached saddles and stopped streamlines on the cutoff in a first try), the implicit-function derivative of the peak (``core.implicit.attach_peak``), the
  cutoff, angle and mask rules and the vertex budget as ``torch.where`` on an ``alive`` mask;
* ``torch.compile(fullgraph=True)``: inductor's C++ code on the CPU, with static shapes (``--static``) or a
  dynamic batch dimension (the default: one compilation per mode, since on this 2-core machine one static shape
  of an 8-step chunk did not finish compiling in 6 minutes);
* between chunks, compaction: the rows still alive are gathered into a batch padded to a power of two (at least
  ``--min-bucket``), so each bucket size compiles once with static shapes;
* the seed peak (from a random start direction) is the library's full search (``sdstream.step.seed_peaks``, exact
  peaks), outside the compiled chunks; the backward half starts with the forward half's vertex count (tckgen's
  shared budget), as in ``track_fixed``.

Measured (float32, ``--threads`` threads, the Philips FOD, ``--n`` seeds from the FA > 0.3 mask with random start
directions, the brain mask, tckgen's defaults): the native forward (reference), the fused engine (``tf.track`` with
gradients: tckgen's settings, and exact peaks), and the prototype's forward without a graph, with a graph, and
forward + backward of ``sum(<vertex, u>)`` wrt the FOD and the seeds; compile time separately.  Agreement: the
prototype's streamlines against ``track_fixed`` (exact peaks, ``n_steps = max_points``) on the first ``--check``
seeds: same vertex counts and stop reasons, and the largest vertex distance where they agree.

Run: ``python benchmarks/compile_first.py --json benchmarks/results/compile_first_N1000_2threads.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time

import numpy as np
import torch

import tractfunc as tf
from tractfunc.core import integrate, stop
from tractfunc.core.implicit import attach_peak
from tractfunc.core.interpolate import sample_fod
from tractfunc.core.newton import newton_move, polish
from tractfunc.core.stop import CONTINUE, Reason
from tractfunc.sdstream.step import seed_peaks
from tractfunc.tools import gradbench

U = (0.48, -0.6, 0.64)   # the loss direction of tractfunc bench --grad


def fixed_peak(c: torch.Tensor, u: torch.Tensor, n_line: int, n_full: int):
    """The peak from the previous direction in a fixed number of iterations: ``n_line`` of MRtrix3's uphill line
    moves (``core.newton.newton_move``, exact SH, the move clamped), then ``n_full`` full Newton iterations on the
    sphere (``core.newton.polish``).  c: (B, N) coefficients; u: (B, 3) unit -> Peak (B, 3), (B,)."""
    for _ in range(n_line):
        u = newton_move(c, u)[0]
    return polish(c, u, n_full)


def make_chunk(params, n_line: int, n_full: int, n_steps: int):
    """The fixed-shape chunk: (sh (X,Y,Z,N), nonzero (X,Y,Z), w2v (4,4), mask (X,Y,Z), mask_w2v (4,4), pos (B,3),
    dir (B,3), alive (B,), n (B,), reason (B,)) -> (vertices (B, n_steps, 3), added (B, n_steps), pos, dir, alive,
    n, reason) after ``n_steps`` steps."""
    def chunk(sh, nonzero, w2v, mask, mask_w2v, pos, dir, alive, n, reason):
        verts, adds = [], []
        for _ in range(n_steps):
            s = sample_fod(sh, nonzero, w2v, pos)
            with torch.no_grad():
                p = fixed_peak(s.values.detach(), dir.detach(), n_line, n_full)   # fixed iterations, previous dir
            p = attach_peak(s.values, p.dir, p.amp)                       # the implicit-function derivative
            amp = torch.where(s.inside, p.amp, torch.full_like(p.amp, float("nan")))
            m = integrate.sd_move(params, pos, dir, p.dir, amp, s.inside)
            out = (m.reason == CONTINUE) & stop.outside_mask(mask, mask_w2v, m.pos)
            r = torch.where(out, torch.full_like(m.reason, int(Reason.EXIT_MASK)), m.reason)
            moved = alive & (r == CONTINUE)
            n = n + moved.long()
            full = moved & (n >= params.max_points)
            reason = torch.where(alive & ~moved, r, reason)
            reason = torch.where(full, torch.full_like(reason, int(Reason.MAX_LENGTH)), reason)
            alive = moved & ~full
            pos = torch.where(moved.unsqueeze(-1), m.pos, pos)
            dir = torch.where(moved.unsqueeze(-1), m.dir, dir)
            verts.append(pos)
            adds.append(moved)
        return torch.stack(verts, 1), torch.stack(adds, 1), pos, dir, alive, n, reason
    return chunk


def bucket(m: int, smallest: int) -> int:
    return max(smallest, 1 << max(0, math.ceil(math.log2(max(m, 1)))))


def run_half(chunk, field, mask, pos, dir, alive, n, smallest: int):
    """Track every alive row to its end, compacting between chunks -> (records [(rows, vertices, added)], pos, dir,
    n, reason); differentiable wrt pos, dir and the FOD."""
    reason = torch.zeros_like(n)
    records = []
    while bool(alive.any()):
        rows = alive.nonzero().squeeze(1)
        m = rows.numel()
        b = bucket(m, smallest)
        idx = torch.cat([rows, rows[:1].expand(b - m)])                 # padding rows: copies, never alive
        live = torch.arange(b) < m
        v, a, p, d, al, nn, r = chunk(field.sh, field.nonzero, field.world_to_voxel, mask.mask, mask.world_to_voxel,
                                      pos[idx], dir[idx], live, n[idx], reason[idx])
        records.append((rows, v[:m], a[:m]))
        pos, dir = pos.index_copy(0, rows, p[:m]), dir.index_copy(0, rows, d[:m])
        alive = alive.index_copy(0, rows, al[:m])
        n, reason = n.index_copy(0, rows, nn[:m]), reason.index_copy(0, rows, r[:m])
    return records, pos, dir, n, reason


def track_compiled(chunk, field, params, mask, seeds, init_dirs, smallest: int):
    """Both halves of every seed -> (forward records, backward records, accepted (S,): seed ok and tckgen's minimum
    length, reasons (S, 2), vertices (S,) of each streamline)."""
    sd = seed_peaks(field, params, mask, seeds, init_dirs, polish=params.peak_polish)
    one = torch.ones(seeds.shape[0], dtype=torch.long)
    fwd, _, _, nf, rf = run_half(chunk, field, mask, seeds, sd.dir, sd.ok, one, smallest)
    bwd, _, _, nb, rb = run_half(chunk, field, mask, seeds, -sd.dir, sd.ok, nf, smallest)
    return fwd, bwd, sd.ok & (nb >= max(params.min_points, 2)), torch.stack([rf, rb], 1), nb


def loss_of(records, u) -> torch.Tensor:
    return sum(((v @ u) * a).sum() for _, v, a in records)


def halves(records, S: int):
    """Per seed, the list of vertices (k, 3) of one half, in order (for the agreement check)."""
    out = [[] for _ in range(S)]
    for rows, v, a in records:
        for i, r in enumerate(rows.tolist()):
            out[r].append(v[i][a[i]].detach())
    return [torch.cat(x) if x else torch.zeros(0, 3) for x in out]


def agreement(chunk, field, params, mask, seeds, dirs, smallest: int):
    """The prototype against track_fixed (exact peaks, n_steps = max_points) on the same seeds."""
    fwd, bwd, ok, reasons, _ = track_compiled(chunk, field, params, mask, seeds, dirs, smallest)
    S = seeds.shape[0]
    hf, hb = halves(fwd, S), halves(bwd, S)
    ref = tf.track_fixed(field, params, seeds, dirs, params.max_points, mask)
    same, worst, first_diff, dists = 0, 0.0, [], []
    n_ok = int(ref.valid.any(1).sum())
    for i in range(S):
        if not bool(ref.valid[i].any()):
            continue
        k = int(ref.valid[i].sum())
        nf = int(ref.seed_index[i])
        mine = torch.cat([hf[i].flip(0), seeds[i:i + 1], hb[i]])
        match = (mine.shape[0] == k and int(reasons[i, 0]) == int(ref.reason_fwd[i])
                 and int(reasons[i, 1]) == int(ref.reason_bwd[i]))
        if match:
            same += 1
            dists.append(float((mine - ref.vertices[i, :k]).norm(dim=-1).max()))
            worst = max(worst, dists[-1])
        else:
            first_diff.append(dict(seed=i, vertices=[int(mine.shape[0]), k], forward=[hf[i].shape[0], nf]))
    return dict(seeds=S, tracked_by_reference=n_ok, same_decisions=same, max_vertex_distance_mm=worst,
                median_of_max_vertex_distance_mm=float(np.median(dists)) if dists else None, differing=first_diff[:10])


def timed(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=gradbench.DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--line", type=int, default=4, help="MRtrix3 line moves per step, from the previous direction")
    ap.add_argument("--newton", type=int, default=2, help="full Newton iterations per step after the line moves")
    ap.add_argument("--chunk", type=int, default=2, help="steps per compiled chunk")
    ap.add_argument("--static", action="store_true", help="static shapes: one compilation per bucket size")
    ap.add_argument("--min-bucket", type=int, default=128, help="smallest compacted batch (a power of two)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check", type=int, default=100, help="seeds compared with track_fixed")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    sh_np, affine, vs, mask_np, seeds64, dirs64, desc = gradbench.load_inputs(a.data, a.n)
    mask = tf.make_mask(torch.as_tensor(mask_np), affine, vs)
    seeds, dirs = seeds64.float(), torch.nn.functional.normalize(dirs64.float(), dim=-1)
    u = torch.tensor(U)
    f_lut = tf.make_field(torch.as_tensor(sh_np), affine, voxel_sizes=vs)
    f_exact = tf.make_field(torch.as_tensor(sh_np), affine, precomputed=False, voxel_sizes=vs)
    p_lut, p_exact = tf.resolve(vs), tf.resolve(vs, exact=True)
    rows = []

    def add(name, mode, secs, verts, **extra):
        rows.append(dict(route=name, mode=mode, seconds=secs, vertices=int(verts), vertices_per_s=verts / secs,
                         **extra))
        print(f"{name:28s} {mode:9s} {secs:8.3f} s {int(verts):8d} vertices {verts / secs:11.0f} /s", flush=True)

    secs, tr = timed(lambda: tf.track(f_lut, p_lut, seeds, dirs, mask=mask, engine="native"), a.repeats)
    add("native", "forward", secs, tr.vertices.shape[0])

    def fused(field, params, backward):
        leaf, s = field.sh.detach().clone().requires_grad_(True), seeds.clone().requires_grad_(True)
        t = tf.track(field._replace(sh=leaf), params, s, dirs, mask=mask)
        if backward:
            (t.vertices @ u).sum().backward()
        return t
    for name, field, params in (("fused, tckgen's settings", f_lut, p_lut), ("fused, exact peaks", f_exact, p_exact)):
        for mode, bw in (("forward", False), ("fwd+bwd", True)):
            secs, t = timed(lambda: fused(field, params, bw), a.repeats)
            add(name, mode, secs, t.vertices.shape[0])

    chunk = torch.compile(make_chunk(p_exact, a.line, a.newton, a.chunk), fullgraph=True, dynamic=not a.static)
    field = f_exact
    leaf = field.sh.detach().clone().requires_grad_(True)

    def proto(mode):
        if mode == "forward":
            with torch.no_grad():
                return track_compiled(chunk, field, p_exact, mask, seeds, dirs, a.min_bucket)
        s = seeds.clone().requires_grad_(True)
        out = track_compiled(chunk, field._replace(sh=leaf), p_exact, mask, s, dirs, a.min_bucket)
        if mode == "fwd+bwd":
            loss = loss_of(out[0], u) + loss_of(out[1], u)
            leaf.grad = None
            loss.backward()
        return out
    compile_s = {}
    for mode in ("forward", "graph", "fwd+bwd"):
        t0 = time.perf_counter()
        out = proto(mode)                                             # compiles every bucket it meets
        compile_s[mode] = time.perf_counter() - t0
        secs, out = timed(lambda: proto(mode), a.repeats)
        add("compile-first", mode, secs, int(out[4][out[2]].sum()), first_call_s=compile_s[mode])
    ref = rows[0]["vertices_per_s"]
    for r in rows:
        r["ratio_to_native"] = r["vertices_per_s"] / ref
    with torch.no_grad():
        agree = agreement(chunk, field, p_exact, mask, seeds[:a.check], dirs[:a.check], a.min_bucket)
    print("agreement with track_fixed:", json.dumps(agree))
    res = dict(setup=dict(data=desc, n_seeds=a.n, threads=a.threads, dtype="float32", line_moves=a.line, newton_iterations=a.newton,
                          chunk_steps=a.chunk, min_bucket=a.min_bucket, repeats=a.repeats,
                          shapes="static" if a.static else "dynamic batch",
                          loss="sum(<vertex, u>), u = (0.48, -0.6, 0.64)", gradients_wrt=["field.sh", "seeds"],
                          settings={"native": "resolve(vox)", "fused, tckgen's settings": "resolve(vox)",
                                    "fused, exact peaks": "resolve(vox, exact=True)",
                                    "compile-first": "resolve(vox, exact=True); fixed Newton from the previous dir"}),
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                            load_before=load0, load_after=os.getloadavg()),
               rows=rows, agreement_with_track_fixed=agree)
    for r in rows:
        print(f"| {r['route']} | {r['mode']} | {r['seconds']:.3f} | {r['vertices']} | {r['vertices_per_s']:.0f} | "
              f"{r['ratio_to_native']:.4f} |")
    if a.json_path:
        pathlib.Path(a.json_path).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
