"""Qwen2.5-Omni's audio tower and its input features (Xu et al. 2025, "Qwen2.5-Omni Technical Report"):
Whisper-large-v3's encoder run over 2 s chunks, 25 tokens per second, as transformers' Qwen2_5OmniAudioEncoder.

Features: avnano/audio.py's 128-bin log-mel, as WhisperFeatureExtractor(feature_size=128, chunk_length=300) is
called by Qwen2_5OmniProcessor: zero-padded to 300 s (4.8M samples), max-8 floor over the padded clip, and the
attention mask keeps ceil(S / 160) frames (at most 30000), the frames the thinker hands the tower.
Tower, per clip of T mel frames:
  1. cut into chunks of W = 2 n_window frames (the last one shorter), each encoded on its own:
     conv1(k3) -> GELU -> conv2(k3, stride 2) -> GELU, with zeros past a chunk's end (the convs' padding);
  2. + sinusoidal positions that restart at 0 in every chunk (the table is computed, not stored);
  3. pre-LN blocks (avnano/transformer.py's EncoderBlock: exact GELU, k_proj without bias), attention only
     within a chunk: the chunks run as a batch, a short last chunk masks its padding keys;
  4. the clip's ceil(T / 2) tokens back in order, averaged in pairs (stride-2 pooling over the clip's whole token
     sequence, as transformers pairs them; an odd last token is dropped), ln_post, proj to the LLM width:
     T = 100 frames/s -> 25 tokens/s.
Departures: none in the numerics. transformers clamps float16 activations after every block; avnano does not
run this tower in float16 (bfloat16 / float32 / float64 only).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import masks
from .audio import HOP, N_FFT, SAMPLE_RATE, log_mel, sinusoids
from .errors import InputError
from .transformer import EncoderBlock, block_keymap, run_block

N_MELS = 128
MAX_SECONDS = 300                              # the Omni processor's chunk_length: it pads / truncates to this
MAX_FRAMES = MAX_SECONDS * SAMPLE_RATE // HOP  # 30000 mel frames
OMNI_AUDIO_UNUSED = ("audio_bos_eos_token.weight",)  # stored in every checkpoint, read by no forward


@dataclass
class OmniAudioConfig:
    n_mels: int = N_MELS
    dim: int = 1280           # d_model
    n_layers: int = 32
    n_heads: int = 20
    hidden_dim: int = 5120    # encoder_ffn_dim
    max_positions: int = 1500  # max_source_positions: rows of the (computed) position table
    n_window: int = 100       # a chunk is 2 n_window mel frames (2 s) -> n_window tokens
    output_dim: int = 3584    # the LLM width (3584 for the 7B thinker, 2048 for the 3B)

    JSON_KEYS = {"n_mels": "num_mel_bins", "dim": "d_model", "n_layers": "encoder_layers",
                 "n_heads": "encoder_attention_heads", "hidden_dim": "encoder_ffn_dim",
                 "max_positions": "max_source_positions", "n_window": "n_window", "output_dim": "output_dim"}

    @classmethod
    def from_json(cls, d, source="config.json"):
        """config.json's audio_config (thinker_config.audio_config in the full checkpoint) -> OmniAudioConfig."""
        if not isinstance(d, dict):
            raise InputError(source, "audio_config is not a JSON object")
        act = d.get("activation_function", "gelu")
        if act != "gelu":
            raise InputError(source, f"audio_config.activation_function {act!r}: only 'gelu' is implemented")
        missing = [k for k in cls.JSON_KEYS.values() if k not in d]
        if missing:
            raise InputError(source, f"audio_config lacks {', '.join(missing)}")
        cfg = cls(**{f.name: int(d[cls.JSON_KEYS[f.name]]) for f in fields(cls)})
        if cfg.dim % cfg.n_heads or cfg.dim % 2:
            raise InputError(source, f"audio_config: d_model {cfg.dim} is not divisible by "
                                     f"{cfg.n_heads} heads (and by 2 for the position table)")
        if cfg.n_window > cfg.max_positions:
            raise InputError(source, f"audio_config: n_window {cfg.n_window} exceeds max_source_positions")
        return cfg


