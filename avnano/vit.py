"""A ViT image encoder that loads released SigLIP and CLIP vision towers (Dosovitskiy et al. 2021).

One class, two families, chosen by `ViTConfig.family`:
- SigLIP (Zhai et al. 2023): conv patch embedding with bias, no class token, tanh-GELU, LN eps 1e-6,
  post-LayerNorm on every token, optional MAP pooling head (a learned probe cross-attends to the
  tokens, then a residual MLP).
- CLIP (Radford et al. 2021): conv without bias, a class token, a pre-LayerNorm ("pre_layrnorm" in the
  released files), quick-GELU, LN eps 1e-5, post-LayerNorm on the class token only.
The captioner's aligner consumes `merge(patches(x))`: the per-patch outputs (`patches()`, class
token dropped), optionally merged (`merge()`): each m x m group of neighbouring patches becomes one
token, either concatenated Qwen2-VL style (width m*m*dim: where inside the group a thing sits
survives), averaged, or max-pooled per feature (width dim: the same object gives the same vector
wherever it sits, which is what a caption that names objects but not places needs). Max-pooling is
the tiny preset's merge (measured in the README): an object filling one patch of sixteen keeps its
features at full strength, where the average dilutes them sixteen-fold under the background's. Or, instead of a
merge, a frame's k most salient patches (`salient()`, the tiny preset's tokens: one object per token).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import EncoderBlock, run_block

# Preprocessing constants of the released image processors.
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTConfig:
    family: str = "siglip"   # "siglip" or "clip"
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    map_head: bool = False   # SigLIP's attention-pooling head
    merge: int = 1           # m > 1: each m x m group of patch tokens becomes one ...
    merge_mode: str = "concat"  # ... concatenated (Qwen2-VL, keeps where) or averaged ("mean", keeps what)

    def __post_init__(self):
        assert self.family in ("siglip", "clip"), f"unknown ViT family {self.family!r}"
        assert self.merge_mode in ("concat", "mean", "max"), f"unknown merge mode {self.merge_mode!r} (concat, mean, max)"
        if self.grid % self.merge:
            raise ValueError(f"merge {self.merge} does not divide the {self.grid} x {self.grid} patch grid "
                             f"(choose one of {[m for m in range(1, self.grid + 1) if self.grid % m == 0]})")

    @property
    def eps(self):
        return 1e-6 if self.family == "siglip" else 1e-5

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self):
        return (self.grid // self.merge) ** 2

    @property
    def token_dim(self):
        return self.dim * (self.merge ** 2 if self.merge_mode == "concat" else 1)


class MAPHead(nn.Module):
    """SigLIP multihead attention pooling: probe -> cross-attention over tokens -> h + MLP(LN(h))."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.n_heads = cfg.n_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, D))
        self.in_proj = nn.Linear(D, 3 * D)  # packs [q; k; v] like nn.MultiheadAttention
        self.out_proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        self.fc1 = nn.Linear(D, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, D)

    def forward(self, x):
        B, T, D = x.shape
        wq, wk, wv = self.in_proj.weight.chunk(3)
        bq, bk, bv = self.in_proj.bias.chunk(3)
        heads = lambda t: t.view(B, t.shape[1], self.n_heads, -1).transpose(1, 2)
        q = heads(F.linear(self.probe.expand(B, 1, D), wq, bq))
        k, v = heads(F.linear(x, wk, bk)), heads(F.linear(x, wv, bv))
        h = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D))
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h)), approximate="tanh"))
        return h[:, 0]


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        siglip = cfg.family == "siglip"
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=siglip)
        self.cls = None if siglip else nn.Parameter(torch.zeros(cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.grid ** 2 + (0 if siglip else 1), cfg.dim))
        self.pre_norm = None if siglip else nn.LayerNorm(cfg.dim, eps=cfg.eps)
        act = "gelu_tanh" if siglip else "quick_gelu"
        self.blocks = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads, cfg.hidden_dim, act, cfg.eps) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = MAPHead(cfg) if cfg.map_head else None
        nn.init.normal_(self.pos_embed, std=0.02)
        self.grad_checkpointing = False  # recompute each block in the backward (memory for compute)

    def forward(self, pixel_values):
        """pixel_values (B, 3, S, S), already normalised -> (hidden (B, T, D), pooled (B, D) or None).
        hidden matches the released last_hidden_state: SigLIP post-normed, CLIP not (class token first)."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = run_block(self, block, x)
        if self.cls is None:
            x = self.post_norm(x)
            return x, (self.head(x) if self.head is not None else None)
        return x, self.post_norm(x[:, 0])

    def patches(self, pixel_values):
        """(B, 3, S, S) -> (B, grid*grid, D): one output per patch (class token dropped)."""
        x, _ = self.forward(pixel_values)
        return x[:, 1:] if self.cls is not None else x

    def merge(self, x):
        """(B, g*g, D) -> (B, (g/m)^2, token_dim): each m x m group concatenated, averaged or max-pooled."""
        m, g = self.cfg.merge, self.cfg.grid
        if m > 1:  # (B, g*g, D) -> (B, g/m, m, g/m, m, D) -> groups of m x m, row-major inside a group
            B, _, D = x.shape
            x = x.reshape(B, g // m, m, g // m, m, D).transpose(2, 3).reshape(B, (g // m) ** 2, m * m, D)
            x = x.flatten(2) if self.cfg.merge_mode == "concat" else x.mean(2) if self.cfg.merge_mode == "mean" else x.amax(2)
        return x


def salient(pixels, prev, grid, k):
    """Pixels (N, 3, S, S) -> (N, k): each frame's k most salient patches of its grid x grid, in raster order. A patch's
    score is its pixels' mean distance from the frame's median colour (what stands out from the background) plus, with
    prev (each frame's predecessor index), their mean change since the previous frame (what appeared, left or moved).
    Token selection by saliency, as token-pruning work does (e.g. LLaVA-PruMerge); here it keeps one object per token."""
    score = (pixels - pixels.flatten(2).median(-1).values[..., None, None]).abs()
    if prev is not None:
        score = score + (pixels - pixels[prev]).abs()
    score = F.adaptive_avg_pool2d(score.sum(1), grid).flatten(1)
    return score.topk(k, dim=1).indices.sort(1).values


def preprocess(frames, cfg: ViTConfig):
    """uint8 frames (N, H, W, 3) -> normalised pixel_values (N, 3, S, S), as each family's processor:
    SigLIP squashes to S x S (bilinear) and normalises with mean = std = 0.5; CLIP resizes the short
    side to S (bicubic), centre-crops S x S and normalises with the OpenAI CLIP mean/std. Resizing
    uses torch's antialiased interpolation, so pixels differ slightly from the PIL/torchvision
    processors; parity tests therefore compare model outputs on identical pixel_values."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    S = cfg.image_size
    if cfg.family == "siglip":
        x = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        mean, std = SIGLIP_MEAN, SIGLIP_STD
    else:
        H, W = x.shape[-2:]
        scale = S / min(H, W)
        x = F.interpolate(x, size=(max(S, round(H * scale)), max(S, round(W * scale))), mode="bicubic",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - S) // 2, (x.shape[-1] - S) // 2
        x = x[..., top:top + S, left:left + S]
        mean, std = CLIP_MEAN, CLIP_STD
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))  # on the frames' device
    return (x.clamp(0, 1) - mean) / std
