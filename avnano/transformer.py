"""The pre-LayerNorm transformer encoder block shared by the ViT (SigLIP / CLIP) and the Whisper encoder.

Vaswani et al. 2017 with the pre-LN placement (Xiong et al. 2020): x + attn(LN(x)), then
x + mlp(LN(x)); bidirectional attention, biased projections. The two released families differ only in
what this block takes as arguments: the activation (SigLIP: tanh-GELU, CLIP: quick-GELU
x*sigmoid(1.702x), Whisper: exact erf GELU), the LayerNorm eps (1e-6 / 1e-5 / 1e-5) and whether
k_proj has a bias (Whisper's does not).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class SelfAttention(nn.Module):
    def __init__(self, dim, n_heads, k_bias=True):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class EncoderBlock(nn.Module):
    def __init__(self, dim, n_heads, hidden_dim, act="gelu", eps=1e-5, k_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, n_heads, k_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def run_block(owner, block, *args):
    """block(*args), or, when owner.grad_checkpointing is set and a backward will follow (training, grad
    enabled), recomputed in the backward instead of keeping its activations (non-reentrant checkpoint)."""
    if getattr(owner, "grad_checkpointing", False) and owner.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def block_keymap(hf_prefix, our_prefix, names, k_bias=True):
    """Released block keys -> ours. names gives the released names of (norm1, norm2, fc1, fc2), which
    differ between ViT ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") and Whisper
    ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2")."""
    m = {}
    for hf, ours in zip(names, ("norm1", "norm2", "fc1", "fc2")):
        for p in ("weight", "bias"):
            m[f"{hf_prefix}{hf}.{p}"] = f"{our_prefix}{ours}.{p}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        for p in ("weight", "bias"):
            if k_bias or (proj, p) != ("k_proj", "bias"):
                m[f"{hf_prefix}self_attn.{proj}.{p}"] = f"{our_prefix}attn.{proj}.{p}"
    return m
