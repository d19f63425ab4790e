"""Check proofs/trilinear.md: derivatives of tractfunc.core.interpolate.trilinear wrt volume and voxel position."""
import itertools
import torch

from tractfunc.core.interpolate import trilinear

from _checklib import finish, report  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)


gen = torch.Generator().manual_seed(1)
dims = (5, 4, 6)
vol = torch.randn(*dims, 2, generator=gen)

# 1. gradcheck strictly inside cells (fractions in [0.05, 0.95]: min weight 0.05^3 = 1.25e-4 >> 1e-6)
base = torch.stack([torch.randint(0, d - 1, (16,), generator=gen) for d in dims], -1).double()
vox = base + 0.05 + 0.9 * torch.rand(16, 3, generator=gen)
v_req = vol.clone().requires_grad_(True)
p_req = vox.clone().requires_grad_(True)
ok_v = torch.autograd.gradcheck(lambda v: trilinear(v, vox).values, (v_req,), eps=1e-6, atol=1e-9, rtol=1e-7,
                                raise_exception=False)
ok_p = torch.autograd.gradcheck(lambda p: trilinear(vol, p).values, (p_req,), eps=1e-6, atol=1e-9, rtol=1e-7,
                                raise_exception=False)
report("gradcheck wrt volume failed (0 = passed)", 0.0 if ok_v else 1.0, 0.0)
report("gradcheck wrt vox failed (0 = passed)", 0.0 if ok_p else 1.0, 0.0)
# the same comparison as a measured number: autograd Jacobian wrt vox vs central differences (h = 1e-6)
Jp = torch.func.vmap(torch.func.jacrev(lambda p: trilinear(vol, p).values))(vox)        # (16, 2, 3)
h = 1e-6
Jfd = torch.stack([(trilinear(vol, vox + h * e).values - trilinear(vol, vox - h * e).values) / (2 * h)
                   for e in torch.eye(3)], -1)
report("d/dvox vs central FD, max abs err / max |J|", float((Jp - Jfd).abs().max() / Jp.abs().max()), 1e-8)

# 2. exactness on a linear field V = A p + beta
A = torch.randn(2, 3, generator=gen)
beta = torch.randn(2, generator=gen)
grid = torch.stack(torch.meshgrid(*[torch.arange(d, dtype=torch.float64) for d in dims], indexing="ij"), -1)
lin = grid @ A.T + beta
pts = torch.rand(64, 3, generator=gen) * (torch.tensor(dims, dtype=torch.float64) - 1)
val = trilinear(lin, pts).values
report("linear field: |s - (A p + beta)|", float((val - (pts @ A.T + beta)).abs().max()), 1e-12)
J = torch.func.vmap(torch.func.jacrev(lambda p: trilinear(lin, p).values))(pts)     # (64, 2, 3)
report("linear field: |ds/dp - A|", float((J - A).abs().max()), 1e-12)

# 3. edge clamp: p_x in (-0.5, 0) and (dim-1, dim-0.5) -> derivative along x is exactly 0
clamp_pts = torch.tensor([[-0.3, 1.4, 2.2], [4.3, 2.6, 0.7], [2.5, -0.2, 5.3]])
Jc = torch.func.jacrev(lambda p: trilinear(vol, p).values)(clamp_pts)               # (3, 2, 3, 3)
clamp_d = torch.stack([Jc[0, :, 0, 0], Jc[1, :, 1, 0], Jc[2, :, 2, 1], Jc[2, :, 2, 2]])
report("edge clamp: |ds/dp_a| on clamped axes", float(clamp_d.abs().max()), 0.0)

# 4. weight-cutoff band: autograd differentiates the implemented (corner-dropping) function
p0 = torch.tensor([2.0 + 1e-7, 1.5, 3.5])
g_auto = torch.func.jacrev(lambda p: trilinear(vol, p).values)(p0)                   # (2, 3)
b, f = torch.floor(p0).long(), p0 - torch.floor(p0)
g_impl = torch.zeros(2, 3)
g_full = torch.zeros(2, 3)
for o in itertools.product((0, 1), repeat=3):
    fac = [f[a] if o[a] else 1 - f[a] for a in range(3)]
    w = fac[0] * fac[1] * fac[2]
    for a in range(3):
        dw = (1 if o[a] else -1) * torch.prod(torch.stack([fac[k] for k in range(3) if k != a]))
        term = dw * vol[b[0] + o[0], b[1] + o[1], b[2] + o[2]]
        g_full[:, a] += term
        if w >= 1e-6:
            g_impl[:, a] += term
report("cutoff band: |autograd - derivative of implemented s|", float((g_auto - g_impl).abs().max()), 1e-12)
print(f"     (info) cutoff band: |autograd - unclipped trilinear derivative| = "
      f"{float((g_auto - g_full).abs().max()):.3e} (expected O(1): the dropped corners' slopes)")

finish("trilinear")
