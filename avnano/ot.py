"""Optimal transport between audio and visual tokens (LAVCap, Rho et al. 2025): log-domain Sinkhorn,
the OT alignment loss, and OT-attention fusion.

Entropic OT (Cuturi 2013): P* = argmin_P <P, C> - eps H(P) subject to P 1 = a, P^T 1 = b, solved by
Sinkhorn's alternating scalings, here in the log domain for stability at small eps:
    f <- log a - logsumexp_j(g_j - C_ij / eps),   g <- log b - logsumexp_i(f_i - C_ij / eps),
    P_ij = exp(f_i + g_j - C_ij / eps).
LAVCap: cost C_ij = 1 - cos(v_i, a_j) on L2-normalised tokens, eps 0.1, 50 iterations, uniform
marginals, the plan computed without gradient; the alignment loss is <P*, C> (gradient flows
through C only). OT-attention fusion mixes each stream with the other through the plan:
    v' = v + n_v P a,   a' = a + n_a P^T v     (rows of n_v P and columns of n_a P^T sum to one)
Departure: LAVCap fuses in its own attention module; here the fused tokens simply replace the
aligner outputs before interleaving.
"""
import math

import torch
import torch.nn.functional as F


def sinkhorn(cost, a=None, b=None, eps=0.1, iters=50):
    """cost (..., n, m) -> plan (..., n, m) with row sums a and column sums b (uniform by default)."""
    n, m = cost.shape[-2:]
    log_a = torch.full(cost.shape[:-1], -math.log(n), dtype=cost.dtype, device=cost.device) if a is None else a.log()
    log_b = torch.full(cost.shape[:-2] + (m,), -math.log(m), dtype=cost.dtype, device=cost.device) if b is None else b.log()
    K = -cost / eps
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iters):
        f = log_a - torch.logsumexp(K + g[..., None, :], dim=-1)
        g = log_b - torch.logsumexp(K + f[..., :, None], dim=-2)
    return torch.exp(f[..., :, None] + K + g[..., None, :])


def cosine_cost(x, y):
    """1 - cos between every row of x (n, D) and y (m, D), in float32 even under autocast: Sinkhorn
    divides it by eps = 0.1, and bf16's 3 significant digits would then move the plan."""
    with torch.autocast(x.device.type, enabled=False):
        return 1.0 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).transpose(-1, -2)


def ot_loss(visual, audio, eps=0.1, iters=50):
    """LAVCap alignment loss <P*, C> between visual (n, D) and audio (m, D) tokens."""
    cost = cosine_cost(visual, audio)
    with torch.no_grad():
        plan = sinkhorn(cost, eps=eps, iters=iters)
    return (plan * cost).sum()


def ot_fuse(visual, audio, eps=0.1, iters=50):
    """OT-attention fusion: (v + n_v P a, a + n_a P^T v) with the (no-grad) plan P between them."""
    with torch.no_grad():
        plan = sinkhorn(cosine_cost(visual, audio), eps=eps, iters=iters).to(visual.dtype)
    n_v, n_a = plan.shape
    return visual + n_v * plan @ audio, audio + n_a * plan.transpose(0, 1) @ visual
