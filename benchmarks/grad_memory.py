"""Memory and time of backpropagating through ``track_fixed`` on the Philips in-vivo FOD.

Acceptance bar being measured: backprop through T steps of N streamlines must not store per-step gathers
of 8 x (lmax coefficients); checkpointing makes peak backward memory O(N x T x state); target
<= 100 bytes per streamline-step in float32, and backward wall time <= 3x forward.

Every configuration (dtype x checkpoint x gradient target) runs in fresh subprocesses, so that peak
resident memory (VmHWM, the kernel's high-water mark, reset through /proc/self/clear_refs after the data
are loaded) belongs to that configuration alone:

* ``nograd``: the same forward under ``torch.no_grad()`` -> reference peak and time;
* ``grad``:   forward with autograd (graph held) -> peak, resident after forward, time; then
  ``loss.backward()`` -> peak during backward, time;
* ``count``:  forward with autograd under ``torch.autograd.graph.saved_tensors_hooks`` -> exact bytes of
  the unique storages saved for backward, plus (checkpoint=0) a per-autograd-node breakdown from a walk of
  the graph.

A "streamline-step" is one of the N x 2T propagation steps (both halves of every streamline take T steps;
``track_fixed`` works on fixed shapes, so dead streamlines cost the same as live ones).

Run ``python benchmarks/grad_memory.py --help``; ``--quick`` for a small smoke run.  See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "dmri_invivo_philips_achieva_dti32"))
TARGET_BYTES = 100.0     # per streamline-step, float32
TARGET_RATIO = 3.0       # backward / forward wall time


# --------------------------------------------------------------------------------------------------
# process memory (Linux)

def _status_kib(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes():
    """Current resident set size in bytes (None where /proc is unavailable)."""
    v = _status_kib("VmRSS")
    return None if v is None else v * 1024


def peak_bytes():
    """Peak resident set size since the last reset, bytes: VmHWM, else ru_maxrss (KiB on Linux)."""
    v = _status_kib("VmHWM")
    if v is None:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# worker (runs in a subprocess)

def _setup(cfg):
    import torch
    from tractfunc import io
    from tractfunc.core import field, params as P, seeds as S
    from tractfunc.sdstream import fixed as tracking
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg.get("prototype"):
        sys.path.insert(0, HERE)
        import prototype_compact_grad
        prototype_compact_grad.install()
    dtype = getattr(torch, cfg["dtype"])
    d = cfg["data"]
    img = io.load_fod(os.path.join(d, "dwi_fod_lmax8.nii.gz"))
    sm = io.load_mask(os.path.join(d, "dwi_wmmask_FA0.3.nii.gz"))
    bm = io.load_mask(os.path.join(d, "dwi_brainmask.nii.gz"))
    fld = field.make_field(torch.as_tensor(img.data, dtype=dtype), img.affine)
    msk = field.make_mask(torch.as_tensor(bm.data), bm.affine)
    prm = P.resolve(img.voxel_sizes)
    gen = torch.Generator().manual_seed(cfg["seed"])
    seeds = S.random_in_mask(torch.as_tensor(sm.data), sm.affine, cfg["n"], gen).to(dtype)
    dirs = tracking.random_directions(cfg["n"], gen, dtype)
    # warm-up (lazy initialisation, lookup-table caches) on a few streamlines, with and without autograd
    w_seeds = seeds[:8].clone().requires_grad_()
    with torch.no_grad():
        tracking.track_fixed(fld, prm, w_seeds, dirs[:8], 2, mask=msk)
    out = tracking.track_fixed(fld, prm, w_seeds, dirs[:8], 2, mask=msk, checkpoint=cfg["checkpoint"])
    _loss(out).backward()
    del img, sm, bm, w_seeds, out
    if cfg["wrt"] == "both":
        fld = fld._replace(sh=fld.sh.detach().clone().requires_grad_())
    seeds.requires_grad_(cfg["mode"] != "nograd")
    gc.collect()
    return torch, tracking, fld, msk, prm, seeds, dirs


def _loss(out):
    import torch
    return (torch.where(out.valid[..., None], out.vertices, 0) ** 2).sum()


def _graph_breakdown(loss, exclude):
    """Walk the autograd graph from ``loss`` (checkpoint=0 only: touching saved tensors of a checkpointed
    region would trigger its recomputation) -> {(node, attribute, dtype, shape[1:]): [bytes, count]} over
    unique storages, skipping ``exclude`` (data pointers of the leaves)."""
    import torch
    seen = set(exclude)
    by = collections.defaultdict(lambda: [0, 0])
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        by[("nodes",)][0] += 1
        attrs = [a for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):          # custom autograd.Function node
            attrs.append("saved_tensors")
        for attr in attrs:
            val = getattr(node, attr)
            for t in (val if isinstance(val, (tuple, list)) else (val,)):
                if not isinstance(t, torch.Tensor):
                    continue
                s = t.untyped_storage()
                if s.data_ptr() in seen:
                    continue
                seen.add(s.data_ptr())
                key = (type(node).__name__, attr.replace("_saved_", "", 1), str(t.dtype).replace("torch.", ""),
                       "x".join(map(str, t.shape[1:])) or "scalar")
                by[key][0] += s.nbytes()
                by[key][1] += 1
        stack.extend(nf for nf, _ in node.next_functions)
    return by


def source_hash(pkg_dir):
    """sha256 over the package's .py files (names and contents), to tell library versions apart."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(os.listdir(pkg_dir)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(pkg_dir, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def worker(cfg):
    torch, tracking, fld, msk, prm, seeds, dirs = _setup(cfg)
    T, k = cfg["steps"], cfg["checkpoint"]
    res = {"mode": cfg["mode"], "peak_reset": reset_peak()}
    pkg = os.path.dirname(os.path.abspath(tracking.__file__))
    res["tractfunc_dir"] = pkg
    res["tractfunc_sha256"] = source_hash(pkg)
    base = rss_bytes()
    res["base_rss"] = base

    if cfg["mode"] == "nograd":
        t0 = time.perf_counter()
        with torch.no_grad():
            out = tracking.track_fixed(fld, prm, seeds, dirs, T, mask=msk, checkpoint=k)
            loss = _loss(out)
        res["t_fwd"] = time.perf_counter() - t0
        res["peak_fwd"] = peak_bytes()
        res["rss_after_fwd"] = rss_bytes()
        # streamline-steps actually computed: eager track_fixed iterates the alive rows only, so the
        # graph grows with them, not with N x 2T.  Count the rows handed to integrate.iterate (untimed rerun).
        counted = [0]
        real_iterate = tracking.iterate

        def counting_iterate(field, params, mask, pos, *a, **kw):
            counted[0] += pos.shape[0]
            return real_iterate(field, params, mask, pos, *a, **kw)

        tracking.iterate = counting_iterate
        try:
            with torch.no_grad():
                tracking.track_fixed(fld, prm, seeds, dirs, T, mask=msk, checkpoint=k)
        finally:
            tracking.iterate = real_iterate
        res["computed_steps"] = counted[0]
        res["loss"] = float(loss)
        res["valid_fraction"] = float(out.valid.float().mean())
        res["accepted_fraction"] = float(out.accepted.float().mean())
        return res

    if cfg["mode"] == "grad":
        t0 = time.perf_counter()
        out = tracking.track_fixed(fld, prm, seeds, dirs, T, mask=msk, checkpoint=k)
        loss = _loss(out)
        res["t_fwd"] = time.perf_counter() - t0
        res["peak_fwd"] = peak_bytes()
        res["rss_after_fwd"] = rss_bytes()
        res["loss"] = float(loss)
        del out
        gc.collect()
        reset_peak()
        res["rss_before_bwd"] = rss_bytes()
        t0 = time.perf_counter()
        loss.backward()
        res["t_bwd"] = time.perf_counter() - t0
        res["peak_bwd"] = peak_bytes()
        res["rss_after_bwd"] = rss_bytes()
        g = seeds.grad
        res["seed_grad_finite"] = bool(torch.isfinite(g).all())
        res["seed_grad_norm"] = float(g.norm())
        if cfg["wrt"] == "both":
            res["sh_grad_bytes"] = fld.sh.grad.untyped_storage().nbytes()
            res["sh_grad_norm"] = float(fld.sh.grad.norm())
        return res

    # mode == "count": exact bytes saved for backward.  Every tensor autograd saves goes through the pack
    # hook; a weakref on the packed holder tells whether its graph node is still alive at the end of the
    # forward (nodes whose outputs were detached, e.g. the Hessian einsum in attach_peak, die early).
    # Non-reentrant checkpointing saves each chunk's inputs through these (outer) hooks and replaces the
    # tensors saved inside the chunk by its own placeholders, so for checkpoint > 0 the count is: chunk
    # inputs + everything saved outside the chunks (seed peak search, output packing, loss).
    import weakref
    leaves = {seeds.untyped_storage().data_ptr(), fld.sh.untyped_storage().data_ptr()}
    live = {}                         # id(holder) -> (storage pointer, bytes, dtype, shape)
    ever = {}                         # storage pointer -> bytes, everything ever packed
    ckpt_inputs = set()               # storage pointers of the tensors handed to checkpointed chunks

    class _Held:
        __slots__ = ("t", "__weakref__")

    def pack(t):
        s = t.untyped_storage()
        p = s.data_ptr()
        if p in leaves:
            return t
        ever[p] = s.nbytes()
        h = _Held()
        h.t = t
        live[id(h)] = (p, s.nbytes(), str(t.dtype).replace("torch.", ""), "x".join(map(str, t.shape[1:])) or "scalar")
        weakref.finalize(h, live.pop, id(h), None)
        return h

    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    real_ckpt = tracking._checkpoint

    def recording_ckpt(fn, *args, **kw):
        for a in args:
            if isinstance(a, torch.Tensor):      # the chunk's input state: pos, dir, alive, n, reason
                ckpt_inputs.add(a.untyped_storage().data_ptr())
        return real_ckpt(fn, *args, **kw)

    tracking._checkpoint = recording_ckpt
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = tracking.track_fixed(fld, prm, seeds, dirs, T, mask=msk, checkpoint=k)
            loss = _loss(out)
        del out
        gc.collect()
    finally:
        tracking._checkpoint = real_ckpt
    uniq = {}
    for p, nb, dt, shp in list(live.values()):
        uniq[p] = (nb, dt, shp)
    res["saved_bytes"] = sum(v[0] for v in uniq.values())
    res["saved_storages"] = len(uniq)
    res["saved_bytes_ever"] = sum(ever.values())
    res["ckpt_input_bytes"] = sum(v[0] for p, v in uniq.items() if p in ckpt_inputs)
    by = collections.defaultdict(lambda: [0, 0])
    if k == 0:
        for key, v in _graph_breakdown(loss, leaves).items():
            by[key][0] += v[0]
            by[key][1] += v[1]
        res["graph_nodes"] = by.pop(("nodes",), [0, 0])[0]
    else:
        for p, (nb, dt, shp) in uniq.items():
            key = ("checkpoint input", "chunk state", dt, shp) if p in ckpt_inputs else \
                ("outside chunks", "saved", dt, shp)
            by[key][0] += nb
            by[key][1] += 1
    rows = sorted(([*key, v[0], v[1]] for key, v in by.items()), key=lambda r: -r[4])
    res["breakdown"] = [dict(node=r[0], attr=r[1], dtype=r[2], shape=r[3], bytes=r[4], storages=r[5])
                        for r in rows]
    res["breakdown_bytes"] = sum(r[4] for r in rows)
    return res


