"""Check proofs/soft_act.md: soft ACT and soft regions (sdstream.act.soft_act, track_fixed(act=, regions=))."""
import torch

import tractfunc as tf
from tractfunc.core.tissues import class_margins, sample_tissues
from tractfunc.sdstream.act import region_indicator, soft_act
from tractfunc.sdstream.fixed import track_fixed
from tractfunc.tools.phantom import make_phantom

from _checklib import failures, finish, report  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)
gen = torch.Generator().manual_seed(5)

# a synthetic 5TT on a 16 x 12 x 8 grid of 2 mm voxels: WM, a cortical GM slab at high x, a CSF pocket
X, Y, Z = 16, 12, 8
tt = torch.zeros(X, Y, Z, 5)
tt[..., 2] = 1.0
tt[12:, ..., 0], tt[12:, ..., 2] = 0.8, 0.2
tt[4:7, 8:, :, 3], tt[4:7, 8:, :, 2] = 0.9, 0.1
tt = tt + 0.05 * torch.rand(X, Y, Z, 5, generator=gen)   # break ties; fractions stay positive
tt = tt / tt.sum(-1, keepdim=True)
aff = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
act = tf.make_act(tt, aff)
regions = tf.Regions(include=(tf.Sphere((18.0, 12.0, 8.0), 9.0),), exclude=(tf.Sphere((4.0, 4.0, 8.0), 2.0),))

# random walks as stand-ins for tracked streamlines, packed as track_fixed packs them (forward half reversed)
B, T_ = 24, 10
L = 2 * T_ + 1
seed = torch.stack([torch.rand(B, generator=gen) * 12 + 6, torch.rand(B, generator=gen) * 12 + 5,
                    torch.rand(B, generator=gen) * 6 + 5], 1)
dirs = torch.nn.functional.normalize(torch.randn(B, 3, generator=gen), dim=1)
k = torch.arange(-T_, T_ + 1).double()
verts = seed[:, None, :] + k[None, :, None] * 1.2 * dirs[:, None, :] + 0.2 * torch.randn(B, L, 3, generator=gen)
verts[:, T_] = seed
valid = torch.ones(B, L, dtype=torch.bool)
si = torch.full((B,), T_)
logw = -0.01 * (k.abs())[None].expand(B, L).clone()
bad = torch.zeros(B, 2, dtype=torch.bool)


def acc_and_reach(tissues, v, temp):
    out = soft_act(act._replace(tissues=tissues), regions, v, valid, si, logw, bad, temp, 3, 40)
    return out.acceptance, out.reach, out.weights


# 1. derivatives of soft_act wrt the tissue maps and the vertices vs central differences (T = 0.05)
temp = 0.05
wa, wr = torch.randn(B, generator=gen), torch.randn(B, 1, generator=gen)
ww = torch.randn(B, L, generator=gen)


def loss(tissues, v):
    a, r, w = acc_and_reach(tissues, v, temp)
    return (wa * a).sum() + (wr * r).sum() + (ww * w).sum()


ti = tt.clone().requires_grad_(True)
vi = verts.clone().requires_grad_(True)
gt, gv = torch.autograd.grad(loss(ti, vi), (ti, vi))
Dt, Dv = torch.randn(tt.shape, generator=gen), torch.randn(verts.shape, generator=gen)
h = 1e-6
with torch.no_grad():
    fd_t = (float(loss(tt + h * Dt, verts)) - float(loss(tt - h * Dt, verts))) / (2 * h)
    fd_v = (float(loss(tt, verts + h * Dv)) - float(loss(tt, verts - h * Dv))) / (2 * h)
an_t, an_v = float((gt * Dt).sum()), float((gv * Dv).sum())
print(f"     <dL/dtissues, D> = {an_t:.6e} (FD {fd_t:.6e}); <dL/dvertices, D> = {an_v:.6e} (FD {fd_v:.6e})")
report("soft_act: d/d tissues, autograd vs central FD, rel", abs(an_t - fd_t) / abs(fd_t), 1e-6)
report("soft_act: d/d vertices, autograd vs central FD, rel", abs(an_v - fd_v) / abs(fd_v), 1e-6)


