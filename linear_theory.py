"""linear_theory.py: the linear-model theory of two seed papers, checked numerically claim by claim.

    python linear_theory.py [--json out.json] [--plots DIR]

prints one row per claim (claim, predicted, measured, tolerance, PASS/FAIL) and exits 1 if any fails.

1. RC-MAE's conditional momentum (Lee et al., ICLR 2023, Proposition 4.1): a linear student theta and its
   EMA teacher phi see the same masked inputs X_t. With the student step theta_{t+1} = theta_t + dtheta_t
   and phi_{t+1} = a phi_t + (1 - a) theta_{t+1}, phi_0 = theta_0:
       theta_t - phi_t = sum_{k=1..t} a^k dtheta_{t-k}                                  (any optimizer)
       grad L_c(t) = (sum_k a^k dtheta_{t-k}) X_t X_t^T / B,   L_c = |theta X - sg(phi) X|^2 / (2B)
   and for SGD on the total loss with output errors E_s, grad L_c(t) =
   -(eta / B^2) sum_k a^k E_{t-k} (X_{t-k}^T X_t) X_t^T: each past gradient, weighted by a^k and by the
   similarity of past and current inputs, comes back with the sign that removes it.
2. The loss landscapes of linear SSL encoders z = W x (Ziyin et al., ICLR 2023): data covariance A, two
   views with independent noise of covariance S, B = A + S.
       spectral contrastive, exact:  L(W) = -2 Tr[W A W^T] + Tr[(W B W^T)^2]
       InfoNCE near the origin:      E[L] = log N - (1 - 1/N) Tr[W A W^T] / tau + Tr[(W B W^T)^2] / (2 tau^2)
   With weight decay gamma |W|^2 and diagonal A, S the optimum M = W^T W is diagonal:
       InfoNCE m_i = tau (a_i - gamma tau)_+ / (a_i + s_i)^2   (direction i collapses iff a_i <= gamma tau)
       spectral m_i = (2 a_i - gamma)_+ / (2 (a_i + s_i)^2)
   and with fewer outputs than directions, directions are ranked by (a_i - gamma tau) / (a_i + s_i).
   Barlow Twins' cross-correlation does not see S unless standardized, and then its diagonal is
   (W A W^T)_kk / (W B W^T)_kk. Strong augmentation collapses dimensions (Jing et al.'s 16-d toy).
   Derived here from the same formulas (marked "derived"): unit-norm embeddings make InfoNCE scale
   invariant, so weight decay no longer collapses directions; a bias term stays at zero under InfoNCE but
   takes |b|^2 = 1 - gamma/2 under the spectral loss (a constant, collapsed output); under class imbalance
   each loss drops the classes below its own threshold (gamma tau for InfoNCE, gamma / 2 for spectral).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Check:
    claim: str
    predicted: str
    measured: str
    tolerance: str
    passed: bool


def fmt(x) -> str:
    if isinstance(x, (list, tuple, np.ndarray, torch.Tensor)):
        return "[" + ", ".join(fmt(v) for v in (x.tolist() if hasattr(x, "tolist") else x)) + "]"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------------------------------
# 1. RC-MAE: the EMA teacher as a conditional momentum


def ema_gap_prediction(deltas: list, a: float) -> torch.Tensor:
    """theta_t - phi_t = sum_{k=1..t} a^k dtheta_{t-k}, from the student's past updates."""
    t = len(deltas)
    return sum((a ** k * deltas[t - k] for k in range(1, t + 1)), torch.zeros_like(deltas[0]) if deltas else 0)


