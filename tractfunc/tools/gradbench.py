"""Differentiable tracking speed against the native forward kernel, in one run (``tractfunc bench --grad``).

Every differentiable route of :func:`tractfunc.track` is timed on the same seeds, start directions, mask and
threads as the native forward kernel, and reported as valid vertices per second and as the ratio to the
native forward measured in the same run (issue 15's measurement):

* ``native``: the C kernel, forward only (the reference, ratio 1);
* ``fixed``: ``engine="fixed"`` with ``Checkpoint(k)`` and ``n_steps`` steps per half, exact SH and peaks
  (``resolve(exact=True)``), hard stopping; ``fixed_soft``: the same with ``Soft(T)``;
* ``eager``: ``engine="eager"`` (own decisions, active set), exact SH and peaks;
* ``follow``: ``engine="follow"`` (the native kernel's decisions, values in the dtype), tckgen's lookup-table
  peaks, the fused engine: float32 keeps the kernel's vertices, float64 replays tckgen's peak search in double in
  C; the C reverse sweep in both;
* ``follow_exact``: ``engine="follow"`` with exact peaks (``resolve(exact=True)``): the fused engine in both
  dtypes (the kernel decides, C replays every peak exactly in double, C reverse sweep);
* ``follow_soft`` / ``follow_exact_soft``: the same two with ``Soft(T)`` and ``n_steps`` steps per half (the fused
  engine's soft stopping: survival weights from the kernel's recorded margins, their adjoint in the sweep);
* ``seed_jacobian``: :func:`tractfunc.seed_jacobian` (forward-mode, B x (2T+1) x 3 x 3) on the fixed setting;
* ``jacobian_packed``: :func:`tractfunc.seed_jacobian_packed` (the fused engine's streamlines, exact peaks, one
  3 x 3 per vertex, in C);
* ``jax_follow`` / ``jax_follow_exact`` (not run by default; they need jax): :func:`tractfunc.interop.jax.track`,
  the same call as ``follow`` / ``follow_exact`` from JAX with per-seed padded outputs (S, max_points + 1, 3):
  a forward without gradient (the primal runs the native kernel with tckgen's settings, the fused engine with
  exact peaks), ``jax.value_and_grad`` wrt the FOD and the seeds eagerly, and the same under ``jax.jit``
  (compiled once before timing).

Each route runs forward with a graph (gradients wanted wrt the FOD and the seeds) and forward + backward of the
loss ``sum(w_v * <x_v, u>)`` (a weighted projection of the vertices: ``u`` a fixed unit vector, ``w`` the survival
weights under soft stopping, else 1), in every requested dtype. Reported per row: best-of-``repeats`` wall
seconds, valid vertices, vertices/s, ratio to the native forward, the peak resident memory added during the
run (polled from ``/proc/self/statm``), autograd's saved bytes per valid vertex (tensors saved by autograd
outside checkpointed regions, counted once per storage; checkpointed chunks and the compact FOD sampler's
context are not included) and, for the fused engine, which saves outside autograd, what its tape holds per vertex
(:func:`tractfunc.sdstream.fused.saved_bytes`: in all, and beyond the returned vertices and weights).
"""
from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import torch

ROUTES = ("fixed", "fixed_soft", "eager", "follow", "follow_exact", "follow_soft", "follow_exact_soft",
          "seed_jacobian", "jacobian_packed")
SOFT_PAIRS = {"fixed_soft": "fixed", "follow_soft": "follow", "follow_exact_soft": "follow_exact"}
JAX_ROUTES = ("jax_follow", "jax_follow_exact")
DEFAULT_DATA = "/work/shared/data/dmri_invivo_philips_achieva_dti32"


class _PeakRSS:
    """Peak resident set size (bytes) above the level at entry, polled every few milliseconds."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:   # not Linux: no memory figure
            return 0

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added(self) -> int:
        return self.peak - self.start


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward, each storage counted once."""

    def __init__(self):
        self.seen = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            self.seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @property
    def total(self) -> int:
        return int(sum(self.seen.values()))


