"""The Qwen2.5-VL vision tower, as Qwen2.5-Omni's thinker uses it (Bai et al. 2025, Qwen2.5-VL tech. report, Sec. 2.1).

A ViT over 14 x 14 x 2 (y, x, t) patches of a video (an image is one frame repeated):
- patch embedding: a Conv3d whose kernel equals its stride and has no bias, i.e. one matmul over each flattened
  patch (the processor, omni_video.py, flattens every patch as (channel, t, y, x));
- 2-D rotary embedding: a quarter of the head's frequencies turn with the patch row, a quarter with its column,
  in the rotate-half layout [h, w, h, w];
- RMSNorm (eps 1e-6), SwiGLU MLP with biases, q/k/v with biases (one fused `qkv` in plain Qwen2.5-VL files);
- window attention: patches attend within windows of `window_size` px (112 px = 4 x 4 merged tokens), except in
  the blocks of `fullatt_block_indexes`, which attend within a whole frame group (never across frame groups);
- the merger (the visual aligner): RMSNorm, each 2 x 2 group of neighbouring patches concatenated, Linear-GELU-Linear
  to the language model's width.
Tokens arrive in merge-block order (each 2 x 2 group adjacent); the tower reorders the merged tokens window by window
(row-major windows per frame group, a partial window at the right/bottom edge), so every window is one contiguous
run, and undoes that order after the merger. The reference builds this order by padding each frame's merged grid to
a multiple of the window with a *whole extra window* even when it already divides, then drops the padding and the
empty windows; the result is exactly the edge-clipped tiling of `window_order` below (tested against it).
Departure from the reference: attention runs as one scaled_dot_product_attention call per block over all windows (or
frame groups) at once, each padded to the longest with a key mask (no mask when all are equal), instead of a Python
loop over cu_seqlens chunks. Numerics follow the reference: RMSNorm and the rotary rotation compute in float32 (also
for float64 inputs) and cast back, rotary angles are float32.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import RMSNorm
from .errors import InputError
from .transformer import run_block
from .weights import load_mapped


@dataclass
class OmniVisionConfig:
    depth: int = 32                  # defaults are Qwen2.5-Omni-7B's (the 3B differs in out_hidden_size: 2048)
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584      # the language model's width
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112           # pixels
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    fused_qkv: bool = False          # plain Qwen2.5-VL files store q/k/v as one `qkv` Linear

    @property
    def patch_dim(self):
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_merged(self):
        """Window side in merged tokens (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_json(cls, d, source="config.json", fused_qkv=False):
        """A config.json's `vision_config` dict (the sizes must come from it: transformers' config class defaults
        are not the released models'). Older files name hidden_size `embed_dim` and in_channels `in_chans`."""
        d = dict(d)
        d.setdefault("hidden_size", d.get("embed_dim"))
        missing = [k for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size") if d.get(k) is None]
        if missing:
            raise InputError(source, f"vision_config lacks {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise InputError(source, f"vision_config hidden_act {d['hidden_act']!r} is not supported (Qwen2.5-VL uses 'silu')")
        rope = d.get("rope_parameters") or {}
        cfg = cls(depth=d["depth"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                  num_heads=d["num_heads"], out_hidden_size=d["out_hidden_size"],
                  in_channels=d.get("in_channels", d.get("in_chans", 3)),
                  patch_size=d.get("patch_size", d.get("spatial_patch_size", 14)),
                  temporal_patch_size=d.get("temporal_patch_size", 2), spatial_merge_size=d.get("spatial_merge_size", 2),
                  window_size=d.get("window_size", 112),
                  fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))),
                  rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))), fused_qkv=fused_qkv)
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise InputError(source, f"vision hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give a head "
                             "width divisible by 4 (2-D rotary)")
        if cfg.window_merged < 1:
            raise InputError(source, f"window_size {cfg.window_size} px is smaller than one merged token")
        return cfg


# ---------------------------------------------------------------------------------------------------
# Layout: the token orders and attention segments, computed on the host from the grid sizes alone

