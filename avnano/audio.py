"""Whisper's log-mel front end and audio encoder (Radford et al. 2022, "Robust Speech Recognition via
Large-Scale Weak Supervision"), in torch, with the slaney mel filterbank computed in code.

Front end (as transformers' WhisperFeatureExtractor): 16 kHz mono, 400-point STFT (25 ms Hann window)
every 160 samples (10 ms), last STFT frame dropped, power spectrum, slaney-normalised mel filters
(80 or 128 bins, 0-8 kHz), log10 clamped at 1e-10, floored at max - 8, then (x + 4) / 4.
Encoder: conv(k3, s1) -> GELU -> conv(k3, s2) -> GELU -> + stored positions -> pre-LN blocks (exact
GELU, k_proj without bias) -> final LayerNorm; the stride-2 conv halves 100 mel frames/s to 50 tokens/s.
Departure (off by default, `pool`): from-scratch presets average-pool those 50 tokens/s before the
blocks (the tiny preset: 5 -> 10 tokens/s), since the aligner keeps only 2 tokens/s anyway.
Two modes:
- exact: pad / trim to 30 s (3000 mel frames, 1500 tokens), what released Whisper weights expect;
- native: no padding; the position table is sliced to the clip's length. Cheaper for short clips and
  what the toy world uses. Departure: released Whisper never saw unpadded input, so its features
  differ from exact mode's near the end of the clip (and the max-8 floor sees only the clip).
"""
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import masks
from .transformer import EncoderBlock, run_block

SAMPLE_RATE = 16000
N_FFT = 400                                  # 25 ms window
HOP = 160                                    # 10 ms hop
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE      # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP                  # 3000 mel frames in a 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP       # 100 mel frames per second
TOKENS_PER_SECOND = FRAMES_PER_SECOND // 2   # 50 encoder tokens per second (conv2 has stride 2)


def hz_to_mel(f):
    """Slaney scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4)."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f = 200.0 * m / 3.0
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), f)


def mel_filters(n_mels=80, n_fft=N_FFT, sample_rate=SAMPLE_RATE, f_max=8000.0):
    """Triangular filters on the slaney mel scale, slaney-normalised (area ~1): (n_fft//2 + 1, n_mels)."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))


@functools.lru_cache(maxsize=8)
def _filters(n_mels, device):
    """mel_filters as a torch tensor, built once per (n_mels, device): log_mel runs every step."""
    return torch.from_numpy(mel_filters(n_mels)).to(device, torch.float32)


def log_mel(audio, n_mels=80, exact=True, seconds=CHUNK_SECONDS):
    """audio: float (samples,) or (B, samples) at 16 kHz -> (B, n_mels, frames).
    exact=True pads / trims to `seconds` first (Whisper: 30 s, 3000 frames); else frames = samples // HOP, with
    audio shorter than one window (25 ms: the tail segment of a long clip, say) zero-padded to it (2 frames), as
    the STFT's reflect padding needs more samples than half a window."""
    audio = torch.as_tensor(audio, dtype=torch.float32, device=audio.device if torch.is_tensor(audio) else "cpu")
    if audio.dim() == 1:
        audio = audio[None]
    if exact:
        n = int(seconds * SAMPLE_RATE)
        audio = F.pad(audio, (0, max(0, n - audio.shape[-1])))[:, :n]
    elif audio.shape[-1] < N_FFT:
        audio = F.pad(audio, (0, N_FFT - audio.shape[-1]))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP, window=window, return_complex=True)  # centre + reflect padding
    power = torch.view_as_real(stft[..., :-1]).pow(2).sum(-1)  # |X|^2 without a square root
    filters = _filters(n_mels, audio.device)
    mel = filters.T @ power
    log_spec = mel.clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


class MelSegments(NamedTuple):
    """A clip's audio as the encoder reads it, cut into segments of at most t_max (AudioConfig.max_seconds):
    log-mel per segment and each segment's encoder tokens of real audio. Computed by mel_segments(), in a data
    worker (data.ClipStore with `audio=`) or by model.encode_audio from the waveform: the same numbers either way."""
    mels: list    # [(n_mels, frames_s) float32] per segment
    tokens: list  # [int] encoder tokens of real audio per segment (at least 1)


def mel_segments(wav, cfg):
    """float waveform (samples,) at 16 kHz -> MelSegments for an encoder of config cfg (an AudioConfig). Always
    float32 (autocast off): a data worker and the training process compute the same numbers."""
    seg = int(cfg.max_seconds * SAMPLE_RATE)
    pieces = [wav[start:start + seg] for start in range(0, max(len(wav), 1), seg)]
    with torch.autocast(wav.device.type, enabled=False):
        mels = [log_mel(w.float(), cfg.n_mels, cfg.exact, cfg.max_seconds)[0] for w in pieces]
    return MelSegments(mels, [n for _, n in segment_sizes(wav, cfg)])


