"""A Llama / Qwen2-style decoder in plain PyTorch: RMSNorm, RoPE, GQA, SwiGLU, a preallocated KV cache.

Implements the LLaMA architecture (Touvron et al. 2023) as released in Hugging Face's LlamaForCausalLM
(SmolLM2) and Qwen2ForCausalLM (Qwen2 adds a bias to q/k/v). Two numerical details follow the
reference on purpose, so released weights give the same logits: RMSNorm normalises in float32 and
casts back *before* multiplying by the weight, and RoPE angles are computed in float32 whatever the
model dtype. Departures from nanoGPT: explicit position ids and a boolean attention mask come from the
caller (see masks.py), so the AV model can splice encoder tokens in as `inputs_embeds`, give them
time-aligned positions and let them attend bidirectionally.
"""
import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import run_block


@dataclass
class DecoderConfig:
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2          # GQA: each kv head serves n_heads / n_kv_heads query heads
    head_dim: int = 0            # 0 -> dim // n_heads
    hidden_dim: int = 384        # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # "linear" rope scaling divides every frequency by this
    qkv_bias: bool = False       # True for Qwen2
    tie_embeddings: bool = True
    max_seq_len: int = 4096      # only sizes the KV cache by default
    mrope_section: tuple | None = None  # multimodal rope (Qwen2.5-Omni): frequencies per t, h, w axis, e.g. (16, 24, 24)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        if self.mrope_section is not None:
            self.mrope_section = tuple(int(s) for s in self.mrope_section)
            assert sum(self.mrope_section) == self.head_dim // 2, "mrope_section must sum to head_dim / 2"


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # float32 even for float64 inputs: this is what the reference does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, linear_factor, dtype, mrope_section=None):
    """cos/sin tables for integer positions -> (B, T, head_dim), half-split layout. positions (B, T), or
    (3, B, T) temporal / height / width ids with `mrope_section` (the multimodal rope of Qwen2-VL and
    Qwen2.5-Omni, see omni_rope.py): the head_dim / 2 frequencies are cut into sections that read the t,
    h, w ids in turn, the same pattern in both halves. (B, T) ids with a section = t = h = w (1-D rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    inv_freq = inv_freq / linear_factor
    if positions.dim() == 3:
        if mrope_section is None:
            raise ValueError("(3, B, T) position ids need DecoderConfig.mrope_section")
        edges = [0, *itertools.accumulate(mrope_section)]
        freqs = torch.cat([positions[i % 3, ..., None].float() * inv_freq[a:b]
                           for i, (a, b) in enumerate(zip(edges, edges[1:]))], dim=-1)
    else:
        freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D). rotate_half convention: the first and second halves of D form the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_heads, max_len, head_dim) each.

    Static shapes (the gpt-fast recipe): a forward of T tokens writes its keys at slots
    pos .. pos+T-1 with index_copy_, and attention reads the whole buffer, with a mask hiding the slots
    not written yet. `pos` is a 0-d tensor (filled slots, the same for every sequence: left padding
    keeps batches aligned), so a decode step has one shape from the first token to the last and
    torch.compile traces it once.
    """

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.slots = None

    def reserve(self, T):
        """Slots (T,) the next T tokens write to; the decoder advances `pos` after its last layer.
        The overflow check is asynchronous: no host sync, so decoding stays launch-ahead on a GPU."""
        torch._assert_async(self.pos + T <= self.max_len, f"KV cache full: {T} new tokens do not fit its {self.max_len} slots")
        self.slots = self.pos + torch.arange(T, device=self.pos.device)
        return self.slots

    def update(self, layer, k, v):
        """Write this step's keys/values (cast to the cache's dtype) and return the whole buffers."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def reorder(self, index):
        """Beam search: keep the rows named by `index` (B',) for every layer."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


# None: on CUDA only. A masked sdpa call with enable_gqa runs on the math kernel there (flash takes no mask, the
# memory-efficient kernel no GQA; torch's sdpa docs), which keeps (B, heads, T, S) fp32 scores per layer for the
# backward. With an additive mask the decoder expands the kv heads instead and the memory-efficient kernel runs.
ADDITIVE_MASK = None


def additive_mask(mask, dtype):
    """bool mask (B or 1, 1, T, S) -> 0 where True, -inf where False, in dtype (what sdpa would make of the bool mask
    in every layer's call; here once per forward, shared by all layers). Rows are stored padded to a multiple of 16
    keys and sliced back: the alignment the memory-efficient kernel wants (it pads an unaligned mask in every call)."""
    S = mask.shape[-1]
    out = torch.full((*mask.shape[:-1], -(-S // 16) * 16), float("-inf"), dtype=dtype, device=mask.device)
    return out[..., :S].masked_fill_(mask, 0.0)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        is_causal = mask is None  # exactly causal, no cache: the fused is_causal path
        # enable_gqa: each kv head serves its group of query heads without materialising repeated copies
        gqa = self.cfg.n_kv_heads != self.cfg.n_heads
        if gqa and mask is not None and mask.dtype != torch.bool:  # the additive mask of the CUDA path (see additive_mask)
            rep = self.cfg.n_heads // self.cfg.n_kv_heads
            k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)
        self.grad_checkpointing = False  # recompute each block in the backward (memory for compute)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def logits(self, h):
        return F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, mask=None, cache=None,
                last_only=False, return_hidden=False):
        """input_ids (B, T) or inputs_embeds (B, T, dim); positions (B, T) ints (default: the slots), or
        (3, B, T) t / h / w ids with cfg.mrope_section;
        mask: None (= causal) or bool (B or 1, 1, T, S) with True = may attend. With a cache, keys are
        its slots: S may stop at the last slot written (the rest is masked) or span all max_len.
        last_only: logits of the final position only (prefill)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if cache is not None:
            slots = cache.reserve(T)
            if mask is None:  # causal over every slot written so far
                mask = (torch.arange(cache.max_len, device=x.device) <= slots[:, None])[None, None]
            elif mask.shape[-1] < cache.max_len:
                mask = F.pad(mask, (0, cache.max_len - mask.shape[-1]), value=False)
        if mask is not None and (x.is_cuda if ADDITIVE_MASK is None else ADDITIVE_MASK):
            dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
            mask = additive_mask(mask, dtype)  # once per forward, shared by every layer
        if positions is None:
            positions = (slots if cache is not None else torch.arange(T, device=x.device)).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_linear_factor, x.dtype,
                                self.cfg.mrope_section)
        for block in self.blocks:
            x = run_block(self, block, x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        h = self.norm(x[:, -1:] if last_only else x)
        return h if return_hidden else self.logits(h)

    def new_cache(self, batch, max_len=None, dtype=None):
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, p.device, dtype or p.dtype)
