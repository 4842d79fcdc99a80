"""Aligners (encoder width -> decoder width), audio segment embeddings, and the four ways to order
audio and visual tokens into one sequence for the decoder.

Aligners: linear (AVicuna), two-layer MLP with GELU (LLaVA 1.5; video-SALMONN 2's visual aligner) and
the window-level Q-Former of video-SALMONN 2 (SALMONN's audio aligner): learned queries cross-attend
to the audio-encoder frames inside each fixed window (0.5 s -> 2 tokens per second by default).
Every audio aligner returns (tokens, start time of each token).
Interleavers are orders, computed on the host from counts and times (model.av_block applies one as a single gather):
an index into [visual tokens frame by frame; audio tokens], with the tokens' times and modality (0 = visual, 1 = audio):
  concat     [V; A], the baseline every other order is compared against;
  per_frame  video-SALMONN 2 eqs. 6-8: frame i, then audio slice [l*i/n, l*(i+1)/n) (0-based);
  avti       AVicuna's Audio-Visual Token Interleaver with an audio-interleaving rate (AIR);
  chunked    Qwen2.5-Omni / AVoCaDO: 2 s chunks, each chunk's visual tokens then its audio tokens,
             with time-aligned position ids (ids_per_second ids per second; text continues after).
Audio token times are the *start* of their window; frame times are the frames' timestamps.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VISUAL, AUDIO = 0, 1


class MLPAligner(nn.Sequential):
    def __init__(self, d_in, d_out):
        super().__init__(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def make_aligner(kind, d_in, d_out):
    """Visual aligner: a token-wise map (linear or MLP) of the merged patch tokens."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return MLPAligner(d_in, d_out)
    raise ValueError(f"unknown visual aligner {kind!r} (linear, mlp)")


def make_audio_aligner(kind, d_in, d_out, frames_per_second, window=0.5, n_queries=1):
    """Audio aligner: encoder frames (T, d_in) -> (tokens, start time of each token in seconds)."""
    if kind == "qformer":
        return WindowQFormer(d_in, d_out, window, n_queries, frames_per_second)
    return FrameAligner(make_aligner(kind, d_in, d_out), frames_per_second)


class FrameAligner(nn.Module):
    """A linear / MLP aligner on every audio-encoder frame (AVicuna): one token per frame, timed at its start."""

    def __init__(self, net, frames_per_second):
        super().__init__()
        self.net, self.frames_per_second = net, frames_per_second

    def forward(self, x):
        return self.net(x), torch.arange(len(x), device=x.device).float() / self.frames_per_second

    def host_times(self, n_frames):
        """The times forward() gives n_frames frames, as a float32 numpy array (the same float32 arithmetic)."""
        return np.arange(n_frames, dtype=np.float32) / np.float32(self.frames_per_second)


class WindowQFormer(nn.Module):
    """video-SALMONN 2 window-level Q-Former (one cross-attention layer; the paper's is a BERT-style
    Q-Former, simplified here to queries -> cross-attention -> MLP, each pre-LN with a residual).
    Frames (T, d_in) at `frames_per_second` are cut into windows of `window` seconds; each window
    yields `n_queries` tokens. Windows = ceil(T / frames_per_window): a partial last window counts,
    its missing frames masked out. Output (windows * n_queries, d_out)."""

    def __init__(self, d_in, d_out, window=0.5, n_queries=1, frames_per_second=50, n_heads=4):
        super().__init__()
        self.n_queries, self.n_heads = n_queries, n_heads
        self.frames_per_window = max(1, round(window * frames_per_second))
        self.seconds_per_window = self.frames_per_window / frames_per_second  # window, rounded to whole frames
        self.queries = nn.Parameter(torch.randn(n_queries, d_in) * 0.02)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d_in), nn.LayerNorm(d_in), nn.LayerNorm(d_in)
        self.attn = nn.MultiheadAttention(d_in, n_heads, batch_first=True)
        self.mlp = MLPAligner(d_in, d_in)
        self.out = nn.Linear(d_in, d_out)

    def n_windows(self, n_frames):
        return math.ceil(n_frames / self.frames_per_window)

    def forward(self, x):
        """x (T, d_in) -> tokens (n_windows * n_queries, d_out), start time of each token (seconds)."""
        T, D = x.shape
        W, nw = self.frames_per_window, self.n_windows(T)
        pad = nw * W - T
        windows = F.pad(x, (0, 0, 0, pad)).view(nw, W, D)
        key_pad = torch.zeros(nw, W, dtype=torch.bool, device=x.device)
        if pad:
            key_pad[-1, W - pad:] = True  # True = ignore (nn.MultiheadAttention's convention)
        times = (torch.arange(nw, device=x.device) * self.seconds_per_window).repeat_interleave(self.n_queries)
        return self.attend(windows, key_pad), times.float()

    def attend(self, windows, key_pad):
        """windows (nw, W, d_in), key_pad (nw, W) True on padding -> tokens (nw * n_queries, d_out). The windows
        may come from many clips and segments at once (model.av_block gathers them all into one call)."""
        nw, _, D = windows.shape
        q = self.queries.expand(nw, -1, -1)
        kv = self.norm_kv(windows)
        h = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=key_pad, need_weights=False)[0]
        h = h + self.mlp(self.norm_mlp(h))
        return self.out(h.reshape(nw * self.n_queries, D))

    def host_times(self, n_frames):
        """The times forward() gives n_frames frames, as a float32 numpy array (the same float32 arithmetic)."""
        t = np.arange(self.n_windows(n_frames), dtype=np.float32) * np.float32(self.seconds_per_window)
        return np.repeat(t, self.n_queries)


