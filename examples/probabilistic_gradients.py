"""Gradients through probabilistic tracking: Gumbel-softmax and REINFORCE against the exact gradient.

Problem: a 4 x 4 x 4 voxel SH volume (lmax 4, two crossing fibres plus noise; synthetic, no data needed), a
one- or two-step path from a fixed seed, each step 0.5 voxel along a direction drawn by the iFOD1-like getter
(:func:`tractfunc.local.probabilistic.ifod1` weights: FOD amplitude in a 40 degree cone, on a Fibonacci sphere),
loss ``f = |p_2 - target|^2`` of the end point.  The expected loss ``E[f]`` is a smooth function of the SH
coefficients and is computed *exactly* by enumerating every path on the grid (V or V^2 paths), so its
gradient is known: by autograd through the enumeration, checked by central finite differences along
random directions in coefficient space.

Estimators of ``d E[f] / d SH`` from K sampled paths, repeated R times with fresh random numbers:

* REINFORCE (score function) with a leave-one-out baseline, and without a baseline;
* Gumbel-softmax at several temperatures T: soft (the direction is the normalised Gumbel-softmax mean of
  the vertices) and straight-through (forward = an exact sample, backward = the soft derivative).

Reported per estimator (relative to the exact gradient's norm): bias ``|mean - exact|`` (with REINFORCE's
noise floor ``std / sqrt(R)``) and the standard deviation of one estimate.  Writes
``probabilistic_gradients.png`` and a final JSON line.
Run: ``python examples/probabilistic_gradients.py [--quick] [--out DIR]`` (``--data`` is not used).
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from tractfunc.local import probabilistic as pr
from tractfunc.core import sh

# examples/ is on sys.path when run as ``python examples/<name>.py``
from _common import base_parser, parse_args, pyplot, save_figure

STEP, ANGLE = 0.5, 40.0                                   # voxels, degrees
SEED_POS = torch.tensor([1.4, 1.6, 1.3], dtype=torch.float64)
SEED_DIR = torch.nn.functional.normalize(torch.tensor([1.0, 0.4, 0.2], dtype=torch.float64), dim=0)
TARGET = torch.tensor([2.2, 1.9, 1.4], dtype=torch.float64)


def make_volume(gen: torch.Generator, lmax: int = 4) -> torch.Tensor:
    """(4, 4, 4, N) float64: two crossing fibres (x and 60 degrees from it) plus 5 % noise per voxel."""
    fibres = torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0]], dtype=torch.float64)
    l = torch.tensor(sh._tables(lmax)[0], dtype=torch.float64)
    weights = torch.tensor([0.6, 0.4], dtype=torch.float64)[:, None]
    fod = (weights * sh.basis(fibres, lmax)).sum(0) * torch.exp(-l * (l + 1) / 40)
    noise = torch.randn(4, 4, 4, len(l), generator=gen, dtype=torch.float64)
    return fod + 0.05 * fod[0] * 3.5 * noise


def loss_of(p2: torch.Tensor) -> torch.Tensor:
    return ((p2 - TARGET) ** 2).sum(-1)


def forward(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Vertices v (..., V, 3) flipped to point along d (..., 3)."""
    return torch.where(((v * d.unsqueeze(-2)).sum(-1) > 0).unsqueeze(-1), v, -v)


def exact_expected_loss(vol: torch.Tensor, sphere, n_steps: int) -> torch.Tensor:
    """E[f] over all V^n_steps paths, n_steps 1 or 2 (a path whose second step has no candidate ends at p_1)."""
    g = pr.ifod1(vol, max_angle=ANGLE, cutoff=0.0, sphere=sphere, sh_basis="mrtrix")
    verts = g.vertices
    w0, _, _ = g.weights(SEED_POS[None], SEED_DIR[None])
    p0 = w0[0] / w0[0].sum()                                            # (V,)
    d1 = forward(verts, SEED_DIR)                                       # (V, 3)
    pos1 = SEED_POS + STEP * d1
    if n_steps == 1:
        return (p0 * loss_of(pos1)).sum()
    w1, _, _ = g.weights(pos1, d1)                                      # (V, V)
    tot = w1.sum(-1, keepdim=True)
    q = w1 / torch.where(tot > 0, tot, torch.ones_like(tot))
    pos2 = pos1.unsqueeze(1) + STEP * forward(verts.unsqueeze(0), d1)   # (V, V, 3)
    inner = torch.where(tot[:, 0] > 0, (q * loss_of(pos2)).sum(-1), loss_of(pos1))
    return (p0 * inner).sum()


