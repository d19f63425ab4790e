"""Check proofs/maps_soft.md: gradients of tractfunc.maps' soft operators (autograd vs central differences in
float64) and their limits to the hard forms."""
import numpy as np
import torch

from tractfunc.maps import connectome, density, sample_stat, soft_connectome, soft_density, soft_stat

from _checklib import finish, report  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)
AFF = np.array([[-1.5, 0, 0, 12.0], [0, 1.5, 0, -4.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1.0]])
DIMS = (10, 10, 8)
rng = np.random.default_rng(0)


def tracks(n, steps=(3, 12), jitter=0.02):
    vs, ls = [], []
    for _ in range(n):
        m = int(rng.integers(*steps))
        p0 = AFF[:3, :3] @ (rng.uniform(0.2, 0.8, 3) * (np.array(DIMS) - 1)) + AFF[:3, 3]
        d = rng.normal(size=3)
        vs.append(p0 + np.cumsum(d / np.linalg.norm(d) * 0.4 + jitter * rng.normal(size=(m, 3)), 0))
        ls.append(m)
    return torch.tensor(np.concatenate(vs)), torch.tensor(ls)


def fd_check(name, f, x, proj, h=1e-6, tol=1e-6):
    """Directional derivative along proj: autograd vs central difference, relative error."""
    x = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(f(x), x)
    auto = float((g * proj).sum())
    fd = float((f(x.detach() + h * proj) - f(x.detach() - h * proj)) / (2 * h))
    report(f"{name}: |autograd - central FD| / |FD|", abs(auto - fd) / max(abs(fd), 1e-12), tol)


v, ln = tracks(4)
w = torch.tensor([0.5, 1.0, 1.5, 2.0])
R = torch.randn(*DIMS, generator=torch.Generator().manual_seed(1))
R3 = torch.randn(*DIMS, 3, generator=torch.Generator().manual_seed(2))
dv = torch.randn_like(v)
for mode in ("count", "ends", "length"):
    fd_check(f"soft_density {mode} d/dvertices", lambda x: (soft_density((x, ln), AFF, DIMS, mode=mode, weights=w,
                                                                      tau=0.2) * R).sum(), v, dv)
    fd_check(f"soft_density {mode} d/dweights", lambda y: (soft_density((v, ln), AFF, DIMS, mode=mode, weights=y,
                                                                     tau=0.2) * R).sum(), w, torch.randn(4))
fd_check("soft_density dec d/dvertices", lambda x: (soft_density((x, ln), AFF, DIMS, dec=True, tau=0.2) * R3).sum(),
         v, dv)

# limits: counts and ends exactly, lengths within the midpoint rule
vl, ll = tracks(30, (2, 40))
vl = vl.float().double()    # float32-representable vertices: the hard map reads float32
for mode in ("count", "ends"):
    hard = density((vl, ll), AFF, DIMS, mode=mode)
    err = float((soft_density((vl, ll), AFF, DIMS, mode=mode, tau=1e-6) - hard).abs().max())
    report(f"soft_density {mode}, tau=1e-6: max |soft - hard|", err, 1e-6)
hard = density((vl, ll), AFF, DIMS, mode="length")
err = float((soft_density((vl, ll), AFF, DIMS, mode="length", tau=1e-6, subdivide=16) - hard).abs().sum() / hard.sum())
report("soft_density length, tau=1e-6, 16 parts: sum |soft - hard| / sum hard", err, 1e-2)

# soft statistics
img = torch.rand(*DIMS, generator=torch.Generator().manual_seed(3))
for stat in ("mean", "min", "max"):
    fd_check(f"soft_stat {stat} d/dvertices", lambda x: (soft_stat((x, ln), img, AFF, stat, temperature=0.05)
                                                      * torch.arange(1.0, 5.0)).sum(), v, dv)
    fd_check(f"soft_stat {stat} d/dimage", lambda y: soft_stat((v, ln), y, AFF, stat, temperature=0.05).sum(), img,
             torch.randn_like(img))
for stat in ("min", "max"):
    hard = sample_stat((vl, ll), img, AFF, stat)
    n = ll.double()
    err = float(((soft_stat((vl, ll), img, AFF, stat, temperature=1e-3) - hard).abs() / (1e-3 * torch.log(n))).max())
    report(f"soft_stat {stat}: max |soft - hard| / (T log n) (bound 1)", err, 1.0 + 1e-9)

# soft connectome
lab = torch.zeros(DIMS, dtype=torch.long)
lab[:5, :, :4], lab[5:, :, :4], lab[:, :5, 4:], lab[:, 5:, 4:] = 1, 2, 3, 4
lab[3:7, 3:7, 2:6] = 0
P = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))
for mode in ("radial", "end_voxels"):
    f = lambda x: (soft_connectome((x, ln), lab, AFF, assignment=mode, weights=w, sigma=0.7,  # noqa: E731
                                   scale_length=True) * P).sum()
    fd_check(f"soft_connectome {mode} d/dvertices", f, v, dv)
    hard = connectome((vl, ll), lab, AFF, assignment=mode)
    err = float((soft_connectome((vl, ll), lab, AFF, assignment=mode, sigma=1e-7) - hard).abs().max())
    report(f"soft_connectome {mode}, sigma=1e-7: max |soft - hard|", err, 1e-6)
fd_check("soft_connectome d/dweights", lambda y: (soft_connectome((v, ln), lab, AFF, weights=y, sigma=0.7) * P).sum(),
         w, torch.randn(4))
finish("maps soft-operator")