# 2. T -> 0: the acceptance equals tckgen's rules applied vertex by vertex (a plain loop)
def hard_accept(i):
    t, inside = sample_tissues(act, verts[i], masked=True)
    m_csf, m_gm = class_margins(t)
    usable = inside & (t.sum(-1) >= 0.5)
    inc = region_indicator(regions.include[0], verts[i], 1e-9) > 0.5
    exc = region_indicator(regions.exclude[0], verts[i], 1e-9) > 0.5
    seen, n = bool(inc[T_]), 1
    for side in (-1, 1):
        ok = False
        for j in range(1, T_ + 1):
            p = T_ + side * j
            if not usable[p]:
                ok = True
                break
            n += 1
            seen = seen or bool(inc[p])
            if m_csf[p] >= 0 or exc[p]:
                return False
            if m_gm[p] >= 0:
                ok = True
                break
        else:
            ok = True   # ran to the end of the half (cut: accepted, as the fixed engine counts it)
        if not ok:
            return False
    return seen and 3 <= n < 40


with torch.no_grad():
    a0 = acc_and_reach(tt, verts, 1e-7)[0]
    logw_saved = logw.clone()
    logw.zero_()   # the cutoff / angle survival is proofs/soft_termination.md's; here every step survives it
    a0 = acc_and_reach(tt, verts, 1e-7)[0]
    logw.copy_(logw_saved)
hard = torch.tensor([hard_accept(i) for i in range(B)])
print(f"     T = 1e-7: acceptance {[round(float(x), 3) for x in a0]}; hard rule accepts {hard.tolist()}")
report("T -> 0: streamlines whose soft acceptance differs from the hard rule by > 1e-3 (count)",
       int(((a0 - hard.double()).abs() > 1e-3).sum()), 0)
if not (hard.any() and (~hard).any()):
    failures.append("the synthetic streamlines do not exercise both outcomes")

# 3. end to end: track_fixed on the phantom with a synthetic 5TT, gradient wrt the seeds vs central differences
ph = make_phantom(shape=(24, 24, 12))
field = tf.make_field(torch.as_tensor(ph.fod, dtype=torch.float64), ph.affine, precomputed=False)
params = tf.resolve([2, 2, 2], peak_polish=3, cutoff=0.05)
paff = torch.as_tensor(ph.affine, dtype=torch.float64)
t5 = torch.zeros(24, 24, 12, 5)
t5[..., 2] = 1.0
t5[18:, ..., 0], t5[18:, ..., 2] = 0.7, 0.3
pact = tf.make_act(t5, paff)
centre = (paff[:3, :3] @ torch.tensor([12.0, 12.0, 6.0]) + paff[:3, 3])
preg = tf.Regions(include=(tf.Sphere(tuple(centre.tolist()), 6.0),))
s0 = centre[None] + torch.tensor([[-6.0, 1.0, 0.5], [-4.0, -1.5, 0.0], [2.0, 2.0, -1.0]])
D = torch.randn(s0.shape, generator=gen)


def track_loss(s):
    out = track_fixed(field, params, s, None, 15, temperature=0.1, act=pact, regions=preg)
    return out.reach.sum() + out.acceptance.sum() + (out.weights.unsqueeze(-1) * out.vertices).sum() * 1e-3


sg = s0.clone().requires_grad_(True)
(g,) = torch.autograd.grad(track_loss(sg), sg)
with torch.no_grad():
    h = 1e-6
    fd = (float(track_loss(s0 + h * D)) - float(track_loss(s0 - h * D))) / (2 * h)
an = float((g * D).sum())
print(f"     track_fixed + soft ACT + include sphere: <dL/dseeds, D> = {an:.6e} (FD {fd:.6e})")
report("track_fixed soft ACT: d/d seeds, autograd vs central FD, rel", abs(an - fd) / max(abs(fd), 1e-12), 1e-5)

finish("soft_act")