def walk(step, K: int, n_steps: int):
    """K paths of n_steps from the seed; step(pos, dir) -> (dir, ok, log_prob); a path stops where not ok.
    Returns (end points (K, 3), summed log probabilities (K,))."""
    pos, d = SEED_POS.expand(K, 3), SEED_DIR.expand(K, 3)
    alive = torch.ones(K, dtype=torch.bool)
    log_prob = torch.zeros(K, dtype=torch.float64)
    for _ in range(n_steps):
        nd, ok, lp = step(pos, d)
        ok = ok & alive
        pos = torch.where(ok.unsqueeze(-1), pos + STEP * nd, pos)
        d = torch.where(ok.unsqueeze(-1), nd, d)
        log_prob = log_prob + torch.where(ok, lp, torch.zeros_like(lp))
        alive = ok
    return pos, log_prob


def reinforce(vol, sphere, K, gen, n_steps, baseline=True) -> torch.Tensor:
    g = pr.ifod1(vol, max_angle=ANGLE, cutoff=0.0, sphere=sphere, sh_basis="mrtrix")

    def step(pos, d):
        r = g.draw(pos, d, gen)
        return r.dir, r.ok, r.log_prob
    end, log_prob = walk(step, K, n_steps)
    loss = loss_of(end)
    base = pr.leave_one_out_baseline(loss) if baseline else torch.zeros_like(loss)
    return torch.autograd.grad(pr.score_function_surrogate(loss, log_prob, base).mean(), vol)[0]


def gumbel(vol, sphere, K, gen, n_steps, temperature, hard) -> torch.Tensor:
    g = pr.gumbel(vol, max_angle=ANGLE, temperature=temperature, hard=hard, cutoff=0.0, sphere=sphere,
                  sh_basis="mrtrix")
    end, _ = walk(lambda p, d: (*g(p, d, gen), torch.zeros(len(p), dtype=torch.float64)), K, n_steps)
    return torch.autograd.grad(loss_of(end).mean(), vol)[0]


def summarize(estimates: list, exact: torch.Tensor) -> dict:
    """Relative bias |mean - exact|, its noise floor std/sqrt(R), and the std of one estimate."""
    E = torch.stack([e.reshape(-1) for e in estimates])
    ref = exact.reshape(-1)
    scale = float(ref.norm())
    mean = E.mean(0)
    std = float(((E - mean) ** 2).sum(-1).mean().sqrt()) / scale
    return dict(rel_bias=float((mean - ref).norm()) / scale, rel_bias_floor=std / math.sqrt(len(E)), rel_std=std,
                cosine_of_mean=float((mean * ref).sum() / (mean.norm() * ref.norm())))