def grid_list(grid_thw):
    """(n, 3) tensor or nested list -> [(t, h, w), ...] of ints (a CUDA tensor costs one sync here)."""
    rows = grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw
    return [tuple(int(v) for v in row) for row in rows]


def window_order(grid, merge, window):
    """Merged-token order that makes every window contiguous, and the windows' lengths in merged tokens.
    Per frame group: windows row-major, edge windows clipped; inside a window: merged tokens row-major."""
    order, lens, offset = [], [], 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        ids = torch.arange(gh * gw).view(gh, gw)
        frame = [ids[y:y + window, x:x + window].flatten() for y in range(0, gh, window) for x in range(0, gw, window)]
        one = torch.cat(frame)
        order += [one + offset + f * gh * gw for f in range(t)]
        lens += [len(b) for b in frame] * t
        offset += t * gh * gw
    return torch.cat(order), lens


def rotary_positions(grid, merge):
    """(row, column) of every patch, in the processor's merge-block order -> (P, 2) long."""
    pos = []
    for t, h, w in grid:
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        pos.append(torch.stack([blocks(y), blocks(x)], -1).repeat(t, 1))
    return torch.cat(pos)


def segments(lens):
    """Consecutive runs of the given lengths, padded to the longest, for one batched attention call:
    gather (n, L) token index of each slot (padding -> token 0), valid (n, L) bool or None when no padding,
    scatter (P,) the flat slot of every token (to undo the gather)."""
    lens_t = torch.tensor(lens)
    L, starts = max(lens), torch.cumsum(lens_t, 0) - lens_t
    slot = torch.arange(L)
    valid = slot < lens_t[:, None]
    gather = torch.where(valid, starts[:, None] + slot, 0)
    scatter = (torch.arange(len(lens)) * L).repeat_interleave(lens_t) + torch.arange(sum(lens)) - starts.repeat_interleave(lens_t)
    return gather, (None if min(lens) == L else valid), scatter


def vision_layout(grid_thw, cfg: OmniVisionConfig, device):
    """Everything the forward needs that depends only on the grid sizes, built on the host, copied once."""
    grid, m = grid_list(grid_thw), cfg.spatial_merge_size
    if any(h % m or w % m for _, h, w in grid):
        raise ValueError(f"grid_thw {grid}: heights and widths (in patches) must be multiples of the merge size {m}")
    merged_order, win_lens = window_order(grid, m, cfg.window_merged)
    patch_order = (merged_order[:, None] * m * m + torch.arange(m * m)).flatten()  # each merged token's m*m patches
    frame_lens = [h * w for t, h, w in grid for _ in range(t)]
    to = lambda x: None if x is None else x.to(device, non_blocking=True)
    return dict(patch_order=to(patch_order), positions=to(rotary_positions(grid, m)[patch_order]),
                unorder=to(torch.argsort(merged_order)),
                windows=tuple(map(to, segments([n * m * m for n in win_lens]))),
                frames=tuple(map(to, segments(frame_lens))))


# ---------------------------------------------------------------------------------------------------
# Modules (names = the released ones under `visual.`, so the key map is the identity minus a prefix)