def rcmae_trajectory(optimizer: str = "sgd", steps: int = 40, d: int = 12, batch: int = 16, a: float = 0.9,
                     lr: float = 0.05, mask_ratio: float = 0.5, seed: int = 0, predict=ema_gap_prediction) -> dict:
    """Train a linear student (reconstruct the full input from a masked one) with its EMA teacher, in float64,
    and compare at every step the autograd gradient of the consistency loss with the closed forms."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
    phi = theta.detach().clone()
    opt = (torch.optim.SGD([theta], lr=lr) if optimizer == "sgd" else
           torch.optim.AdamW([theta], lr=lr, betas=(0.9, 0.95), weight_decay=0.05))
    deltas, past = [], []                                    # dtheta_s; (E_s, X_s) for the SGD form
    err = {"gap": 0.0, "grad": 0.0, "sgd_form": 0.0}
    for t in range(steps):
        x_full = torch.randn(d, batch, generator=g, dtype=torch.float64)
        X = x_full * (torch.rand(d, batch, generator=g) >= mask_ratio)            # same mask for both networks
        rec = ((theta @ X - x_full) ** 2).sum() / (2 * batch)
        cons = ((theta @ X - phi @ X) ** 2).sum() / (2 * batch)                    # phi carries no gradient
        grad_c, = torch.autograd.grad(cons, theta, retain_graph=True)
        gap = predict(deltas, a)
        scale = max(grad_c.abs().max().item(), 1e-300)
        err["gap"] = max(err["gap"], (theta.detach() - phi - gap).abs().max().item() / max(phi.abs().max().item(), 1e-300))
        err["grad"] = max(err["grad"], (grad_c - gap @ X @ X.T / batch).abs().max().item() / scale) if t else err["grad"]
        if optimizer == "sgd" and t:
            form = sum(-(lr / batch ** 2) * a ** k * past[t - k][0] @ (past[t - k][1].T @ X) @ X.T for k in range(1, t + 1))
            err["sgd_form"] = max(err["sgd_form"], (grad_c - form).abs().max().item() / scale)
        past.append(((theta @ X - x_full + theta @ X - phi @ X).detach(), X))      # total-loss output errors
        before = theta.detach().clone()
        opt.zero_grad()
        (rec + cons).backward()
        opt.step()
        deltas.append(theta.detach() - before)
        phi = a * phi + (1 - a) * theta.detach()                                   # EMA after the step
    return err


def conditional_correction(similarities, a: float = 0.9, lr: float = 0.1, d: int = 8, seed: int = 0) -> dict:
    """One SGD step on input x0, then the consistency gradient on an input x1 of cosine similarity s with x0.
    Proposition 4.1 with B = 1: the correction c = -lr grad L_c = a lr^2 (x0 . x1) e0 x1^T, so |c| grows
    linearly with |s| and vanishes at s = 0, and its projection against the past update u is
    -<c, u> / |u|^2 = a lr s^2 (unit inputs)."""
    g = torch.Generator().manual_seed(seed)
    theta0 = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x0 = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    perp = torch.randn(d, generator=g, dtype=torch.float64)
    perp = F.normalize(perp - (perp @ x0) * x0, dim=0)
    y0 = torch.randn(d, generator=g, dtype=torch.float64)
    e0 = theta0 @ x0 - y0
    theta1 = theta0 - lr * torch.outer(e0, x0)               # L_c = 0 at step 0 (theta0 = phi0)
    phi1 = a * theta0 + (1 - a) * theta1
    u = theta1 - theta0
    out = {"s": [], "norm": [], "norm_pred": [], "against": [], "against_pred": []}
    for s in similarities:
        x1 = s * x0 + math.sqrt(max(1 - s * s, 0.0)) * perp
        th = theta1.clone().requires_grad_()
        grad, = torch.autograd.grad(0.5 * ((th @ x1 - phi1 @ x1) ** 2).sum(), th)
        c = -lr * grad
        out["s"].append(s)
        out["norm"].append(c.norm().item())
        out["norm_pred"].append(a * lr ** 2 * abs(s) * e0.norm().item())
        out["against"].append((-(c * u).sum() / (u * u).sum()).item())
        out["against_pred"].append(a * lr * s * s)
    return out


def check_rcmae(steps: int = 40, predict=ema_gap_prediction) -> list:
    rows = []
    for opt in ("sgd", "adamw"):
        err = rcmae_trajectory(opt, steps=steps, predict=predict)
        rows.append(Check(f"RC-MAE: theta_t - phi_t = sum a^k dtheta_(t-k) ({opt})", "0 relative error",
                          fmt(err["gap"]), "<= 1e-10", err["gap"] <= 1e-10))
        rows.append(Check(f"RC-MAE: grad L_c = sum a^k dtheta_(t-k) X X^T / B ({opt})", "0 relative error",
                          fmt(err["grad"]), "<= 1e-10", err["grad"] <= 1e-10))
    err = rcmae_trajectory("sgd", steps=steps, predict=predict)
    rows.append(Check("RC-MAE: SGD form -(eta/B^2) sum a^k E (X_(t-k)^T X_t) X_t^T", "0 relative error",
                      fmt(err["sgd_form"]), "<= 1e-10", err["sgd_form"] <= 1e-10))
    sims = np.linspace(-1, 1, 21).tolist()
    c = conditional_correction(sims)
    worst = max(max(abs(m - p) for m, p in zip(c["norm"], c["norm_pred"])),
                max(abs(m - p) for m, p in zip(c["against"], c["against_pred"])))
    at_zero = c["norm"][10]
    rows.append(Check("RC-MAE: correction |c| = a eta^2 |s| |e0|, against the past update by a eta s^2",
                      "0 abs error", fmt(worst), "<= 1e-12", worst <= 1e-12))
    rows.append(Check("RC-MAE: no correction for orthogonal inputs (s = 0)", "0", fmt(at_zero), "<= 1e-15",
                      at_zero <= 1e-15))
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. SSL landscapes of linear encoders


def two_views(x: torch.Tensor, s: torch.Tensor, g: torch.Generator):
    """Two augmented views x + e, x + e' with independent noise of variances s."""
    return (x + torch.randn(x.shape, generator=g, dtype=x.dtype) * s.sqrt(),
            x + torch.randn(x.shape, generator=g, dtype=x.dtype) * s.sqrt())


