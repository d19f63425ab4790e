"""Check proofs/probabilistic_estimators.md: score-function identity, log-pmf gradient, leave-one-out
baseline, Gumbel-max, straight-through and the Gumbel-softmax T -> 0 bound."""
import math

import torch

from tractfunc.local import probabilistic as pr
from tractfunc.core import sh

from _checklib import finish, report, unit  # proofs/ is on sys.path (run as a script)

torch.set_default_dtype(torch.float64)
gen = torch.Generator().manual_seed(3)

# a small SH volume (lmax 4) with crossing-fibre lobes plus noise, one position inside a cell
lmax = 4
fib = unit(torch.tensor([[1.0, 0.2, 0.0], [0.4, 1.0, 0.1]]))
l = torch.tensor(sh._tables(lmax)[0], dtype=torch.float64)
lobe = (sh.basis(fib, lmax) * torch.tensor([[0.6], [0.4]])).sum(0) * torch.exp(-l * (l + 1) / 30)
vol = (lobe + 0.02 * torch.randn(3, 3, 3, len(l), generator=gen)).requires_grad_(True)
pos = torch.tensor([[1.3, 0.7, 1.2]])
prev = unit(torch.tensor([[1.0, 0.5, 0.1]]))
sphere = pr.fibonacci_sphere(120)
target = torch.tensor([0.3, -0.2, 0.9])


def setting(power, cutoff):
    g = pr.ifod1(vol, max_angle=55, cutoff=cutoff, power=power, sphere=sphere, sh_basis="mrtrix")
    w, d, _ = g.weights(pos, prev)
    signed = torch.where((sphere.vertices @ prev[0] > 0)[:, None], sphere.vertices, -sphere.vertices)
    # f depends on theta directly too (through the interpolated SH's first coefficient): a pathwise part
    c0 = vol[1, 0, 1, 0]
    f = ((signed - target) ** 2).sum(-1) * (1 + c0)
    return w[0], f


# 1. score-function identity, exact by enumeration
for power, cutoff in [(1.0, 0.0), (1.7, 0.05)]:
    w, f = setting(power, cutoff)
    p = w / w.sum()
    exact = torch.autograd.grad((p * f).sum(), vol)[0]
    for b in (0.0, 1.3, -4.0):
        w, f = setting(power, cutoff)
        lp = pr.log_pmf(w)
        act = w > 0
        p = (w / w.sum()).detach()
        sur = pr.score_function_surrogate(f[act], lp[act], torch.full_like(f[act], b))
        est = torch.autograd.grad((p[act] * sur).sum(), vol)[0]
        report(f"sum_i p_i grad[f_i + (f_i - b) log p_i] == grad E[f] (power {power}, cutoff {cutoff}, b {b})",
               float((est - exact).abs().max() / exact.abs().max()), 1e-12)
    report(f"some vertices excluded by cone/cutoff (power {power}, cutoff {cutoff}): fraction kept",
           float((w > 0).double().mean()), 0.9)

# 2. grad log p_i = power grad a_i / a_i - grad Z / Z
w, _ = setting(1.7, 0.05)
i = int(torch.nonzero(w > 0)[3])
g_auto = torch.autograd.grad(pr.log_pmf(w)[i], vol)[0]
w, _ = setting(1.7, 0.05)
a_i = w[i] ** (1 / 1.7)
Z = w.sum()
g_a = torch.autograd.grad(a_i, vol, retain_graph=True)[0]
g_Z = torch.autograd.grad(Z, vol)[0]
g_formula = 1.7 * g_a / a_i - g_Z / Z
report("autograd grad log p_i vs power*grad a/a - grad Z/Z (max rel)",
       float(((g_auto - g_formula).abs().max() / g_formula.abs().max()).detach()), 1e-12)