class SegmentEmbedding(nn.Module):
    """video-SALMONN 2: audio longer than the encoder's t_max is cut into segments encoded separately;
    segment s > 0 adds a learned vector, segment 0 adds zeros (so short clips are unchanged)."""

    def __init__(self, max_segments, dim):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(max_segments, dim))

    def forward(self, x, segment):
        if segment == 0:
            return x
        if segment >= len(self.table):
            raise ValueError(f"audio segment {segment} exceeds the {len(self.table)} segment embeddings")
        return x + self.table[segment]


class TimeEmbedding(nn.Module):
    """Absolute time in seconds -> a vector added to each AV token: sinusoids of t at periods from
    0.5 s to 64 s, then a linear map. Departure from the seed papers (which rely on positions or
    textual timestamps): an explicit clock lets a small decoder read event times directly, whatever
    the clip length and frame rate."""

    def __init__(self, dim, n_freqs=16, min_period=0.5, max_period=64.0):
        super().__init__()
        periods = min_period * (max_period / min_period) ** (torch.arange(n_freqs) / (n_freqs - 1))
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)
        self.proj = nn.Linear(2 * n_freqs, dim)

    def forward(self, times):
        angles = times.float()[:, None] * self.omega
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))


# ------------------------------------------------------------------------------------- orders, on the host
# An order is an index into the stack [visual tokens frame by frame (n * t); audio tokens (l)]: the block is
# one gather of that stack, its times and modality the same gather of theirs. concat, per_frame and avti
# need only the counts, chunked also the times: all known on the host before anything is encoded, so
# model.av_block computes every clip's order with numpy and copies it to the device once per batch.
def nearest_index(l, n):
    """Nearest-neighbour resampling of l tokens to exactly n: the source of each, floor(i * l / n) in float32."""
    if l == n:
        return np.arange(n)
    return np.minimum(np.floor((np.arange(n) * l).astype(np.float32) / np.float32(max(n, 1))).astype(np.int64), l - 1)


def concat_order(n_frames, tokens_per_frame, n_audio):
    """Baseline: every visual token (frame by frame), then every audio token."""
    return np.arange(n_frames * tokens_per_frame + n_audio)


def per_frame_order(n_frames, tokens_per_frame, n_audio):
    """video-SALMONN 2 eqs. 6-8: H = concat_i(V_i, A[l*i/n : l*(i+1)/n]) for frames i = 0..n-1.
    When l is not a multiple of n the audio is first resampled (nearest) up to n * ceil(l / n)
    tokens, so every frame gets the same number of audio tokens and none is dropped."""
    n_v = n_frames * tokens_per_frame
    if n_frames == 0:
        return np.arange(n_audio)
    per = math.ceil(n_audio / n_frames)
    audio = n_v + nearest_index(n_audio, per * n_frames)
    return np.concatenate([np.arange(n_v).reshape(n_frames, tokens_per_frame), audio.reshape(n_frames, per)], 1).ravel()