def gaussian_views(a: torch.Tensor, s: torch.Tensor):
    """Sampler of view pairs for data N(0, diag(a)) and noise N(0, diag(s))."""
    return lambda n, g: two_views(torch.randn(n, len(a), generator=g, dtype=a.dtype) * a.sqrt(), s, g)


def spectral_loss(z1, z2):
    """-2 E[z1 . z2] + E[(z1 . z2')^2], negatives z2' from other samples."""
    return -2 * (z1 * z2).sum(1).mean() + ((z1 * z2.roll(1, 0)).sum(1) ** 2).mean()


def infonce_loss(z1, z2, tau):
    """Dot-product logits / tau, the positive in the denominator, mean over the batch."""
    return F.cross_entropy(z1 @ z2.T / tau, torch.arange(len(z1)))


def spectral_exact(W, a, s):
    A, Bm = torch.diag(a), torch.diag(a + s)
    WBW = W @ Bm @ W.T
    return (-2 * torch.trace(W @ A @ W.T) + torch.trace(WBW @ WBW)).item()


def infonce_expansion(W, a, s, N, tau):
    A, Bm = torch.diag(a), torch.diag(a + s)
    WBW = W @ Bm @ W.T
    return (math.log(N) - (1 - 1 / N) * torch.trace(W @ A @ W.T) / tau + torch.trace(WBW @ WBW) / (2 * tau ** 2)).item()


def optimum_infonce(a, s, gamma, tau):
    return tau * (a - gamma * tau).clamp_min(0) / (a + s) ** 2


def optimum_spectral(a, s, gamma):
    return (2 * a - gamma).clamp_min(0) / (2 * (a + s) ** 2)