def load_inputs(data: Optional[str], n: int, seed: int = 0):
    """(sh (X,Y,Z,N) float32 C-ordered numpy, affine, voxel sizes, mask (X,Y,Z) or None, seeds (n,3) float64,
    dirs (n,3) float64, description). data None: the package's phantom."""
    from ..core import seeds as S
    g = torch.Generator().manual_seed(seed)
    if data is None:
        from .phantom import make_phantom
        ph = make_phantom()
        vs = tuple(float(v) for v in np.linalg.norm(ph.affine[:3, :3], axis=0))
        sd = S.random_in_mask(torch.as_tensor(ph.seed_mask), ph.affine, n, g)
        dirs = S.random_directions(n, g, torch.float64)
        return ph.fod, ph.affine, vs, ph.mask, sd, dirs, "phantom (tractfunc.tools.phantom.make_phantom)"
    from .. import io
    img = io.load_fod(os.path.join(data, "dwi_fod_lmax8.nii.gz"))
    wm = io.load_mask(os.path.join(data, "dwi_wmmask_FA0.3.nii.gz"))
    bm = io.load_mask(os.path.join(data, "dwi_brainmask.nii.gz"))
    sd = S.random_in_mask(torch.as_tensor(wm.data), wm.affine, n, g)
    dirs = S.random_directions(n, g, torch.float64)
    return (np.ascontiguousarray(img.data, dtype=np.float32), img.affine, tuple(img.voxel_sizes), bm.data, sd,
            dirs, os.path.basename(os.path.normpath(data)))


def _loss(tr, u):
    proj = tr.vertices @ u
    return (proj * tr.weights).sum() if tr.weights is not None else proj.sum()


def _best(fn, repeats: int):
    """Run fn() ``repeats`` times -> (best seconds, last result, peak RSS added (bytes, max over runs))."""
    best, out, mem = math.inf, None, 0
    for _ in range(repeats):
        with _PeakRSS() as m:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
        best, mem = min(best, dt), max(mem, m.added)
        del m
    return best, out, mem


def _jax_rows(route, add, sh_np, affine, vs, mask, params, seeds, dirs, u, repeats) -> None:
    """Time :func:`tractfunc.interop.jax.track` (forward; fwd+bwd eager and under jit) and ``add`` its rows."""
    import jax
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", sh_np.dtype == np.float64)
    try:
        import jax.numpy as jnp
        from ..interop import jax as tfj
        sh, s, d, uj = (jnp.asarray(np.asarray(x)) for x in (sh_np, seeds, dirs, u))

        def tracked(sh, s):
            return tfj.track(sh, params, s, d, affine=affine, mask=mask, voxel_sizes=vs)

        def loss(sh, s):
            r = tracked(sh, s)
            return jnp.sum(jnp.where(r.valid, r.vertices @ uj, 0.0))
        grad = jax.value_and_grad(loss, argnums=(0, 1))
        jitted = jax.jit(grad)
        jax.block_until_ready(jitted(sh, s))   # compile (untimed)
        secs, r, mem = _best(lambda: jax.block_until_ready(tracked(sh, s)), repeats)
        verts = int(r.valid.sum())
        add(route, str(sh_np.dtype), "forward", secs, verts, mem)
        for mode, fn in (("fwd+bwd", grad), ("fwd+bwd jit", jitted)):
            secs, (_, g), mem = _best(lambda: jax.block_until_ready(fn(sh, s)), repeats)
            add(route, str(sh_np.dtype), mode, secs, verts, mem,
                extra={"grad_finite": bool(all(jnp.isfinite(x).all() for x in g))})
    finally:
        jax.config.update("jax_enable_x64", x64)


