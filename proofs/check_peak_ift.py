"""Check proofs/peak_ift.md: the implicit-function-theorem derivative of the FOD peak (attach_peak)."""
import torch
from torch.func import jacfwd, jacrev, vmap

from tractfunc.core import sh
from tractfunc.core.newton import peak, tangent_newton
from tractfunc.core.implicit import attach_peak

from _checklib import failures, finish, report, unit  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)


N = sh.n_coeffs(8)
gen = torch.Generator().manual_seed(3)

# FOD-like coefficient vectors: two sharp lobes plus noise, fitted on a dense sphere grid
grid = unit(torch.randn(3000, 3, generator=gen))
Bg = sh.basis(grid, 8)
B = 8
lobes = unit(torch.randn(B, 2, 3, generator=gen))
amp_grid = sum(torch.exp(-8 * (1 - (grid @ lobes[:, i].T).T ** 2)) * (1.0 - 0.4 * i) for i in range(2))
C = torch.linalg.lstsq(Bg, amp_grid.T).solution.T + 0.02 * torch.randn(B, N, generator=gen)
u0 = unit(lobes[:, 0] + 0.3 * torch.randn(B, 3, generator=gen))

p = peak(C, u0, None, polish_iter=4)                     # exact peak (polished), no graph
j = sh.sh_jet(C, p.dir)
reg = tangent_newton(j.grad, j.hess, p.dir).regular
print(f"     {int(reg.sum())}/{B} peaks regular, max |grad f(u*)| = {float(j.grad.abs().max()):.1e}")
if int(reg.sum()) < B:
    failures.append("test peaks not all regular (choose other coefficients)")


def ift_dir(c, u, a):
    return attach_peak(c, u, a).dir


def ift_amp(c, u, a):
    return attach_peak(c, u, a).amp


def unrolled(c, v):
    for _ in range(10):
        jj = sh.sh_jet(c, v)
        v = unit(v + tangent_newton(jj.grad, jj.hess, v).delta)
    return v


v0 = peak(C, u0, None).dir                                # MRtrix-tolerance result (1e-4 rad), detached
J_ift = vmap(jacrev(ift_dir))(C, p.dir, p.amp)            # (B, 3, N)
J_fwd = vmap(jacfwd(ift_dir))(C, p.dir, p.amp)
J_unr = vmap(jacrev(unrolled))(C, v0)
report("jacrev(IFT) vs jacrev(10 unrolled full-Newton iterations), max abs", float((J_ift - J_unr).abs().max()),
       1e-8)
report("jacfwd(IFT) vs jacrev(IFT), max abs", float((J_fwd - J_ift).abs().max()), 1e-12)

# frame independence: -E H2^-1 E^T = -pinv(Hess) on the tangent plane (Hess u = 0, invertible on T_u)
_, dB, _ = sh._jet(p.dir, 8, order=1)                      # dF/dc: (B, N, 3)
P = torch.eye(3) - p.dir.unsqueeze(-1) * p.dir.unsqueeze(-2)
dgrad_dc = P @ dB.transpose(-1, -2)                        # (B, 3, N): d grad / dc
J_pinv = -torch.linalg.pinv(j.hess, hermitian=True) @ dgrad_dc
report("jacrev(IFT) vs -pinv(Hess) dgrad/dc (frame-free form), max abs", float((J_ift - J_pinv).abs().max()),
       1e-10)

# central finite differences of the polished peak, full Jacobian
h = 1e-6
Cp = C[:, None, :] + h * torch.eye(N)                     # (B, N, N)
Cm = C[:, None, :] - h * torch.eye(N)
start = p.dir[:, None, :].expand(-1, N, -1)
pp, pm = peak(Cp, start, None, polish_iter=4), peak(Cm, start, None, polish_iter=4)
J_fd = (pp.dir - pm.dir) / (2 * h)
J_fd = J_fd.transpose(-1, -2)                              # (B, 3, N)
report("jacrev(IFT) vs central FD of peak(polish_iter=4), rel (max abs / max |J|)",
       float((J_ift - J_fd).abs().max() / J_ift.abs().max()), 1e-6)

# envelope rule: d amp / dc = Y(u*)
J_amp = vmap(jacrev(ift_amp))(C, p.dir, p.amp)
report("d amp/dc vs basis Y(u*), max abs", float((J_amp - sh.basis(p.dir, 8)).abs().max()), 1e-14)
a_fd = (pp.amp - pm.amp) / (2 * h)
report("d amp/dc vs central FD, max abs", float((J_amp - a_fd).abs().max()), 1e-8)

