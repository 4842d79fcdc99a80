""""GRPO" pieces (Shao et al. 2024, DeepSeekMath) as AVoCaDO uses them: group advantages, the clipped
surrogate, the k3 KL estimator, loss normalisation and the completion mask.

For G samples of one prompt with rewards r: A = (r - mean(r)) / (std(r) + 1e-4), std with Bessel's
correction; scale="none" keeps r - mean(r) (Dr. GRPO). Per token, with rho = exp(log pi - log pi_old):
    loss_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3,
    k3 = exp(ref - log pi) - (ref - log pi) - 1   (>= 0, and 0 where pi == ref).
Normalisation (an explicit choice, they differ in how long captions weigh):
    "grpo"     mean over each sequence's tokens, then over sequences;
    "bnpo"     (= "dapo") sum over all tokens / number of completion tokens in the batch;
    "dr_grpo"  sum over all tokens / (sequences * max completion length).
Simplifications, said plainly: by default one optimisation step per batch of samples, so pi_old == pi,
rho == 1 and the clip never fires (the loss starts near 0 and its gradient is the advantage-weighted
log-likelihood); train_grpo.py --iterations mu > 1 takes more steps on the same samples, where it
does. The reference is the policy with its LoRA disabled.
"""
import torch


def up_to_eos(rows, eos_ids):
    """The completions of sampled rows (host lists of ids): each up to and including its first EOS, all of it when
    there is none. What is rewarded, scored and trained; the (B, T) mask is model.completion_logprobs'."""
    eos = set(eos_ids)
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def group_advantages(rewards, scale="std"):
    """rewards (n_prompts, G) -> advantages (n_prompts, G); a group whose rewards are all equal gets 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    return centred / (rewards.std(-1, keepdim=True, unbiased=True) + 1e-4)


def kl_k3(logp, ref_logp):
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, eps_low=0.2, eps_high=None):
    """Per-token -min(rho A, clip(rho) A); advantages broadcast over tokens (B, 1)."""
    rho = torch.exp(logp - old_logp)
    clipped = rho.clamp(1 - eps_low, 1 + (eps_low if eps_high is None else eps_high))
    return -torch.minimum(rho * advantages, clipped * advantages)


def normalise(per_token, mask, mode="grpo"):
    if mode == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if mode in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if mode == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown loss normalisation {mode!r} (grpo, bnpo, dapo, dr_grpo)")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, eps_low=0.2, eps_high=None, mode="grpo"):
    """The full per-batch loss; ref_logp may be None when beta == 0."""
    per_token = clipped_surrogate(logp, old_logp, advantages[:, None], eps_low, eps_high)
    if beta > 0:
        per_token = per_token + beta * kl_k3(logp, ref_logp)
    return normalise(per_token, mask, mode)
