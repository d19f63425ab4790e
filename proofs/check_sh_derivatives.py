"""Check proofs/sh_derivatives.md: sh_jet's tangent gradient / Hessian vs finite differences on the sphere,
at random directions and at / within 1e-9 of the z poles; symmetry, u in the kernel; basis vs DIPY."""
import numpy as np
import torch

from tractfunc.core import sh

from _checklib import failures, finish, report, unit  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)
TOL_FD = 1e-6     # relative, finite differences vs analytic
TOL_EXACT = 1e-12


gen = torch.Generator().manual_seed(0)
n_c, lmax = 12, 8
C = torch.randn(n_c, sh.n_coeffs(lmax), generator=gen)
special = torch.tensor([[0, 0, 1.0], [0, 0, -1.0], [1e-9, 0, 1], [0, -7e-10, -1], [6e-10, 6e-10, 1],
                        [-3e-10, 9e-10, -1]])
U = unit(torch.cat([special, torch.randn(8, 3, generator=gen)]))           # (14, 3)
cc = C[:, None, :].expand(-1, U.shape[0], -1)                               # (n_c, n_u, N)
uu = U[None].expand(n_c, -1, -1)

j = sh.sh_jet(cc, uu)
finite = all(bool(torch.isfinite(t).all()) for t in j)
report("non-finite entries in sh_jet (count)", 0.0 if finite else 1.0, 0.0)

# tangent frame (any orthonormal one; the claim is frame independent)
a = torch.where(uu[..., :1].abs() < 0.5, torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]))
e1 = unit(a - (a * uu).sum(-1, keepdim=True) * uu)
e2 = torch.linalg.cross(uu, e1, dim=-1)


def f_along(v, t):
    return sh.amplitude(cc, unit(uu + t * v))


def d1(v, h=1e-3):   # 4th-order central first derivative at t = 0
    return (-f_along(v, 2 * h) + 8 * f_along(v, h) - 8 * f_along(v, -h) + f_along(v, -2 * h)) / (12 * h)


def d2(v, h=1e-3):   # 4th-order central second derivative at t = 0
    return (-f_along(v, 2 * h) + 16 * f_along(v, h) - 30 * f_along(v, 0.0) + 16 * f_along(v, -h)
            - f_along(v, -2 * h)) / (12 * h * h)


g_an = torch.stack([(j.grad * e1).sum(-1), (j.grad * e2).sum(-1)], -1)                    # (n_c, n_u, 2)
g_fd = torch.stack([d1(e1), d1(e2)], -1)
E = torch.stack([e1, e2], -1)                                                             # (..., 3, 2)
H_an = E.transpose(-1, -2) @ j.hess @ E
s2 = 2 ** -0.5
q11, q22 = d2(e1), d2(e2)
q_plus, q_minus = d2((e1 + e2) * s2), d2((e1 - e2) * s2)
H12 = (q_plus - q_minus) / 2            # v^T H v for v = (e1 +- e2)/sqrt2: (H11 + H22)/2 +- H12
H_fd = torch.stack([torch.stack([q11, H12], -1), torch.stack([H12, q22], -1)], -2)


def rel(fd, an, dims):
    err = (fd - an).abs().amax(dims)
    scale = an.abs().amax(dims).clamp(min=1e-3)
    return err / scale


pole = slice(0, special.shape[0])
report("grad vs FD, max rel err (all directions)", float(rel(g_fd, g_an, -1).max()), TOL_FD)
report("grad vs FD, max rel err (at/near poles)", float(rel(g_fd, g_an, -1)[:, pole].max()), TOL_FD)
report("hess vs FD, max rel err (all directions)", float(rel(H_fd, H_an, (-1, -2)).max()), TOL_FD)
report("hess vs FD, max rel err (at/near poles)", float(rel(H_fd, H_an, (-1, -2))[:, pole].max()), TOL_FD)
# negative control: dropping the curvature term -(u.dF)P must be detected by the same FD comparison
_, dB, d2B = sh._jet(uu, lmax, order=2)
dF = torch.einsum("...k,...ki->...i", cc, dB)
P = torch.eye(3) - uu.unsqueeze(-1) * uu.unsqueeze(-2)
H_naive = E.transpose(-1, -2) @ (P @ torch.einsum("...k,...kij->...ij", cc, d2B) @ P) @ E
naive_err = float(rel(H_fd, H_naive, (-1, -2)).max())
print(f"     (control) hess without the -(u.dF)P term vs FD, max rel err: {naive_err:.3e} (must be > 1e-2)")
if not naive_err > 1e-2:
    failures.append("negative control")
hs = j.hess.abs().amax((-1, -2))
report("hess symmetry |H - H^T| / |H|", float(((j.hess - j.hess.transpose(-1, -2)).abs().amax((-1, -2)) / hs).max()),
       TOL_EXACT)
report("|hess u| / |H|", float(((j.hess @ uu.unsqueeze(-1)).squeeze(-1).abs().amax(-1) / hs).max()), TOL_EXACT)
report("|grad . u| / |grad|", float(((j.grad * uu).sum(-1).abs() / j.grad.abs().amax(-1).clamp(min=1e-3)).max()),
       TOL_EXACT)

# basis vs DIPY real_sh_tournier (MRtrix3 convention, legacy=False)
from dipy.reconst.shm import real_sh_tournier  # noqa: E402

u_np = U.numpy()
theta = np.arctan2(np.hypot(u_np[:, 0], u_np[:, 1]), u_np[:, 2])
phi = np.arctan2(u_np[:, 1], u_np[:, 0])
ref, _, _ = real_sh_tournier(lmax, theta, phi, legacy=False)
report("basis vs dipy real_sh_tournier, max abs err", float(np.abs(sh.basis(U, lmax).numpy() - ref).max()),
       TOL_EXACT)
amp_ref = torch.as_tensor(ref) @ C.T                                        # (n_u, n_c)
report("amplitude vs dipy, max abs err / max |amp|",
       float((sh.amplitude(cc, uu).T - amp_ref).abs().max() / amp_ref.abs().max()), TOL_EXACT)

finish("sh_derivatives")