def rotate(x, cos, sin):
    """Rotate-half rotary in float32 (the reference casts float64 inputs down too), cast back."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def attend(q, k, v, seg):
    """q, k, v (P, H, D); seg from segments(): attention within each segment, one batched sdpa call."""
    gather, valid, scatter = seg
    qs, ks, vs = (t[gather].transpose(1, 2) for t in (q, k, v))  # (n, H, L, D)
    y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=None if valid is None else valid[:, None, None, :])
    return y.transpose(1, 2).flatten(0, 1)[scatter]  # (P, H, D)


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, k, stride=k, bias=False)

    def forward(self, x):
        """(P, C*t*p*p) -> (P, D). A conv whose kernel is its stride, over one patch, is a matmul over the patch's
        (c, t, y, x) values; run as the conv, as the reference does, so float32 sums round the same way."""
        w = self.proj.weight
        return self.proj(x.to(w.dtype).view(-1, *w.shape[1:])).view(x.shape[0], -1)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, self.n_heads = cfg.hidden_size, cfg.num_heads
        if cfg.fused_qkv:
            self.qkv = nn.Linear(D, 3 * D)  # rows [q; k; v]
        else:
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.proj = nn.Linear(D, D)

    def forward(self, x, cos, sin, seg):
        P = x.shape[0]
        q, k, v = self.qkv(x).chunk(3, -1) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.view(P, self.n_heads, -1) for t in (q, k, v))
        y = attend(rotate(q, cos, sin), rotate(k, cos, sin), v, seg)
        return self.proj(y.reshape(P, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden_size, 1e-6), RMSNorm(cfg.hidden_size, 1e-6)
        self.attn, self.mlp = VisionAttention(cfg), VisionMLP(cfg)

    def forward(self, x, cos, sin, seg):
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        wide = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, cfg.out_hidden_size))

    def forward(self, x):
        """(P, D) with each merge group's patches adjacent -> (P / m^2, out): the group concatenated, then the MLP."""
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class OmniVision(nn.Module):
    def __init__(self, cfg: OmniVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.grad_checkpointing = False  # recompute each block in the backward (memory for compute)

    def rotary(self, positions):
        """(P, 2) (row, column) -> cos, sin (P, 1, head_dim) float32 in the layout [h, w, h, w]."""
        half = self.cfg.hidden_size // self.cfg.num_heads // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
        angles = (positions[..., None].float() * inv_freq).flatten(1)  # (P, 2 * half/2): [h freqs, w freqs]
        angles = torch.cat((angles, angles), -1)[:, None]
        return angles.cos(), angles.sin()

    def forward(self, pixel_values, grid_thw, layout=None):
        """pixel_values (P, C*t*p*p) from omni_video.patchify, grid_thw (n, 3) per image/video (tensor or host list:
        a host list avoids the one sync) -> (P / merge^2, out_hidden_size), merged tokens in the processor's order.
        layout: vision_layout(grid_thw, cfg, device), when the caller already built it."""
        layout = layout or vision_layout(grid_thw, self.cfg, pixel_values.device)
        if tuple(pixel_values.shape) != (len(layout["patch_order"]), self.cfg.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match grid_thw: expected "
                             f"({len(layout['patch_order'])}, {self.cfg.patch_dim})")
        x = self.patch_embed(pixel_values)[layout["patch_order"]]
        cos, sin = self.rotary(layout["positions"])
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = run_block(self, block, x, cos, sin, layout["frames"] if i in full else layout["windows"])
        return self.merger(x)[layout["unorder"]]


# ---------------------------------------------------------------------------------------------------
# Released weights: `thinker.visual.*` (full Omni file), `visual.*` (thinker-only file, Qwen2.5-VL), or bare

def has_fused_qkv(keys, prefix="visual."):
    """True for a plain Qwen2.5-VL vision tower (one `attn.qkv` per block), False for Omni's separate q/k/v."""
    return f"{prefix}blocks.0.attn.qkv.weight" in set(keys)


def vision_keymap(cfg: OmniVisionConfig, prefix="visual."):
    """{released key: our key}: our names are the released ones minus `prefix`, listed from the config (so a
    missing or extra block in a file is named, not silently accepted)."""
    ours = ["patch_embed.proj.weight", "merger.ln_q.weight"] + [f"merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    attn = ("qkv", "proj") if cfg.fused_qkv else ("q", "k", "v", "proj")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        ours += [b + "norm1.weight", b + "norm2.weight"]
        ours += [f"{b}{mod}.{name}.{p}" for mod, names in (("attn", attn), ("mlp", ("gate_proj", "up_proj", "down_proj")))
                 for name in names for p in ("weight", "bias")]
    return {prefix + k: k for k in ours}


def load_vision(model: OmniVision, state, source, prefix="visual.", skip=None):
    """Copy a released vision tower into `model`; every missing, unexpected and mis-shaped key is named at once
    (weights.load_mapped). skip(key): released keys that belong to other parts (default: all outside `prefix`)."""
    skip = skip or (lambda key: not key.startswith(prefix))
    load_mapped(model, state, vision_keymap(model.cfg, prefix), source, skip=skip)
    return model
