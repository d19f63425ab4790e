"""Check proofs/checkpointing.md: track_fixed(..., checkpoint=k) recomputes bit-identical steps and gives the
same gradients as storing everything."""
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

import tractfunc.sdstream.fixed as tracking
from tractfunc.core.field import make_field, make_mask
from tractfunc.core.params import resolve
from tractfunc.tools.phantom import make_phantom
from tractfunc.core.seeds import random_in_mask
from tractfunc.core.seeds import random_directions
from tractfunc.sdstream.fixed import track_fixed

from _checklib import finish, report  # proofs/ is on sys.path (run as a script)


ph = make_phantom(shape=(24, 24, 12))          # the built-in phantom, reduced grid to keep this check fast
params = resolve([2, 2, 2])
gen = torch.Generator().manual_seed(21)
B, N_STEPS = 50, 40
seeds64 = random_in_mask(torch.as_tensor(ph.seed_mask), ph.affine, B, gen)
dirs64 = random_directions(B, gen, torch.float64)

# record every call of the fixed engine's step (the unit _run_steps repeats inside each checkpointed chunk)
records = []
phase = ["forward"]
_step = tracking.step


def recording_step(state, *args, **kwargs):
    out = _step(state, *args, **kwargs)
    new, added = out
    records.append((phase[0], tuple(t.detach().clone() for t in state if t is not None),
                    tuple(t.detach().clone() for t in new if t is not None) + (added.clone(),)))
    return out


tracking.step = recording_step


def run(dtype, ck, w):
    sh = torch.as_tensor(ph.fod, dtype=dtype).clone().requires_grad_(True)
    field = make_field(sh, ph.affine)               # tckgen's Legendre lookup (precomputed=True)
    mask = make_mask(torch.as_tensor(ph.mask), ph.affine)
    seeds = seeds64.to(dtype).clone().requires_grad_(True)
    records.clear()
    phase[0] = "forward"
    with set_checkpoint_early_stop(False):         # recompute whole chunks, so every step is re-run
        tr = track_fixed(field, params, seeds, dirs64.to(dtype), N_STEPS, mask, checkpoint=ck)
    loss = (tr.vertices * tr.valid.unsqueeze(-1) * w).sum()
    phase[0] = "recompute"
    gs, gsh = torch.autograd.grad(loss, (seeds, sh))
    return tr, gs, gsh, list(records)


def equal_tracks(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
    name = str(dtype).replace("torch.", "")
    w = torch.randn(B, 2 * N_STEPS + 1, 3, generator=gen, dtype=torch.float64).to(dtype)
    tr0, gs0, gsh0, rec0 = run(dtype, 0, w)
    n_vert = int(tr0.valid.sum())
    print(f"     {name}: {n_vert} valid vertices, {int(tr0.accepted.sum())}/{B} accepted, "
          f"{len([r for r in rec0 if r[0] == 'forward'])} step calls in forward")
    for ck in (1, 7) + ((N_STEPS,) if dtype == torch.float32 else ()):
        tr, gs, gsh, rec = run(dtype, ck, w)
        # (a) forward outputs identical
        report(f"{name} checkpoint={ck}: forward outputs differ from checkpoint=0 (0 = torch.equal)",
               0.0 if equal_tracks(tr, tr0) else 1.0, 0.0)
        # (b) every recomputed step reproduces a forward step bit for bit, and every forward step is re-run
        fwd = [r for r in rec if r[0] == "forward"]
        rcp = [r for r in rec if r[0] == "recompute"]
        used = [False] * len(fwd)
        mismatched = 0
        for _, inp, out in rcp:
            hit = next((i for i, (_, fi, _) in enumerate(fwd) if not used[i]
                        and all(torch.equal(a, b) for a, b in zip(inp, fi))), None)
            if hit is None or not all(torch.equal(a, b) for a, b in zip(out, fwd[hit][2])):
                mismatched += 1
            else:
                used[hit] = True
        print(f"     {name} checkpoint={ck}: {len(fwd)} step calls in forward, {len(rcp)} recomputed in backward")
        report(f"{name} checkpoint={ck}: recomputed steps not bit-identical to a forward step (count)",
               mismatched, 0)
        report(f"{name} checkpoint={ck}: forward steps never recomputed (count)", used.count(False), 0)
        # (c) gradients
        if ck == N_STEPS:   # one chunk per half: same graph as checkpoint=0 apart from the checkpoint node
            print(f"     (info) {name} checkpoint={ck} (one chunk per half): gradients bit-identical to "
                  f"checkpoint=0: seeds {torch.equal(gs, gs0)}, SH {torch.equal(gsh, gsh0)}")
            continue
        report(f"{name} checkpoint={ck}: d loss/d seeds vs checkpoint=0, rel", rel(gs, gs0), tol)
        report(f"{name} checkpoint={ck}: d loss/d SH volume vs checkpoint=0, rel", rel(gsh, gsh0), tol)
        print(f"     {name} checkpoint={ck}: gradients bit-identical: seeds {torch.equal(gs, gs0)}, "
              f"SH {torch.equal(gsh, gsh0)}")

tracking.step = _step
finish("checkpointing")
