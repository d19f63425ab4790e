"""Check proofs/sift2_implicit.md: the soft SIFT2 fit x*(F, L) of tractfunc.maps.sift2 (stationarity of the
smooth cost, and implicit-function gradients wrt fixel integrals F and streamline lengths L against central
differences in float64, each difference re-solving the fit)."""
import numpy as np
import torch

from tractfunc.maps.sift2 import smooth_cost, soft_sift2

from _checklib import finish, report  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)
rng = np.random.default_rng(0)
J, A = 25, 40
sid, fix = [], []
for s in range(A):                                   # each streamline crosses 3-7 distinct fixels
    f = rng.choice(J, size=int(rng.integers(3, 8)), replace=False)
    sid += [s] * len(f)
    fix += list(f)
sid, fix = torch.tensor(sid), torch.tensor(fix)
L = torch.tensor(rng.uniform(0.3, 2.0, len(sid)))
F = torch.tensor(rng.uniform(0.2, 1.0, J))
PM = torch.tensor(rng.uniform(0.5, 1.0, J))
KW = dict(reg_tikhonov=0.01, reg_tv=0.1)
probe = torch.tensor(rng.normal(size=A))


def loss(F_, L_):
    x = soft_sift2(F_, L_, sid, fix, PM, tol=1e-13, **KW)
    return (probe * torch.exp(x)).sum(), x


Fg, Lg = F.clone().requires_grad_(True), L.clone().requires_grad_(True)
val, x = loss(Fg, Lg)
xg = x.detach().requires_grad_(True)
g, = torch.autograd.grad(smooth_cost(xg, F, L, sid, fix, PM, **KW), xg)
z = torch.zeros(A, requires_grad=True)
g0, = torch.autograd.grad(smooth_cost(z, F, L, sid, fix, PM, **KW), z)
report("stationarity |grad_x E(x*)| / |grad_x E(0)|", float(g.norm()) / float(g0.norm()), 1e-9)
dF, dL = torch.autograd.grad(val, (Fg, Lg))
h = 1e-5   # central differences; each side re-solves the fit (its stopping error ~1e-12 stays far below h^2)
for name, base, grad, idx in (("F", F, dF, [0, 7, 19]), ("L", L, dL, [0, 33, 101])):
    for i in idx:
        e = torch.zeros_like(base)
        e[i] = h
        if name == "F":
            fd = (loss(F + e, L)[0] - loss(F - e, L)[0]) / (2 * h)
        else:
            fd = (loss(F, L + e)[0] - loss(F, L - e)[0]) / (2 * h)
        scale = float(grad.abs().max())                       # entries far below the largest are FD-noise bound
        err = abs(float(fd) - float(grad[i])) / max(abs(float(fd)), 1e-2 * scale)
        print(f"     d loss / d {name}[{i}] = {float(grad[i]):.10e} (central difference {float(fd):.10e})")
        report(f"d loss / d {name}[{i}]: implicit vs central difference (relative)", err, 1e-5)
# a random direction in (F, L) jointly
dF_dir, dL_dir = torch.tensor(rng.normal(size=J)), torch.tensor(rng.normal(size=len(L)))
fd = (loss(F + h * dF_dir, L + h * dL_dir)[0] - loss(F - h * dF_dir, L - h * dL_dir)[0]) / (2 * h)
an = float((dF * dF_dir).sum() + (dL * dL_dir).sum())
report("directional derivative along a random (F, L) direction (relative)", abs(float(fd) - an) / abs(float(fd)), 1e-5)
finish("SIFT2 implicit-gradient")