def avti_order(n_frames, tokens_per_frame, n_audio, air=0.25):
    """AVicuna's AVTI. With n_v visual tokens the sequence has N = round(n_v / (1 - AIR)) slots, of
    which n_a = N - n_v (= round(N * AIR) up to rounding) are audio: the audio is resampled (nearest,
    in time order) to n_a tokens. With k = round(n_v / (n_a + 1)), audio takes slots 0, k+1,
    2(k+1), ... (every (k+1)-th slot) while audio lasts; visual tokens fill the other slots in order
    (and audio the slots left once the visual tokens run out).
    AIR 0.25 with n_v = 30: N = 40, n_a = 10, k = 3 -> [A V V V] x 10."""
    n_v = n_frames * tokens_per_frame
    if n_v == 0:  # audio-only clip: nothing to interleave with
        return np.arange(n_audio)
    n_a = round(n_v / (1.0 - air)) - n_v if n_audio else 0
    k = round(n_v / (n_a + 1))
    regular = np.arange(n_v + n_a) % (k + 1) == 0
    is_audio = regular & (np.cumsum(regular) <= n_a)  # every (k+1)-th slot while audio lasts
    is_audio |= np.cumsum(~is_audio) - ~is_audio >= n_v  # visual ran out: audio fills the rest
    order = np.empty(n_v + n_a, dtype=np.int64)
    order[is_audio] = n_v + nearest_index(n_audio, n_a)
    order[~is_audio] = np.arange(n_v)
    return order


def chunked_order(frame_times, tokens_per_frame, audio_times, chunk_seconds=2.0):
    """Qwen2.5-Omni time-chunked order: for each chunk [c*s, (c+1)*s), the visual tokens of the frames
    inside it, then the audio tokens inside it (times >= 0); empty chunks contribute nothing. One
    stable sort on 2 * chunk + modality. frame_times (n,), audio_times (l,): float32 arrays."""
    times = np.concatenate([np.repeat(frame_times, tokens_per_frame), audio_times])
    chunk = np.floor(times / np.float32(chunk_seconds)).astype(np.int64)
    return np.argsort(2 * chunk + (np.arange(len(times)) >= len(frame_times) * tokens_per_frame), kind="stable")


def omni_chunked_order(grid_thw, second_per_grid, n_audio, rope_cfg):
    """Qwen2.5-Omni's exact variant of chunked_order (its processor's audio-in-video layout, used by omni.py) for one
    video, grid_thw (t, h, w) in patches, and its own audio (25 tokens / s). The differences: chunks are cut on
    temporal *position ids*, not timestamps (temporal patch k has id floor(k * second_per_grid * 25), audio token i id
    i; a chunk ends where an id reaches the next multiple of 50), and a video chunk's tokens are all merged tokens of
    its temporal patches (grid order: patch, row, column). Video chunk j, then audio chunk j; the stream that lasts
    longer goes on alone. The cuts are omni_rope.av_chunks, the rule the TMRoPE ids are built on, so layout and
    positions cannot disagree. Returns the index into [video tokens; audio tokens]."""
    from .omni_rope import av_chunks
    t, h, w = grid_thw
    n_v = t * h * w // rope_cfg.merge ** 2
    spans = av_chunks(grid_thw, second_per_grid, n_audio, rope_cfg)
    return np.concatenate([np.arange(s, e) + (n_v if kind == "audio" else 0) for kind, s, e in spans] or [np.zeros(0, np.int64)])


def order(kind, frame_times, tokens_per_frame, audio_times, air=0.25, chunk_seconds=2.0):
    """One clip's block on the host: (index into [visual; audio], times float32, modality int64), from
    frame_times (n,) and audio_times (l,) as float32 arrays. None for a kind with no host order."""
    n, l = len(frame_times), len(audio_times)
    if kind == "concat":
        idx = concat_order(n, tokens_per_frame, l)
    elif kind == "per_frame":
        idx = per_frame_order(n, tokens_per_frame, l)
    elif kind == "avti":
        idx = avti_order(n, tokens_per_frame, l, air)
    elif kind == "chunked":
        idx = chunked_order(frame_times, tokens_per_frame, audio_times, chunk_seconds)
    else:
        return None
    n_v = n * tokens_per_frame
    times = np.concatenate([np.repeat(frame_times, tokens_per_frame), audio_times]).astype(np.float32)
    return idx, times[idx], (idx >= n_v).astype(np.int64)