# 3. leave-one-out baseline (K = 2): expectation over all ordered pairs equals grad E[f]
w, f = setting(1.0, 0.0)
p = w / w.sum()
exact = torch.autograd.grad((p * f).sum(), vol)[0]
w, f = setting(1.0, 0.0)
act = torch.nonzero(w > 0)[:, 0]
lp = pr.log_pmf(w)[act]
fa, pa = f[act], (w / w.sum())[act].detach()
# pair (i, j): draw 1 = i with baseline f_j, draw 2 = j with baseline f_i; estimator = mean of the two
F1, F2 = fa[:, None].expand(-1, len(act)), fa[None, :].expand(len(act), -1)
L1, L2 = lp[:, None].expand(-1, len(act)), lp[None, :].expand(len(act), -1)
loss = torch.stack([F1, F2])
base = pr.leave_one_out_baseline(loss, dim=0)
sur = pr.score_function_surrogate(loss, torch.stack([L1, L2]), base).mean(0)
est = torch.autograd.grad((pa[:, None] * pa[None, :] * sur).sum(), vol)[0]
report("E over all pairs of the leave-one-out estimator == grad E[f] (max rel)",
       float((est - exact).abs().max() / exact.abs().max()), 1e-12)

# 4. Gumbel-max: P[argmax(log w + g) = i] = w_i / Z by quadrature of the integral in the derivation
w = torch.tensor([0.5, 1.7, 0.0, 3.2, 0.05])
ell = pr.safe_log(w)
t = torch.linspace(-12, 30, 400001)
dt = t[1] - t[0]
probs = []
for i in range(len(w)):
    if w[i] == 0:
        probs.append(torch.tensor(0.0))
        continue
    s = t - ell[i]
    dens = torch.exp(-s - torch.exp(-s))
    others = torch.exp(-(torch.exp(-(t[:, None] - ell[None, :])) * (torch.arange(len(w)) != i)).sum(-1))
    probs.append((dens * others).sum() * dt)
report("Gumbel-max quadrature vs w_i / Z (max abs)", float((torch.stack(probs) - w / w.sum()).abs().max()), 1e-9)

noise = pr.gumbel_noise((50000, 5), gen, w)
y_hard = pr.gumbel_softmax_weights(w.expand(50000, 5), noise, 0.5, hard=True)
freq = y_hard.mean(0)
report("Gumbel-max sampling frequencies vs w / Z, 50 000 draws (max abs; ~4 sigma)",
       float((freq - w / w.sum()).abs().max()), 4 * math.sqrt(0.25 / 50000))
report("zero-weight vertex never drawn", float(y_hard[:, 2].sum()), 0.0)

# straight-through: forward = one-hot of the argmax, backward = soft
wv = (w + 0.0).requires_grad_(True)
nz = noise[:7]
hard = pr.gumbel_softmax_weights(wv.expand(7, 5), nz, 0.3, hard=True)
soft = pr.gumbel_softmax_weights(wv.expand(7, 5), nz, 0.3, hard=False)
onehot = torch.nn.functional.one_hot((pr.safe_log(w) + nz).argmax(-1), 5).double()
report("straight-through forward == one-hot argmax", float((hard - onehot).abs().max().detach()), 1e-15)
cvec = torch.randn(7, 5, generator=gen)
gh = torch.autograd.grad((hard * cvec).sum(), wv)[0]
gs = torch.autograd.grad((soft * cvec).sum(), wv)[0]
report("straight-through backward == soft backward", float((gh - gs).abs().max()), 1e-12)

# 5. T -> 0: 1 - y_max <= (V - 1) exp(-gap / T); finite gradients at zero weights / empty rows
w = torch.rand(200, 30, generator=gen) * (torch.rand(200, 30, generator=gen) > 0.3)
w[0] = 0.0                                                            # an empty row
noise = pr.gumbel_noise(w.shape, gen, w)
z = pr.safe_log(w) + noise
top2 = z.topk(2, -1).values
gap = top2[:, 0] - top2[:, 1]
worst = 0.0
for T in (0.3, 0.1, 0.03):
    y = pr.gumbel_softmax_weights(w[1:], noise[1:], T)
    bound = (w[1:] > 0).sum(-1) * torch.exp(-gap[1:] / T)
    worst = max(worst, float((1 - y.max(-1).values - bound).max()))
report("1 - y_max - (V-1) exp(-gap/T) over T in {0.3, 0.1, 0.03} (must be <= 0)", max(worst, 0.0), 1e-15)
wv = w.clone().requires_grad_(True)
y = pr.gumbel_softmax_weights(wv, noise, 0.05)
gw = torch.autograd.grad((y * torch.randn(y.shape, generator=gen)).sum(), wv)[0]
report("Gumbel-softmax: empty row gives y = 0", float(y[0].abs().max().detach()), 0.0)
report("Gumbel-softmax gradient non-finite entries", float((~torch.isfinite(gw)).sum()), 0.0)

finish("probabilistic estimator")