def check_landscapes(samples: int = 200_000, batches: int = 300, spectral=spectral_exact, infonce=infonce_expansion) -> list:
    """Monte Carlo estimates of both losses over a range of weight scales against the formulas."""
    g = torch.Generator().manual_seed(1)
    a, s = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.3, 0.1], dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64)
    W0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    W0 = W0 / W0.norm()
    rows, sample = [], gaussian_views(a, s)
    for scale in (0.1, 0.3, 1.0):
        W = scale * W0
        v1, v2 = sample(samples, g)
        z1, z2 = v1 @ W.T, v2 @ W.T
        terms = -2 * (z1 * z2).sum(1) + ((z1 * z2.roll(1, 0)).sum(1)) ** 2
        mc, se = terms.mean().item(), terms.std().item() / math.sqrt(samples)
        pred = spectral(W, a, s)
        rows.append(Check(f"spectral contrastive loss, exact (|W| = {scale})", fmt(pred), fmt(mc), f"4 s.e. = {4 * se:.2g}",
                          abs(mc - pred) <= 4 * se))
    N, tau = 1024, 0.5
    for scale in (0.05, 0.1, 0.2):
        W = scale * W0
        losses = []
        for _ in range(batches):
            v1, v2 = sample(N, g)
            losses.append(infonce_loss(v1 @ W.T, v2 @ W.T, tau).item())
        losses = torch.tensor(losses)
        mc, se = losses.mean().item() - math.log(N), losses.std().item() / math.sqrt(batches)
        pred = infonce(W, a, s, N, tau) - math.log(N)
        tol = 4 * se + 0.01 * abs(pred)                      # sampling error + the O(|W|^6) remainder
        rows.append(Check(f"InfoNCE near-origin expansion - log N (|W| = {scale})", fmt(pred), fmt(mc),
                          f"{tol:.2g}", abs(mc - pred) <= tol))
    return rows


def train_linear_ssl(loss: str, sampler, d0: int, d1: int, gamma: float, tau: float = 0.5, steps: int = 3000,
                     lr: float = 0.02, batch: int = 256, seed: int = 0, normalize: bool = False, bias: bool = False):
    """SGD on sampled view pairs with weight decay gamma |W|^2 (and |b|^2); the learning rate drops 5x after
    60% of the steps and M = W^T W, |b|^2 are averaged over the last quarter. -> (M, |b|^2, W)."""
    g = torch.Generator().manual_seed(seed)
    W = (0.05 * torch.randn(d1, d0, generator=g)).requires_grad_()
    b = torch.zeros(d1, requires_grad=bias)
    M, b2, n = torch.zeros(d0, d0), 0.0, 0
    for t in range(steps):
        v1, v2 = sampler(batch, g)
        z1, z2 = v1 @ W.T + b, v2 @ W.T + b
        if normalize:
            z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        L = infonce_loss(z1, z2, tau) if loss == "infonce" else spectral_loss(z1, z2)
        L = L + gamma * ((W ** 2).sum() + (b ** 2).sum())
        grads = torch.autograd.grad(L, [W, b] if bias else [W])
        with torch.no_grad():
            step = lr if t < 0.6 * steps else lr / 5
            W -= step * grads[0]
            if bias:
                b -= step * grads[1]
        if t >= 0.75 * steps:
            M += (W.T @ W).detach()
            b2 += (b ** 2).sum().item()
            n += 1
    return M / n, b2 / n, W.detach()


def kept(m: torch.Tensor, ref: float, frac: float = 0.05) -> list:
    """Indices of directions holding more than frac of the reference strength (the rest: collapsed)."""
    return [i for i, v in enumerate(m.tolist()) if v > frac * ref]