def run(data: Optional[str] = DEFAULT_DATA, n: int = 1000, steps: int = 200, threads: int = 2,
        dtypes=("float32", "float64"), checkpoint: int = 10, temperature: float = 0.01, repeats: int = 3,
        routes=ROUTES, seed: int = 0, max_length: Optional[float] = None, min_length: Optional[float] = None,
        log=print, rk4: bool = False) -> Dict:
    """Measure every route (see the module docstring) -> a JSON-ready dict with ``rows`` and ``setup``.

    data: directory with the Philips files (``dwi_fod_lmax8.nii.gz``, ``dwi_wmmask_FA0.3.nii.gz`` seeds,
    ``dwi_brainmask.nii.gz`` mask) or None for the phantom; n: seeds; steps: ``n_steps`` per half of the fixed
    engine (and of the Jacobian); threads: ``torch.set_num_threads`` (the native kernel uses the same count);
    max_length, min_length: mm, tckgen's -maxlength / -minlength for every route (None: its defaults; the
    quick run caps the length so that the eager and follow routes stay short)."""
    from ..core.field import make_field, make_mask
    from ..core.params import resolve
    from ..sdstream import fused, jacobian
    from ..sdstream.engine import Checkpoint, Soft
    from ..sdstream.fixed import track_fixed
    from ..sdstream.track import track
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sh_np, affine, vs, mask_np, seeds64, dirs64, desc = load_inputs(data, n, seed)
        u64 = torch.tensor([0.48, -0.6, 0.64], dtype=torch.float64)
        mask = make_mask(torch.as_tensor(mask_np), affine, vs) if mask_np is not None else None
        rows: List[Dict] = []

        def add(route, dtype, mode, secs, verts, mem=0, saved=None, extra=None):
            row = {"route": route, "dtype": dtype, "mode": mode, "seconds": secs, "vertices": int(verts),
                   "vertices_per_s": verts / secs if secs > 0 else float("nan"),
                   "peak_rss_added_mb": mem / 2 ** 20,
                   "saved_bytes_per_vertex": None if saved is None else saved / max(int(verts), 1)}
            row.update(extra or {})
            rows.append(row)
            log(f"  {route:14s} {dtype:8s} {mode:9s} {secs:8.3f} s {int(verts):9d} vertices "
                f"{row['vertices_per_s']:12.0f} /s")
            return row

        # the reference: native forward, float32, tckgen's settings
        f32 = make_field(torch.as_tensor(sh_np), affine, precomputed=True, voxel_sizes=vs)
        p_lut = resolve(vs, max_length=max_length, min_length=min_length, rk4=rk4)
        s32, d32 = seeds64.float(), dirs64.float()
        secs, tr, mem = _best(lambda: track(f32, p_lut, s32, d32, mask=mask, engine="native"), repeats)
        ref = add("native", "float32", "forward", secs, tr.vertices.shape[0], mem)
        ref_vps = ref["vertices_per_s"]

        for dname in dtypes:
            dt = getattr(torch, dname)
            base_exact = make_field(torch.as_tensor(sh_np).to(dt), affine, precomputed=False, voxel_sizes=vs)
            base_lut = make_field(torch.as_tensor(sh_np).to(dt), affine, precomputed=True, voxel_sizes=vs)
            p_exact = resolve(vs, exact=True, max_length=max_length, min_length=min_length, rk4=rk4)
            u = u64.to(dt)

            def inputs(lut):
                base = base_lut if lut else base_exact
                leaf = base.sh.detach().clone().requires_grad_(True)
                s = seeds64.to(dt).clone().requires_grad_(True)
                return base._replace(sh=leaf), s, dirs64.to(dt)

            def call(route, fld, s, d):
                if route == "fixed":
                    return track(fld, p_exact, s, d, mask=mask, engine="fixed", n_steps=steps,
                                    gradient=Checkpoint(checkpoint))
                if route == "fixed_soft":
                    return track(fld, p_exact, s, d, mask=mask, engine="fixed", n_steps=steps,
                                    gradient=Checkpoint(checkpoint), stopping=Soft(temperature))
                if route == "eager":
                    return track(fld, p_exact, s, d, mask=mask, engine="eager")
                if route == "follow_exact":
                    return track(fld, p_exact, s, d, mask=mask, engine="follow")
                if route in ("follow_soft", "follow_exact_soft"):
                    return track(fld, p_exact if route == "follow_exact_soft" else p_lut, s, d, mask=mask,
                                 engine="follow", n_steps=steps, stopping=Soft(temperature))
                return track(fld, p_lut, s, d, mask=mask, engine="follow")

            for route in routes:
                if route in JAX_ROUTES:
                    _jax_rows(route, add, sh_np.astype(dname), affine, vs, mask, p_exact if route.endswith("exact")
                              else p_lut, seeds64.to(dt), dirs64.to(dt), u, repeats)
                    continue
                if route == "jacobian_packed":
                    s, d = seeds64.to(dt), dirs64.to(dt)
                    secs, (tr, J), mem = _best(lambda: jacobian.seed_jacobian_packed(
                        base_exact, p_exact, s, d, mask=mask), repeats)
                    add(route, dname, "C fwd-mode", secs, tr.vertices.shape[0], mem,
                        extra={"finite": bool(torch.isfinite(J).all())})
                    continue
                if route == "seed_jacobian":
                    fld = base_exact
                    s, d = seeds64.to(dt), dirs64.to(dt)
                    d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)
                    valid = int(track_fixed(fld, p_exact, s, d, steps, mask).valid.sum())

                    def jac():
                        return jacobian.seed_jacobian(fld, p_exact, s, d, steps, mask)
                    secs, J, mem = _best(jac, repeats)
                    add(route, dname, "jvp x3", secs, valid, mem,
                        extra={"finite": bool(torch.isfinite(J).all())})
                    continue
                lut = route in ("follow", "follow_soft")

                def fwd():
                    fld, s, d = inputs(lut)
                    return call(route, fld, s, d)

                def fwd_bwd():
                    fld, s, d = inputs(lut)
                    tr = call(route, fld, s, d)
                    _loss(tr, u).backward()
                    return tr, fld.sh.grad, s.grad

                secs, tr, mem = _best(fwd, repeats)
                sb = _SavedBytes()   # one extra forward, untimed, for autograd's saved bytes
                with torch.autograd.graph.saved_tensors_hooks(sb.pack, lambda t: t):
                    fwd()
                held = fused.saved_bytes(tr.vertices, tr.weights)
                V = max(int(tr.vertices.shape[0]), 1)
                add(route, dname, "forward", secs, tr.vertices.shape[0], mem, sb.total,
                    extra=None if held is None else {"fused_saved_bytes_per_vertex": held[0] / V,
                                                     "fused_saved_bytes_per_vertex_beyond_outputs": held[1] / V})
                del tr
                secs, (tr, gsh, gs), mem = _best(fwd_bwd, repeats)
                add(route, dname, "fwd+bwd", secs, tr.vertices.shape[0], mem,
                    extra={"grad_finite": all(g is None or bool(torch.isfinite(g).all()) for g in (gsh, gs))})
                del tr, gsh, gs
        for r in rows:
            r["ratio_to_native"] = r["vertices_per_s"] / ref_vps
        soft = {}   # soft / hard throughput (vertices per second), route by route
        for r in rows:
            if r["route"] in SOFT_PAIRS:
                hard = [h for h in rows if h["route"] == SOFT_PAIRS[r["route"]] and h["dtype"] == r["dtype"]
                        and h["mode"] == r["mode"]]
                if hard:
                    soft[f"{r['route']} {r['dtype']} {r['mode']}"] = hard[0]["seconds"] / r["seconds"] * (
                        r["vertices"] / max(hard[0]["vertices"], 1))
        return {
            "setup": {"data": desc, "n_seeds": n, "n_steps": steps, "checkpoint": checkpoint,
                      "temperature": temperature, "threads": threads, "rk4": rk4, "max_length": max_length, "min_length": min_length, "repeats": repeats,
                      "dtypes": list(dtypes), "routes": list(routes),
                      "loss": "sum(w * <vertex, u>), u = (0.48, -0.6, 0.64), w = survival weights (soft) or 1",
                      "gradients_wrt": ["field.sh", "seeds"],
                      "settings": {"native": "resolve(vox): tckgen defaults, lookup-table peaks",
                                   "fixed/eager/seed_jacobian": "resolve(vox, exact=True): exact SH, polish 3",
                                   "follow": "resolve(vox): the kernel decides with lookup-table peaks"}},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch": torch.__version__},
            "native_vertices_per_s": ref_vps,
            "soft_over_hard_speed": soft,
            "rows": rows,
        }
    finally:
        torch.set_num_threads(prev_threads)