# forward value is the input bit for bit (with a graph attached)
Cg = C.clone().requires_grad_(True)
q = attach_peak(Cg, p.dir, p.amp)
bit = torch.equal(q.dir, p.dir) and torch.equal(q.amp, p.amp) and q.dir.requires_grad
report("attach_peak forward differs from (u*, amp*) bit for bit (0 = equal)", 0.0 if bit else 1.0, 0.0)

# degenerate points
flat = torch.zeros(N)
flat[0] = 1.0
uf = unit(torch.tensor([0.3, -0.2, 0.9]))
pf = peak(flat, uf, None, polish_iter=4)
Jf = jacrev(ift_dir)(flat, pf.dir, pf.amp)
Jfa = jacrev(ift_amp)(flat, pf.dir, pf.amp)
report("flat field (l=0 only): |d dir/dc| (must be 0, finite)",
       float(Jf.abs().max()) if torch.isfinite(Jf).all() else float("inf"), 0.0)
report("flat field: |d amp/dc - Y(u)|", float((Jfa - sh.basis(pf.dir, 8)).abs().max()), 1e-14)

saddle = torch.zeros(N)
saddle[5] = 1.0        # Y_{2,2} ~ x^2 - y^2: critical point at the pole with an indefinite Hessian
pole = torch.tensor([0.0, 0.0, 1.0])
Js = jacrev(ift_dir)(saddle, pole, sh.amplitude(saddle, pole))
report("saddle at pole: |d dir/dc| (must be 0)", float(Js.abs().max()), 0.0)

# documented rule (direction.REL_EPS, implicit.py docstring): eigenvalue ratio of H2 below 1e-6 counts as
# singular -> zero derivative.  Build a maximum at the pole whose H2 eigenvalue ratio is ~5e-10:
# zonal lobe (isotropic H2 = -alpha I at the pole) + Y_{2,2} (H2 = beta diag(1, -1), no gradient there).
lobe = torch.zeros(N)
for l in range(0, 9, 2):
    lobe[l * (l + 1) // 2] = ((2 * l + 1) / (4 * torch.pi)) ** 0.5
alpha = -float(sh.sh_jet(lobe, pole).hess[0, 0])
beta22 = float(sh.sh_jet(saddle, pole).hess[0, 0])          # Hessian of Y_{2,2} at the pole: diag(b, -b, 0)
flatish = lobe + saddle * (alpha * (1 - 1e-9) / beta22)
ev = torch.linalg.eigvalsh(sh.sh_jet(flatish, pole).hess[:2, :2])
ratio = float(ev.abs().min() / ev.abs().max())
Jd = jacrev(ift_dir)(flatish, pole, sh.amplitude(flatish, pole))
print(f"     (info) near-flat peak at the pole: H2 eigenvalues {ev.tolist()}, ratio {ratio:.1e} < REL_EPS = 1e-6")
report("near-flat peak (eigenvalue ratio < 1e-6): |d dir/dc| (documented: 0)", float(Jd.abs().max()), 0.0)

nan_dir = torch.full((3,), float("nan"))
Jn = jacrev(ift_dir)(C[0], nan_dir, torch.tensor(float("nan")))
report("NaN direction: |d dir/dc| (must be 0, finite)",
       float(Jn.abs().max()) if torch.isfinite(Jn).all() else float("inf"), 0.0)

# a regular peak exactly at the z pole: zonal lobe + |m| >= 2 terms (their gradient vanishes at the pole)
ls, ms, neg, _ = sh._tables(8)
cz = torch.zeros(N)
for l in range(0, 9, 2):
    cz[l * (l + 1) // 2] = ((2 * l + 1) / (4 * torch.pi)) ** 0.5
am2 = torch.as_tensor(ms >= 2)
cz = cz + 0.05 * torch.randn(N, generator=gen) * am2
pz = peak(cz, pole, None, polish_iter=4)
report("pole peak: |u* - (0,0,1)|", float((pz.dir - pole).abs().max()), 0.0)
Jz = jacrev(ift_dir)(cz, pz.dir, pz.amp)
Jz_unr = jacrev(unrolled)(cz, pole)
print(f"     (info) pole peak: max |d dir/dc| = {float(Jz.abs().max()):.3e}")
report("pole peak: jacrev(IFT) vs unrolled Newton, max abs (finite)",
       float((Jz - Jz_unr).abs().max()) if torch.isfinite(Jz).all() else float("inf"), 1e-8)

finish("peak_ift")
