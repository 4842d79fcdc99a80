"""Preference objectives for captions: DPO / cDPO / IPO, guided DPO, pair selection.

DPO (Rafailov et al. 2023): with Delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)) over
chosen c and rejected r, the loss is -log sigmoid(beta Delta), beta = 0.1. Sequence log-probs are
*sums* over completion tokens (prompt and padding masked out; AVCaptioner.completion_logprobs).
cDPO (conservative, label smoothing eps): -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta).
IPO (Azar et al. 2023): (Delta_bar - 1 / (2 beta))^2 with Delta_bar built from per-token *averaged*
log-ratios (IPO is the length-normalised one).
Guided DPO (video-SALMONN 2, gDPO): DPO + lambda * CE on a third sequence, the ground-truth caption,
token-averaged, lambda = 0.1; it keeps the policy anchored to real captions while preferences move it.
Pair selection (video-SALMONN 2, Table 3): keep a pair only when the chosen caption beats the rejected
one on every metric by that metric's threshold for the round.
"""
import torch.nn.functional as F


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, kind="sigmoid", eps=0.0, n_c=None, n_r=None):
    """Per-pair losses and implicit rewards. kind: sigmoid | cdpo | ipo (ipo needs token counts n_c, n_r)."""
    if kind == "ipo":
        delta = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r
        loss = (delta - 1.0 / (2 * beta)) ** 2
    else:
        delta = (pi_c - ref_c) - (pi_r - ref_r)
        eps = eps if kind == "cdpo" else 0.0
        if kind not in ("sigmoid", "cdpo"):
            raise ValueError(f"unknown DPO loss {kind!r} (sigmoid, cdpo, ipo)")
        loss = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    chosen_reward, rejected_reward = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    return loss, chosen_reward, rejected_reward


def guided_dpo_loss(dpo, gt_logprob_sum, gt_tokens, lam=0.1):
    """gDPO: mean DPO loss + lambda * token-mean CE of the ground-truth caption."""
    return dpo.mean() + lam * (-gt_logprob_sum.sum() / gt_tokens.sum())


def select_pairs(scored, thresholds):
    """scored: per clip, a list of (caption, metrics dict) samples; metrics are 'lower is better'
    (e.g. miss, hall, total error, repetition). thresholds {metric: margin}. For each clip the best
    and worst samples by the first metric form a candidate pair, kept only if chosen beats rejected
    by at least the margin on every metric. Returns [(clip index, chosen caption, rejected caption)]."""
    first = next(iter(thresholds))
    pairs = []
    for i, samples in enumerate(scored):
        if len(samples) < 2:
            continue
        ordered = sorted(samples, key=lambda s: s[1][first])
        chosen, rejected = ordered[0], ordered[-1]
        if all(rejected[1][m] - chosen[1][m] >= t for m, t in thresholds.items()):
            pairs.append((i, chosen[0], rejected[0]))
    return pairs