# --------------------------------------------------------------------------------------------------
# driver

def _git(*a):
    p = subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


def resolve_tractfunc(spec):
    """-> (directory to put first on PYTHONPATH, description).  See ``--tractfunc``."""
    head = (_git("rev-parse", "HEAD") or "").strip()
    modified = [l[3:] for l in (_git("status", "--porcelain", "--", "tractfunc") or "").splitlines()]
    if spec == "worktree":
        return REPO, {"source": "worktree " + REPO, "git_head": head, "modified": modified}
    if os.path.isdir(os.path.join(spec, "tractfunc")):
        return os.path.abspath(spec), {"source": "directory " + os.path.abspath(spec), "git_head": head,
                                       "note": "checkout state shown for reference only"}
    rev = (_git("rev-parse", spec) or "").strip()
    if not rev:
        raise SystemExit(f"--tractfunc: {spec!r} is neither 'worktree', a directory with tractfunc/, "
                         f"nor a git revision of {REPO}")
    import atexit
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix="tractfunc_" + rev[:12] + "_")
    atexit.register(shutil.rmtree, tmp, True)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "tractfunc"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return tmp, {"source": f"git {rev} exported to {tmp}", "git_head": rev, "modified": []}


def describe_machine(threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "memory_bytes": mem, "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(), "torch_num_interop_threads": torch.get_num_interop_threads(),
            "loadavg_start": os.getloadavg()}