def check_optima(steps: int = 3000, infonce=optimum_infonce, spectral=optimum_spectral) -> list:
    """The optimum per eigen-direction with weight decay, against SGD on sampled data."""
    a = torch.tensor([1.0, 0.7, 0.5, 0.2, 0.1])
    s = torch.full((5,), 4.0)
    gamma, tau = 0.5, 0.5
    rows = []
    for name, pred in (("InfoNCE", infonce(a, s, gamma, tau)), ("spectral", spectral(a, s, gamma))):
        M, _, _ = train_linear_ssl("infonce" if name == "InfoNCE" else "spectral", gaussian_views(a, s), 5, 5, gamma, tau, steps)
        m = M.diagonal()
        err = (m - pred).abs().max().item() / pred.max().item()
        rows.append(Check(f"{name} optimum m_i with weight decay (a = {fmt(a)}, s = 4)", fmt(pred), fmt(m),
                          "10% of max m", err <= 0.1))
        rows.append(Check(f"{name} collapsed directions ({'a_i <= gamma tau' if name == 'InfoNCE' else '2 a_i <= gamma'})",
                          fmt([i for i in range(5) if pred[i] == 0]),
                          fmt([i for i in range(5) if i not in kept(m, pred.max().item())]), "same set",
                          kept(m, pred.max().item()) == kept(pred, pred.max().item())))
    a, s = torch.tensor([1.0, 0.9, 0.6]), torch.tensor([3.0, 0.5, 0.5])     # the largest a_i ranks last
    key = (a - gamma * tau) / (a + s)
    want = sorted(torch.topk(key, 2).indices.tolist())
    M, _, _ = train_linear_ssl("infonce", gaussian_views(a, s), 3, 2, gamma, tau, steps)
    got = kept(M.diagonal(), M.diagonal().max().item())
    rows.append(Check("InfoNCE, 2 outputs for 3 directions: kept = top by (a-gamma tau)/(a+s)", fmt(want), fmt(got),
                      "same set", got == want))
    return rows


def barlow_diagonal(W, a, s):
    """The standardized cross-correlation's diagonal, (W A W^T)_kk / (W B W^T)_kk."""
    return (W @ torch.diag(a) @ W.T).diagonal() / (W @ torch.diag(a + s) @ W.T).diagonal()


def check_barlow(samples: int = 200_000, formula=barlow_diagonal) -> list:
    """Barlow Twins' cross-correlation: W A W^T without standardization (blind to S); standardized, its
    diagonal is (W A W^T)_kk / (W B W^T)_kk."""
    g = torch.Generator().manual_seed(2)
    a = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cross, se = [], []
    for noise in (0.1, 2.0):
        s = torch.full((4,), noise, dtype=torch.float64)
        v1, v2 = gaussian_views(a, s)(samples, g)
        z1, z2 = v1 @ W.T, v2 @ W.T
        prods = z1[:, :, None] * z2[:, None, :]                                  # [n, 3, 3]
        cross.append(prods.mean(0))
        se.append(prods.std(0) / math.sqrt(samples))
    gap = (cross[0] - cross[1]).abs().max().item()
    tol = 4 * (se[0] ** 2 + se[1] ** 2).sqrt().max().item()
    rows = [Check("Barlow Twins, unstandardized: cross-correlation does not see S (S = 0.1 vs 2)",
                  "0 difference", fmt(gap), f"4 s.e. = {tol:.2g}", gap <= tol)]
    z1, z2 = (z1 - z1.mean(0)) / z1.std(0), (z2 - z2.mean(0)) / z2.std(0)
    diag, pred = (z1 * z2).mean(0), formula(W, a, s)
    err = (diag - pred).abs().max().item()
    rows.append(Check("Barlow Twins, standardized: C_kk = (W A W^T)_kk / (W B W^T)_kk", fmt(pred), fmt(diag),
                      "0.01", err <= 0.01))
    return rows