def audio_token_count(mel_frames):
    """Tokens the tower gives for T mel frames (int, or a long tensor elementwise): the stride-2 conv keeps
    a = ceil(T / 2) = (T - 1) // 2 + 1, the pairwise pooling (a - 2) // 2 + 1 = floor(a / 2). 100 frames -> 25."""
    a = (mel_frames - 1) // 2 + 1
    return (a - 2) // 2 + 1


def audio_features(wav):
    """float 16 kHz mono (S,) -> float32 (128, T), T = min(ceil(S / 160), 30000): what the Omni processor's
    WhisperFeatureExtractor returns under its attention mask. transformers computes the log-mel of the clip
    zero-padded to 300 s; only the zeros within half a window (200 samples) of the kept frames reach them, and
    frames of zeros only give log10(1e-10) = -10, never above the max the -8 floor is taken from. So the clip
    padded by one frame's reach (or to 300 s, whichever is shorter) gives the same numbers at a fraction of
    the cost (a 10 s clip: 1,002 STFT frames instead of 30,001)."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.dim() != 1:
        raise ValueError(f"audio_features takes mono samples (S,), got shape {tuple(wav.shape)}")
    wav = wav[:MAX_SECONDS * SAMPLE_RATE]  # the processor truncates past 300 s
    frames = -(-wav.shape[0] // HOP)
    padded = min(MAX_SECONDS * SAMPLE_RATE, frames * HOP + N_FFT)
    return log_mel(F.pad(wav, (0, padded - wav.shape[0])), N_MELS, exact=False)[0, :, :frames]


def _batch(features, lengths):
    """The three input forms -> (B, n_mels, T) tensor and a host list of B lengths."""
    if isinstance(features, (list, tuple)):
        lengths = [f.shape[-1] for f in features]
        features = torch.stack([F.pad(f, (0, max(lengths) - f.shape[-1])) for f in features]) if features else None
    elif features.dim() == 2:
        features, lengths = features[None], [features.shape[-1]]
    elif lengths is None:
        lengths = [features.shape[-1]] * features.shape[0]
    lengths = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if features is not None and (len(lengths) != features.shape[0] or max(lengths, default=0) > features.shape[-1]):
        raise ValueError(f"lengths {lengths} do not fit features of shape {tuple(features.shape)}")
    return features, lengths


def _layout(lengths, W, device):
    """Host-side index arithmetic for one batch. Chunk k of clip b covers frames [kW, min((k+1)W, T_b)); chunks
    are listed clip by clip. Returns (chunk_clip (N,), chunk_start (N,), chunk_len (N,), first (n_out,), every
    chunk full (bool)): `first` indexes the flattened (N x W/2) token grid at the first token of every pooled pair.
    Only a clip's last chunk can be short, so a clip's tokens are contiguous in the grid and a pair's second token
    is the next slot, also when the pair straddles two chunks (odd n_window).
    Example, n_window = 2 (W = 4), one clip of T = 10 frames: chunks of 4, 4, 2 frames -> 2, 2, 1 tokens at grid
    slots 0 1 | 2 3 | 4 (5 is padding); pairs (0,1) (2,3), token 4 dropped: first = [0, 2]."""
    clip, start, size, first = [], [], [], []
    for b, T in enumerate(lengths):
        base = len(clip)
        for s in range(0, T, W):
            clip.append(b), start.append(s), size.append(min(W, T - s))
        real = [(base + s // W) * (W // 2) + (s % W) // 2 for s in range(0, T, 2)]  # the clip's tokens in order
        first += real[0:2 * (len(real) // 2):2]
    as_long = lambda v: torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)
    return as_long(clip), as_long(start), as_long(size), as_long(first), min(size) == W


class OmniAudio(nn.Module):
    def __init__(self, cfg: OmniAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads, cfg.hidden_dim, "gelu", 1e-5, k_bias=False)
                                    for _ in range(cfg.n_layers))
        self.ln_post = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.proj = nn.Linear(cfg.dim, cfg.output_dim)
        # Whisper's table, float32 whatever the default dtype (a float64 run casts it up); not a checkpoint key
        self.register_buffer("pos", sinusoids(cfg.n_window, cfg.dim, dtype=torch.float32), persistent=False)
        self.grad_checkpointing = False  # recompute each block in the backward (memory for compute)

    def forward(self, features, lengths=None):
        """features: (n_mels, T) one clip | a list of (n_mels, T_i) | (B, n_mels, T) padded with lengths (B,)
        (host ints or a CPU tensor; the padding may hold anything) -> (sum_b audio_token_count(T_b), output_dim):
        the clips' tokens concatenated in order, as transformers' audio_tower(...).last_hidden_state."""
        features, lengths = _batch(features, lengths)
        W, dtype, device = 2 * self.cfg.n_window, self.conv1.weight.dtype, self.conv1.weight.device  # proj may be float32
        n_out = sum(audio_token_count(T) for T in lengths)
        if n_out == 0 or features is None:
            return torch.zeros(0, self.cfg.output_dim, dtype=dtype, device=device)
        features = features.to(device, non_blocking=True)
        clip, start, size, first, full = _layout(lengths, W, device)
        # (N, n_mels, W) chunks: frame j of chunk n is frame start[n] + j of its clip, zero past the chunk's end
        step = torch.arange(W, device=device)
        real = step[None] < size[:, None]                                  # (N, W)
        at = (start[:, None] + step[None]).clamp(max=features.shape[-1] - 1)
        chunks = torch.where(real[:, :, None], features[clip[:, None], :, at], 0).transpose(1, 2).to(dtype)
        x = F.gelu(self.conv1(chunks)) * real[:, None].to(dtype)  # conv2 must see zeros past the end
        x = F.gelu(self.conv2(x)).transpose(1, 2)                  # (N, n_window, dim)
        x = x + self.pos.to(dtype)
        valid = step[None, :W // 2] < (size[:, None] + 1) // 2     # the stride-2 conv's real tokens
        mask = None if full else masks.for_sdpa(masks.key_padding(valid))
        for block in self.blocks:
            x = run_block(self, block, x, mask)
        x = x.reshape(-1, self.cfg.dim)
        x = (x[first] + x[first + 1]) / 2
        return self.proj(self.ln_post(x))


def omni_audio_keymap(cfg, hf_prefix="audio_tower.", our_prefix=""):
    """Released keys (`audio_tower.*`, or `thinker.audio_tower.*` in the full checkpoint) -> OmniAudio's.
    Skip hf_prefix + OMNI_AUDIO_UNUSED by name; the position table is not in the file."""
    h, o = hf_prefix, our_prefix
    m = {}
    for name in ("conv1", "conv2", "ln_post", "proj"):
        for p in ("weight", "bias"):
            m[f"{h}{name}.{p}"] = f"{o}{name}.{p}"
    for i in range(cfg.n_layers):
        m.update(block_keymap(f"{h}layers.{i}.", f"{o}blocks.{i}.",
                              ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"), k_bias=False))
    return m


def load_omni_audio(state, cfg, hf_prefix="audio_tower.", source="model.safetensors"):
    """An OmniAudio filled from the audio keys of a released state dict (other towers' keys are left alone);
    every missing or mis-shaped audio key, and every unknown key under hf_prefix, named in one InputError."""
    from .weights import load_mapped
    model = OmniAudio(cfg)
    audio = {k: v for k, v in state.items() if k.startswith(hf_prefix)}
    unused = {hf_prefix + k for k in OMNI_AUDIO_UNUSED}
    load_mapped(model, audio, omni_audio_keymap(cfg, hf_prefix), source, skip=lambda k: k in unused)
    return model