def run_worker(cfg):
    env = dict(os.environ)
    env["PYTHONPATH"] = cfg["tractfunc_root"] + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(cfg)],
                       capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"worker {cfg['mode']} failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(cfg_base, dtype, k, wrt, log):
    cfg = dict(cfg_base, dtype=dtype, checkpoint=k, wrt=wrt)
    N, T = cfg["n"], cfg["steps"]
    ss = N * 2 * T
    r = {"dtype": dtype, "checkpoint": k, "wrt": wrt, "n": N, "steps": T, "streamline_steps": ss,
         "prototype": bool(cfg.get("prototype"))}
    a = run_worker(dict(cfg, mode="nograd"))
    log(f"  nograd: {a['t_fwd']:.2f} s")
    c = run_worker(dict(cfg, mode="count"))
    log(f"  count:  {c['saved_bytes']} B saved ({c['saved_bytes_ever']} incl. freed)")
    b = run_worker(dict(cfg, mode="grad"))
    log(f"  grad:   fwd {b['t_fwd']:.2f} s, bwd {b['t_bwd']:.2f} s")
    a_peak = a["peak_fwd"] - a["base_rss"]
    b_peak = b["peak_fwd"] - b["base_rss"]
    r.update(
        peak_reset=a["peak_reset"] and b["peak_reset"],
        base_rss_nograd=a["base_rss"], base_rss_grad=b["base_rss"],
        fwd_peak_nograd=a_peak, fwd_peak_grad=b_peak,
        rss_held_after_fwd_nograd=a["rss_after_fwd"] - a["base_rss"],
        rss_held_after_fwd_grad=b["rss_after_fwd"] - b["base_rss"],
        bwd_peak=b["peak_bwd"] - b["base_rss"],
        rss_after_bwd=b["rss_after_bwd"] - b["base_rss"],
        sh_grad_bytes=b.get("sh_grad_bytes", 0),
        exact_saved_bytes=c["saved_bytes"], exact_saved_storages=c["saved_storages"],
        exact_saved_bytes_incl_freed=c["saved_bytes_ever"], exact_ckpt_inputs=c["ckpt_input_bytes"],
        breakdown=c["breakdown"][:25], breakdown_bytes=c["breakdown_bytes"], graph_nodes=c.get("graph_nodes"),
        t_fwd_nograd=a["t_fwd"], t_fwd=b["t_fwd"], t_bwd=b["t_bwd"],
        loss_nograd=a["loss"], loss_grad=b["loss"], valid_fraction=a["valid_fraction"],
        accepted_fraction=a["accepted_fraction"], seed_grad_finite=b["seed_grad_finite"],
        seed_grad_norm=b["seed_grad_norm"], sh_grad_norm=b.get("sh_grad_norm"))
    # derived per streamline-step numbers
    shas = {a["tractfunc_sha256"], b["tractfunc_sha256"], c["tractfunc_sha256"]}
    r["tractfunc_sha256"] = a["tractfunc_sha256"] if len(shas) == 1 else sorted(shas)
    r["tractfunc_dir"] = a["tractfunc_dir"]
    if len(shas) != 1:
        log("  WARNING: the tractfunc sources changed between the three subprocesses of this row")
    r["B_per_ss_rss_graph"] = (b_peak - a_peak) / ss            # (b) - (a): peak RSS due to autograd
    r["B_per_ss_rss_held"] = (r["rss_held_after_fwd_grad"] - r["rss_held_after_fwd_nograd"]) / ss
    r["B_per_ss_exact"] = r["exact_saved_bytes"] / ss
    r["computed_steps"] = a["computed_steps"]
    r["computed_fraction"] = a["computed_steps"] / ss
    r["B_per_computed_step_exact"] = r["exact_saved_bytes"] / max(a["computed_steps"], 1)
    r["B_per_computed_step_rss_graph"] = (b_peak - a_peak) / max(a["computed_steps"], 1)
    r["B_per_ss_bwd_peak"] = r["bwd_peak"] / ss
    r["B_per_ss_bwd_peak_minus_shgrad"] = (r["bwd_peak"] - r["sh_grad_bytes"]) / ss
    r["bwd_over_fwd"] = r["t_bwd"] / r["t_fwd"]
    r["bwd_over_fwd_nograd"] = r["t_bwd"] / r["t_fwd_nograd"]
    return r


