"""Check proofs/rk4_step.md: derivative of one RK4 step (tractfunc.core.integrate.rk4) wrt position and FOD."""
import torch
from torch.func import jacfwd

from tractfunc.core.field import FODField, make_field
from tractfunc.core.integrate import rk4
from tractfunc.core.params import resolve
from tractfunc.tools.phantom import make_phantom
from tractfunc.core.seeds import random_in_mask
from tractfunc.core.seeds import random_directions
from tractfunc.sdstream.step import seed_peaks

from _checklib import failures, finish, report  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)
TOL = 1e-6


ph = make_phantom(shape=(24, 24, 12))          # the built-in phantom, reduced grid to keep this check fast
field = make_field(torch.as_tensor(ph.fod, dtype=torch.float64), ph.affine, precomputed=False)
params = resolve([2, 2, 2], rk4=True, peak_polish=3)
gen = torch.Generator().manual_seed(5)
seeds = random_in_mask(torch.as_tensor(ph.seed_mask), ph.affine, 12, gen)
sd = seed_peaks(field, params, None, seeds, random_directions(12, gen, torch.float64), polish=3)
m = rk4(field, params, seeds, sd.dir, early_exit=True)
keep = sd.ok & (m.reason == 0)
pos, dir = seeds[keep][:6], sd.dir[keep][:6]
print(f"     {pos.shape[0]} seed points where the RK4 step continues (reason == 0)")
if pos.shape[0] < 4:
    failures.append("too few continuing seed points")


def step_out(p, d, fld=field):
    mv = rk4(fld, params, p, d, early_exit=True)   # early exit is ignored under torch.func (fixed path)
    return torch.cat([mv.pos, mv.dir], -1)        # (B, 6): new position and carried direction


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# d new_pos / d pos: reverse-mode autograd (positions with requires_grad) vs central differences
pr = pos.clone().requires_grad_(True)
out = step_out(pr, dir)
J_rev = torch.stack([torch.autograd.grad(out[:, i].sum(), pr, retain_graph=True)[0] for i in range(3)], 1)
with torch.no_grad():
    h = 1e-6
    J_fd = torch.stack([(step_out(pos + h * e, dir) - step_out(pos - h * e, dir))[:, :3] / (2 * h)
                        for e in torch.eye(3)], -1)
report("d new_pos/d pos: autograd vs central FD (h=1e-6 mm), rel", rel(J_rev, J_fd), TOL)
print(f"     (info) d new_pos/d pos - I: max {float((J_rev - torch.eye(3)).abs().max()):.3e} "
      "(the step's dependence on where the FOD is sampled)")

# d (new_pos, new_dir) / d SH volume along a random direction V (restricted to non-zero voxels, so the
# 'nonzero' image and hence the inside/outside test are unchanged)
V = torch.randn(field.sh.shape, generator=gen) * field.nonzero[..., None]


def along(t):
    return step_out(pos, dir, FODField(field.sh + t * V, field.nonzero, field.world_to_voxel, None))


t0 = torch.zeros(())
D_fwd = jacfwd(along)(t0)                            # (B, 6), forward mode through torch.func
with torch.no_grad():
    hv = 1e-6
    D_fd = (along(t0 + hv) - along(t0 - hv)) / (2 * hv)
report("d(new_pos, new_dir)/d SH along V: jacfwd vs central FD, rel", rel(D_fwd, D_fd), TOL)

# the same through reverse-mode autograd (requires_grad SH volume): <dL/dSH, V> = w . D
shv = field.sh.clone().requires_grad_(True)
w = torch.randn(pos.shape[0], 6, generator=gen)
loss = (step_out(pos, dir, FODField(shv, field.nonzero, field.world_to_voxel, None)) * w).sum()
(g_sh,) = torch.autograd.grad(loss, shv)
report("autograd <dL/dSH, V> vs jacfwd, rel", abs(float((g_sh * V).sum() - (w * D_fwd).sum()))
       / float((w * D_fwd).abs().sum()), 1e-12)

finish("rk4_step")