def dimensional_collapse(noise: float, steps: int = 10_000, seed: int = 0) -> torch.Tensor:
    """Jing et al.'s toy: 16-d N(0, I) data, augmentation noise N(0, noise^2) on the last 8 coordinates of each
    view, Linear(16, 16), InfoNCE tau 0.1, SGD lr 1e-3, batch 128. -> eigenvalues of the embedding
    covariance W W^T (ascending)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(lin.parameters(), lr=1e-3)
    where = torch.cat([torch.zeros(8), torch.ones(8)])
    for _ in range(steps):
        x = torch.randn(128, 16, generator=g)
        v1 = x + noise * where * torch.randn(128, 16, generator=g)
        v2 = x + noise * where * torch.randn(128, 16, generator=g)
        loss = infonce_loss(lin(v1), lin(v2), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    W = lin.weight.detach()
    return torch.linalg.eigvalsh(W @ W.T)


def check_collapse(steps: int = 10_000) -> list:
    weak, strong = dimensional_collapse(0.01, steps), dimensional_collapse(1.5, steps)
    return [Check("strong augmentation collapses dimensions: s = 0.01, all 16 eigenvalues", "in [0.14, 0.23]",
                  f"[{weak.min():.3f}, {weak.max():.3f}]", "range", bool(((weak >= 0.14) & (weak <= 0.23)).all())),
            Check("s = 1.5: eight eigenvalues fall", "<= about 0.01", f"<= {strong[:8].max():.3f}", "<= 0.02",
                  bool((strong[:8] <= 0.02).all())),
            Check("s = 1.5: eight eigenvalues stay", "in [0.12, 0.17]", f"[{strong[8:].min():.3f}, {strong[8:].max():.3f}]",
                  "range", bool(((strong[8:] >= 0.12) & (strong[8:] <= 0.17)).all()))], (weak, strong)


def check_effects(steps: int = 3000) -> list:
    """The effects of unit-norm embeddings, a bias term and class imbalance, each measured across losses."""
    gamma, tau, rows = 0.5, 0.5, []
    # unit-norm embeddings: the loss is scale-invariant, so <grad L, W> = 0 (Euler) and weight decay can only
    # shrink W without trading off against the signal: the a_i <= gamma tau collapse of InfoNCE disappears
    a, s = torch.tensor([1.0, 0.7, 0.2]), torch.full((3,), 4.0)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v1, v2 = gaussian_views(a.double(), s.double())(512, g)
    grad, = torch.autograd.grad(infonce_loss(F.normalize(v1 @ W.T, dim=1), F.normalize(v2 @ W.T, dim=1), tau), W)
    cos = abs((grad * W).sum().item()) / (grad.norm() * W.norm()).item()
    rows.append(Check("derived: unit-norm InfoNCE is scale invariant, <grad L, W> = 0", "0", fmt(cos), "<= 1e-12",
                      cos <= 1e-12))
    strengths = {}
    for normalize in (False, True):
        M, _, _ = train_linear_ssl("infonce", gaussian_views(a, s), 3, 3, gamma, tau, steps, normalize=normalize)
        strengths[normalize] = (M.diagonal() / M.diagonal().max())[2].item()
    rows.append(Check("derived: a = 0.2 <= gamma tau = 0.25 collapses under InfoNCE (relative strength)",
                      "0", fmt(strengths[False]), "<= 0.05", strengths[False] <= 0.05))
    rows.append(Check("derived: ... and survives with unit-norm embeddings (relative strength)",
                      "> 0", fmt(strengths[True]), "> 0.05", strengths[True] > 0.05))
    # a bias term: under InfoNCE it only adds a non-negative penalty (b = 0); under the spectral loss it adds
    # -2|b|^2 + |b|^4 (+ 2 b^T W B W^T b, zero with spare outputs): |b|^2 = 1 - gamma / 2
    a, s = torch.tensor([1.0, 0.7, 0.5]), torch.full((3,), 4.0)
    for loss, pred in (("infonce", 0.0), ("spectral", 1 - gamma / 2)):
        _, b2, _ = train_linear_ssl(loss, gaussian_views(a, s), 3, 5, gamma, tau, steps, bias=True)
        rows.append(Check(f"derived: bias term under {loss}, |b|^2", fmt(pred), fmt(b2), "0.05 abs",
                          abs(b2 - pred) <= 0.05))
    # class imbalance: Dirichlet class proportions p; x = +-sqrt(r2) e_y + within-class noise, so
    # a_c = p_c r2 + 0.02; each loss keeps the classes above its own threshold (seed 63: none within 25% of one)
    p = torch.tensor(np.sort(np.random.default_rng(63).dirichlet(np.ones(6)))[::-1].copy(), dtype=torch.float32)
    r2, within, s_aug, tau_i = 2.0, 0.02, 2.0, 0.3
    a_cls = p * r2 + within

    def classes(n, g):
        y = torch.multinomial(p, n, replacement=True, generator=g)
        x = torch.zeros(n, 6)
        x[torch.arange(n), y] = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float() * math.sqrt(r2)
        return two_views(x + torch.randn(n, 6, generator=g) * math.sqrt(within), torch.full((6,), s_aug), g)
    for loss, threshold in (("infonce", gamma * tau_i), ("spectral", gamma / 2)):
        M, _, _ = train_linear_ssl(loss, classes, 6, 6, gamma, tau_i, steps)
        want = [i for i in range(6) if a_cls[i] > threshold]
        got = kept(M.diagonal(), M.diagonal().max().item())
        rows.append(Check(f"derived: imbalanced classes (a_c = {fmt(a_cls)}), {loss} keeps a_c > {threshold:g}",
                          fmt(want), fmt(got), "same set", got == want))
    return rows


# ----------------------------------------------------------------------------------------------------
# report


def plots(directory: str, collapse_spectra) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    c = conditional_correction(np.linspace(-1, 1, 41).tolist())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(c["s"], c["norm_pred"], label="predicted a eta^2 |s| |e0|")
    ax1.plot(c["s"][::2], c["norm"][::2], "o", label="autograd")
    ax1.set(xlabel="cosine similarity of past and current input", ylabel="|consistency correction|",
            title="RC-MAE: the teacher's correction")
    ax1.legend()
    ax2.plot(c["s"], c["against_pred"], label="predicted a eta s^2")
    ax2.plot(c["s"][::2], c["against"][::2], "o", label="autograd")
    ax2.set(xlabel="cosine similarity of past and current input", ylabel="-<c, u> / |u|^2",
            title="...removes the past update in proportion")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "rcmae_conditional_momentum.png"), dpi=120)
    weak, strong = collapse_spectra
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.semilogy(range(1, 17), weak.flip(0).clamp_min(1e-6).numpy(), "o-", label="augmentation s = 0.01")
    ax.semilogy(range(1, 17), strong.flip(0).clamp_min(1e-6).numpy(), "s-", label="augmentation s = 1.5")
    ax.set(xlabel="rank", ylabel="eigenvalue of the embedding covariance", title="Dimensional collapse (16-d toy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "dimensional_collapse.png"), dpi=120)
    plt.close("all")


def run_all() -> tuple:
    collapse_rows, spectra = check_collapse()
    rows = check_rcmae() + check_landscapes() + check_optima() + check_barlow() + collapse_rows + check_effects()
    return rows, spectra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Numerical checks of the linear-model theory of RC-MAE and SSL landscapes.")
    p.add_argument("--json", help="write every row to this JSON file")
    p.add_argument("--plots", help="write the figures to this directory")
    args = p.parse_args(argv)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):   # before the work, not after
        print(f"linear_theory.py: error: --json {args.json}: there is no directory for it", file=sys.stderr)
        return 2
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        print(f"linear_theory.py: error: --plots {args.plots} is a file; give a directory", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    rows, spectra = run_all()
    width = max(len(r.claim) for r in rows)
    print(f"{'claim':<{width}}  {'predicted':<28} {'measured':<28} {'tolerance':<16} result")
    for r in rows:
        print(f"{r.claim:<{width}}  {r.predicted[:28]:<28} {r.measured[:28]:<28} {r.tolerance[:16]:<16} "
              f"{'PASS' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f} s")
    if args.json:   # written whole, then renamed: never half-written
        with open(args.json + ".tmp", "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    if args.plots:
        plots(args.plots, spectra)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