def format_table(res: Dict) -> str:
    """Markdown table of a :func:`run` result."""
    s = res["setup"]
    out = [f"{s['data']}: {s['n_seeds']} seeds, fixed n_steps={s['n_steps']}, checkpoint={s['checkpoint']}, "
           f"{s['threads']} thread(s), best of {s['repeats']}; gradients wrt FOD and seeds",
           "", "| route | dtype | mode | s | valid vertices | vertices/s | x native | peak RSS +MiB | saved B/vertex |"
           " fused tape B/vertex (beyond outputs) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        sb = "" if r["saved_bytes_per_vertex"] is None else f"{r['saved_bytes_per_vertex']:.0f}"
        ft = "" if r.get("fused_saved_bytes_per_vertex") is None else \
            f"{r['fused_saved_bytes_per_vertex']:.0f} ({r['fused_saved_bytes_per_vertex_beyond_outputs']:.0f})"
        out.append(f"| {r['route']} | {r['dtype']} | {r['mode']} | {r['seconds']:.3f} | {r['vertices']} | "
                   f"{r['vertices_per_s']:.0f} | {r['ratio_to_native']:.4f} | {r['peak_rss_added_mb']:.0f} | {sb} | "
                   f"{ft} |")
    if res.get("soft_over_hard_speed"):
        out.append("")
        out.append("soft / hard throughput (vertices/s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in res["soft_over_hard_speed"].items()))
    return "\n".join(out)


def parser():
    """The options of ``tractfunc bench --grad`` (and of ``python -m tractfunc.tools.gradbench``)."""
    import argparse
    ap = argparse.ArgumentParser(prog="tractfunc bench --grad", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return ap


def main(argv=None) -> int:
    return run_cli(parser().parse_args(argv))


def add_arguments(ap) -> None:
    ap.add_argument("--data", default=DEFAULT_DATA, help="directory of the Philips files ('phantom' for the phantom)")
    ap.add_argument("--n", type=int, default=1000, help="seeds")
    ap.add_argument("--steps", type=int, default=200, help="n_steps per half (fixed engine, Jacobian)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32,float64", help="comma-separated dtypes")
    ap.add_argument("--checkpoint", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of " + ",".join(ROUTES + JAX_ROUTES))
    ap.add_argument("--max-length", type=float, help="mm (default: tckgen's)")
    ap.add_argument("--min-length", type=float, help="mm (default: tckgen's)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run on the phantom: 6 seeds, 6 steps, lengths 0.5-3 mm, float32, 1 thread, 1 repeat")
    ap.add_argument("--json", dest="json_path", help="write the result here")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json (as tckgen -force)")
    ap.add_argument("--rk4", action="store_true", help="every route (the native reference too) with tckgen's -rk4")


def run_cli(a) -> int:
    data = None if (a.quick or a.data == "phantom") else a.data
    if a.quick:
        n, steps, threads, dtypes, repeats, max_length, min_length = 6, 6, 1, ("float32",), 1, 3.0, 0.5
    else:
        n, steps, threads, dtypes, repeats, max_length, min_length = (
            a.n, a.steps, a.threads, tuple(a.dtype.split(",")), a.repeats, a.max_length, a.min_length)
    res = run(data, n, steps, threads, dtypes, a.checkpoint, a.temperature, repeats, tuple(a.routes.split(",")),
              max_length=max_length, min_length=min_length, rk4=bool(getattr(a, "rk4", False)))
    print(format_table(res))
    if a.json_path:   # whole or not at all
        from ..io.atomic import atomic_path
        with atomic_path(a.json_path) as tmp, open(tmp, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