def table(rows):
    hdr = ["dtype", "wrt", "ckpt", "N", "T", "alive%", "exact B/ss", "exact B/as", "RSS B/ss", "RSS B/as",
           "held B/ss", "bwd peak MB", "fwd0 s", "fwd s", "bwd s", "bwd/fwd", "bar ss/as t"]
    lines = []
    for r in rows:
        if r["dtype"] == "float32":
            mem = ("ok" if r["B_per_ss_exact"] <= TARGET_BYTES else ">100") + "/" + \
                ("ok" if r["B_per_computed_step_exact"] <= TARGET_BYTES else ">100")
        else:
            mem = "-/-"
        bar = mem + " " + ("ok" if r["bwd_over_fwd"] <= TARGET_RATIO else ">3x")
        lines.append([r["dtype"], r["wrt"], str(r["checkpoint"]), str(r["n"]), str(r["steps"]),
                      f"{100 * r['computed_fraction']:.1f}",
                      f"{r['B_per_ss_exact']:.1f}", f"{r['B_per_computed_step_exact']:.1f}",
                      f"{r['B_per_ss_rss_graph']:.1f}", f"{r['B_per_computed_step_rss_graph']:.1f}",
                      f"{r['B_per_ss_rss_held']:.1f}", f"{r['bwd_peak'] / 2**20:.1f}",
                      f"{r['t_fwd_nograd']:.2f}", f"{r['t_fwd']:.2f}", f"{r['t_bwd']:.2f}",
                      f"{r['bwd_over_fwd']:.2f}", bar])
    w = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    out = ["  ".join(h.rjust(w[i]) for i, h in enumerate(hdr)), "  ".join("-" * x for x in w)]
    out += ["  ".join(c.rjust(w[i]) for i, c in enumerate(l)) for l in lines]
    return "\n".join(out)