def study(vol, sphere, n_steps: int, K: int, R: int, temps: list, n_fd: int, gen) -> dict:
    """Exact gradient (checked by FD) and every estimator's bias/std for paths of n_steps."""
    E = exact_expected_loss(vol, sphere, n_steps)
    exact = torch.autograd.grad(E, vol)[0]
    h, fd_err = 1e-5, []
    for _ in range(n_fd):            # central differences of the exact E along random unit directions
        delta = torch.randn(vol.shape, generator=gen, dtype=torch.float64)
        delta /= delta.norm()
        with torch.no_grad():
            fd = (exact_expected_loss(vol + h * delta, sphere, n_steps)
                  - exact_expected_loss(vol - h * delta, sphere, n_steps)) / (2 * h)
        fd_err.append(abs(float(fd) - float((exact * delta).sum())) / float(exact.norm()))
    est = {"reinforce_loo": summarize([reinforce(vol, sphere, K, gen, n_steps) for _ in range(R)], exact),
           "reinforce_no_baseline": summarize([reinforce(vol, sphere, K, gen, n_steps, baseline=False)
                                               for _ in range(R)], exact)}
    for T in temps:
        for hard in (False, True):
            est[f"gumbel_{'st' if hard else 'soft'}_T{T:g}"] = summarize(
                [gumbel(vol, sphere, K, gen, n_steps, T, hard) for _ in range(R)], exact)
    n_paths = sphere.vertices.shape[0] ** n_steps
    print(f"\n{n_steps}-step paths: E[f] = {float(E.detach()):.6f} over {n_paths} paths; |grad| = "
          f"{float(exact.norm()):.4f}; autograd vs central FD along {n_fd} directions: "
          f"max rel. error {max(fd_err):.2e}")
    print(f"{K} paths per estimate, {R} estimates each; relative to |exact gradient|:")
    print(f"{'estimator':<26}{'bias':>9}{'(floor)':>9}{'std':>9}{'cos(mean)':>11}")
    for name, r in est.items():
        print(f"{name:<26}{r['rel_bias']:9.3f}{r['rel_bias_floor']:9.3f}{r['rel_std']:9.3f}{r['cosine_of_mean']:11.3f}")
    return dict(expected_loss=float(E.detach()), grad_norm=float(exact.norm()), fd_max_rel_error=max(fd_err),
                estimators=est)


def main(argv=None):
    args = parse_args(base_parser(__doc__), argv)
    t_start = time.perf_counter()
    n_vertices, K, R, temps, n_fd = (150, 64, 24, [0.1, 1.0], 3) if args.quick else \
        (300, 128, 200, [0.01, 0.03, 0.1, 0.3, 1.0], 6)
    gen = torch.Generator().manual_seed(0)
    sphere = pr.fibonacci_sphere(n_vertices)
    vol = make_volume(gen).requires_grad_(True)
    steps = {str(n): study(vol, sphere, n, K, R, temps, n_fd, gen) for n in (1, 2)}
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "probabilistic_gradients.png")
    plot(steps, temps, K, R, png)
    result = dict(n_vertices=n_vertices, paths_per_estimate=K, repeats=R, temperatures=temps, steps=steps,
                  fd_max_rel_error=max(s["fd_max_rel_error"] for s in steps.values()),
                  wall_s=round(time.perf_counter() - t_start, 2), figure=png)
    print(f"figure: {png}")
    print(json.dumps(result))


def plot(steps: dict, temps: list, K: int, R: int, png: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for row, (n, res) in enumerate(steps.items()):
        results = res["estimators"]
        for ax, key, title in [(axes[row, 0], "rel_bias", "bias |E[est] - grad| / |grad|"),
                               (axes[row, 1], "rel_std", "std of one estimate / |grad|")]:
            for kind, marker in [("soft", "o-"), ("st", "s-")]:
                rows = [results[f"gumbel_{kind}_T{T:g}"] for T in temps]
                err = [r["rel_bias_floor"] for r in rows] if key == "rel_bias" else None   # noise level of the bias
                ax.errorbar(temps, [r[key] for r in rows], yerr=err, fmt=marker, capsize=3,
                            label=f"Gumbel-softmax ({'straight-through' if kind == 'st' else 'soft'})")
            for name, ls in [("reinforce_loo", "--"), ("reinforce_no_baseline", ":")]:
                ax.axhline(results[name][key], color="k", ls=ls, label=name.replace("_", " "))
            if key == "rel_bias":
                ax.axhline(results["reinforce_loo"]["rel_bias_floor"], color="grey", lw=0.8,
                           label="noise level of a zero bias (REINFORCE LOO); bars: same for Gumbel")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("temperature T")
            ax.set_title(f"{n} step{'s' if n != '1' else ''}: {title}", fontsize=10)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"d E[loss] / d SH, probabilistic paths: estimators vs the exact gradient ({K} paths x {R} repeats)")
    save_figure(fig, png)


if __name__ == "__main__":
    main()