def segment_sizes(audio, cfg):
    """[(mel frames, encoder tokens of real audio)] per segment of a waveform or of MelSegments: the sizes
    mel_segments gives (the one place the per-segment token count is computed), without the log-mel."""
    if isinstance(audio, MelSegments):
        return [(m.shape[-1], n) for m, n in zip(audio.mels, audio.tokens)]
    seg = int(cfg.max_seconds * SAMPLE_RATE)
    lens = [min(seg, len(audio) - start) for start in range(0, max(len(audio), 1), seg)]
    return [(seg // HOP if cfg.exact else max(n, N_FFT) // HOP, max(1, cfg.n_tokens(n // HOP))) for n in lens]


@dataclass
class AudioConfig:
    n_mels: int = 80
    dim: int = 384
    n_layers: int = 4
    n_heads: int = 6
    hidden_dim: int = 1536
    max_positions: int = 1500    # encoder tokens (30 s at 50 tokens/s)
    exact: bool = False          # True: pad/trim to 30 s as released Whisper expects
    pool: int = 1                # > 1: average-pool the conv stem's tokens by this before the blocks

    @property
    def tokens_per_second(self):
        return TOKENS_PER_SECOND / self.pool

    @property
    def max_seconds(self):
        return self.max_positions / self.tokens_per_second

    def n_tokens(self, mel_frames):
        """Encoder tokens for this many mel frames: stride-2 conv, then the pooling (partial windows count)."""
        stem = -(-mel_frames // 2)
        return -(-stem // self.pool)


def sinusoids(length, channels, max_timescale=10000, dtype=None):
    """Whisper's sinusoidal table: initialises a fresh Whisper encoder (released ones are loaded) in the default
    dtype; Qwen2.5-Omni's audio tower computes it with dtype=float32, as its released model does."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=dtype))
    t = torch.arange(length)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], dim=1)


def _before(lengths, x):
    """(B,) lengths, x (B, C, T) -> (B, 1, T) mask in x's dtype, 1 on row b's first lengths[b] steps."""
    return (torch.arange(x.shape[-1], device=x.device)[None] < lengths[:, None]).to(x.dtype)[:, None]


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, 3, stride=2, padding=1)
        self.pos_embed = nn.Parameter(sinusoids(cfg.max_positions, cfg.dim))
        self.blocks = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads, cfg.hidden_dim, "gelu", 1e-5, k_bias=False)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.grad_checkpointing = False  # recompute each block in the backward (memory for compute)

    def forward(self, mel, lengths=None):
        """mel (B, n_mels, frames) -> (B, cfg.n_tokens(frames), dim). lengths: each row's real mel frames in a
        padded batch; the conv stem, the pooling and the attention then see nothing past a row's end, exactly
        as when the row is encoded alone (None: every frame is real, e.g. Whisper's 30 s padding)."""
        mask = None
        x = F.gelu(self.conv1(mel))
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device)
            x = x * _before(lengths, x)
        x = F.gelu(self.conv2(x))
        if lengths is not None:
            real = _before((lengths + 1) // 2, x)  # the stride-2 conv
            x = x * real
            tokens = ((lengths + 1) // 2 + self.cfg.pool - 1) // self.cfg.pool  # cfg.n_tokens, per row
            valid = torch.arange(-(-x.shape[-1] // self.cfg.pool), device=x.device)[None] < tokens.clamp(min=1)[:, None]
            mask = masks.for_sdpa(masks.key_padding(valid).expand(-1, valid.shape[1], -1))
        if self.cfg.pool > 1:
            x = F.avg_pool1d(x, self.cfg.pool, ceil_mode=True)
            if lengths is not None:  # a partial last window averages its real tokens only
                x = x / F.avg_pool1d(real, self.cfg.pool, ceil_mode=True).clamp(min=1.0 / self.cfg.pool)
        x = x.transpose(1, 2)
        T = x.shape[1]
        if T > self.cfg.max_positions:
            raise ValueError(f"audio of {T} encoder tokens exceeds the position table ({self.cfg.max_positions}); "
                             "cut it into segments of at most max_seconds")
        x = x + self.pos_embed[:T]
        for block in self.blocks:
            x = run_block(self, block, x, mask)
        return self.norm(x)