def breakdown_table(r, limit=10):
    ss = r["streamline_steps"]
    out = [f"top saved tensors: {r['dtype']} wrt={r['wrt']} checkpoint={r['checkpoint']}, "
           f"{r['breakdown_bytes'] / ss:.1f} B/ss in all"
           + (f" ({r['graph_nodes']} autograd nodes, {r['graph_nodes'] / (2 * r['steps'] + 1):.0f} per step)"
              if r.get("graph_nodes") else " (chunk inputs + tensors saved outside the checkpointed chunks)")]
    for b in r["breakdown"][:limit]:
        out.append(f"  {b['bytes'] / ss:9.1f} B/ss  {b['storages']:7d} x  {b['node']}.{b['attr']}  "
                   f"{b['dtype']} (.., {b['shape']})")
    return "\n".join(out)


def report(doc):
    """The printed report (tables) of one run, from its JSON document."""
    machine, a, rows = doc["machine"], doc["args"], doc["results"]
    version = machine.get("tractfunc", {})
    n, steps = a["n"], a["steps"]
    dtypes, wrts = a["dtype"], a["wrt"]
    out = []
    emit = out.append
    emit(f"# grad_memory{' (PROTOTYPE compact Functions installed)' if a.get('prototype') else ''}: N={n} streamlines, T={steps} steps per half (N x 2T = {n * 2 * steps} "
          f"streamline-steps), threads={machine['torch_num_threads']}, torch {machine['torch']}, "
          f"{machine['cpu_count']} CPUs, {machine['platform']}")
    emit(f"# load average start {machine['loadavg_start']}, end {machine['loadavg_end']}")
    shas = {str(r["tractfunc_sha256"]) for r in rows}
    emit(f"# tractfunc: {version['source']} (git {version.get('git_head', '?')[:12]}"
          f"{', modified: ' + ' '.join(version['modified']) if version.get('modified') else ''}), "
          f"sources sha256 {' / '.join(x[:12] for x in sorted(shas))}"
          + ("  WARNING: rows measured different versions" if len(shas) > 1 else ""))
    emit(table(rows))
    emit("# alive%: streamline-steps actually computed (alive at the start of the step) / (N x 2T); eager "
          "track_fixed iterates alive rows only")
    emit("# exact B/ss: bytes of unique storages saved for backward (incl. checkpoint inputs) / (N x 2T); "
          "B/as: per computed (alive) streamline-step")
    emit("# RSS B/ss: (peak RSS of forward with grad - peak RSS of the same forward under no_grad) / (N x 2T)")
    emit("# held B/ss: same with the resident size at the end of the forward (graph alive, transients gone)")
    emit("# bwd peak MB: peak RSS during backward above the pre-forward baseline (includes a dense "
          "sh.grad of the whole volume when wrt=both)")
    emit(f"# bar ss/as t: float32 exact B/ss (the brief's definition) and B/as (per computed step) "
         f"<= {TARGET_BYTES:.0f}; backward <= {TARGET_RATIO:.0f}x forward with grad")
    shown = set()
    for r in rows:
        if r["checkpoint"] == 0 and (r["dtype"], r["wrt"]) not in shown:
            shown.add((r["dtype"], r["wrt"]))
            emit(breakdown_table(r))
    for r in rows:
        if r["checkpoint"] != 0 and r["dtype"] == dtypes[0] and r["wrt"] == wrts[0]:
            emit(breakdown_table(r, limit=6))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="Philips data directory (default: %(default)s)")
    ap.add_argument("--n", type=int, default=None, help="streamlines (default 2000; --quick 200)")
    ap.add_argument("--steps", type=int, default=None, help="steps per half, T (default 200; --quick 20)")
    ap.add_argument("--dtype", default="float32,float64", help="comma list of float32, float64")
    ap.add_argument("--checkpoint", default="0,1,10", help="comma list of chunk sizes (0 = no checkpointing)")
    ap.add_argument("--wrt", default="seeds,both",
                    help="comma list of gradient targets: 'seeds' (seeds only) or 'both' (seeds and field.sh)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker")
    ap.add_argument("--quick", action="store_true", help="small smoke run (N=200, T=20)")
    ap.add_argument("--prototype", action="store_true",
                    help="measure with benchmarks/prototype_compact_grad.py installed (compact custom "
                         "autograd Functions for FOD sampling and the IFT peak; not library code)")
    ap.add_argument("--tractfunc", default="worktree",
                    help="which tractfunc to measure: 'worktree' (this checkout, default), a git revision "
                         "(exported to a temporary directory, e.g. HEAD), or a directory holding a "
                         "tractfunc/ package; a snapshot keeps every row on one version while the "
                         "checkout is being edited")
    ap.add_argument("--seed", type=int, default=0, help="torch.Generator seed for seeds and directions")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--report", nargs="+", metavar="JSON", default=None,
                    help="print the tables of earlier runs from their JSON files and exit")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker is not None:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0
    if args.report:
        for path in args.report:
            with open(path) as f:
                print(report(json.load(f)))
            print()
        return 0

    n = args.n if args.n is not None else (200 if args.quick else 2000)
    steps = args.steps if args.steps is not None else (20 if args.quick else 200)
    if not os.path.exists(os.path.join(args.data, "dwi_fod_lmax8.nii.gz")):
        ap.error(f"{args.data}: dwi_fod_lmax8.nii.gz not found (pass --data DIR)")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            ap.error(f"--dtype: {d!r}; expected float32 or float64")
    ckpts = [int(x) for x in args.checkpoint.split(",") if x.strip()]
    wrts = [w.strip() for w in args.wrt.split(",") if w.strip()]
    for w in wrts:
        if w not in ("seeds", "both"):
            ap.error(f"--wrt: {w!r}; expected seeds or both")

    root, version = resolve_tractfunc(args.tractfunc)
    machine = describe_machine(args.threads)
    machine["tractfunc"] = version
    log = lambda s: print(s, file=sys.stderr, flush=True)
    log(f"machine: {machine}")
    cfg = dict(data=os.path.abspath(args.data), n=n, steps=steps, threads=args.threads, seed=args.seed,
               prototype=args.prototype, tractfunc_root=root)
    rows = []
    t_start = time.time()
    for dtype in dtypes:
        for wrt in wrts:
            for k in ckpts:
                log(f"{dtype} wrt={wrt} checkpoint={k} N={n} T={steps}")
                rows.append(measure(cfg, dtype, k, wrt, log))
    machine["loadavg_end"] = os.getloadavg()
    machine["total_wall_s"] = time.time() - t_start

    doc = {"machine": machine, "args": dict(n=n, steps=steps, dtype=dtypes, checkpoint=ckpts, wrt=wrts,
                                            threads=args.threads, quick=args.quick, prototype=args.prototype,
                                            seed=args.seed, data=os.path.abspath(args.data),
                                            tractfunc=args.tractfunc),
           "target_bytes_per_streamline_step": TARGET_BYTES, "target_bwd_over_fwd": TARGET_RATIO,
           "results": rows}
    print(report(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
