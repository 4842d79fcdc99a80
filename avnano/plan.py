"""Host planning of a batch (departure from a per-clip loop of device ops, for a GPU that must not wait on the host).

Where every AV token goes is known before anything is encoded: ids are lists, frame times and audio lengths come
with the batch. A Plan holds those index arrays -- the interleave order of model.av_block (plan_av, here), the
sequence layout (layout.plan_rows), the grounding rows (grounding.plan_triples) -- built with numpy, and copies them
to the device in one pinned, non-blocking transfer per batch; the device then does one gather per tensor and never
reads a value back. Blocks carry their tokens' times on the host too, so what is built from them needs no read.
"""
import numpy as np
import torch

from .audio import segment_sizes
from .interleave import WindowQFormer, order

_DTYPES = {np.dtype(np.int64): torch.long, np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}


def to_device(arrays, device):
    """name -> numpy array, copied to `device` in one transfer: packed into one byte buffer (pinned when the
    device is a GPU, 8-byte aligned per array), one non-blocking copy, then viewed back -> name -> tensor."""
    device, spans, total = torch.device(device), {}, 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        spans[name], total = (total, a), total + -(-a.nbytes // 8) * 8
    buf = torch.empty(max(total, 8), dtype=torch.uint8, device="cpu", pin_memory=device.type == "cuda")
    host = buf.numpy()
    for name, (start, a) in spans.items():
        host[start:start + a.nbytes] = a.reshape(-1).view(np.uint8)
    if device.type != "cpu":
        buf = buf.to(device, non_blocking=True)
    return {name: buf[start:start + a.nbytes].view(_DTYPES[a.dtype]).view(a.shape) for name, (start, a) in spans.items()}


class Plan:
    """One batch's index arrays: `host` (numpy, filled by plan_av / layout.plan_rows / grounding.plan_triples) and `meta`
    (python numbers the host needs: counts, flags); to_device() copies `host` once and sets `dev`."""

    def __init__(self):
        self.host, self.meta, self.dev = {}, {}, None

    def to_device(self, device):
        self.dev = to_device(self.host, device)
        return self


class Block(tuple):
    """One clip's AV block (tokens (N, D), times (N,), modality (N,)) on the device that also carries
    `.host` = (times float32, modality int64) as numpy arrays, so what is built from it reads no device."""

    def __new__(cls, tokens, times, modality, host=None):
        self = super().__new__(cls, (tokens, times, modality))
        self.host = host
        return self


class Blocks(list):
    """model.av_block's list of Blocks; `.tokens` is all of them in one (sum N, D) tensor."""
    tokens = None


def host_view(block):
    """(times, modality) of a block as numpy: carried by a Block; read from the device otherwise (a sync)."""
    if getattr(block, "host", None) is not None:
        return block.host
    return block[1].detach().float().cpu().numpy(), block[2].detach().cpu().numpy()


def flat_tokens(blocks):
    """All blocks' tokens in one tensor (no copy when they came from one av_block call)."""
    return blocks.tokens if getattr(blocks, "tokens", None) is not None else torch.cat([b[0] for b in blocks])


def _numpy(t):
    return (t if t.device.type == "cpu" else t.cpu()).detach().numpy() if torch.is_tensor(t) else np.asarray(t)


def predecessors(counts):
    """Each frame's previous frame in a batch of clips with `counts` frames (a clip's first frame: itself)."""
    prev, starts = np.arange(sum(counts)) - 1, np.cumsum([0] + list(counts))[:-1]
    first = starts[np.asarray(counts, dtype=np.int64) > 0]
    prev[first] = first
    return prev


def plan_av(plan, model, frames_list, frame_times_list, audio_list):
    """Host half of model.av_block: which encoder rows each aligner reads, each frame's predecessor (visual
    delta), and every clip's interleave order as one index into [all visual tokens; all audio tokens]."""
    cfg, acfg, aligner = model.cfg, model.cfg.audio, model.audio_aligner
    tpf = cfg.tokens_per_frame
    frames = [len(f) if "v" in cfg.modalities else 0 for f in frames_list]
    ftimes = [_numpy(t).astype(np.float32) if n else np.zeros(0, np.float32) for t, n in zip(frame_times_list, frames)]
    starts = np.cumsum([0] + frames)[:-1]
    if cfg.visual_delta:
        plan.host["av.prev"] = predecessors(frames)
    # audio: pieces (clip, segment) of the padded encoder batch; the aligner's input rows and each token's time
    pieces = [(c, s, n) for c, a in enumerate(audio_list) for s, (_, n) in enumerate(segment_sizes(a, acfg))] \
        if "a" in cfg.modalities else []
    atimes, piece_idx, frame_idx, pad, seg = [[] for _ in audio_list], [], [], [], []
    for p, (c, s, n) in enumerate(pieces):
        if s >= cfg.max_segments:
            raise ValueError(f"audio segment {s} exceeds the {cfg.max_segments} segment embeddings")
        t = aligner.host_times(n) + np.float32(s * acfg.max_seconds)
        atimes[c].append(t)
        seg.append(np.full(len(t), s))
        if isinstance(aligner, WindowQFormer):
            W = aligner.frames_per_window
            j = np.arange(aligner.n_windows(n) * W).reshape(-1, W)
            frame_idx.append(np.minimum(j, n - 1)), pad.append(j >= n), piece_idx.append(np.full(j.shape, p))
        else:
            frame_idx.append(np.arange(n)), piece_idx.append(np.full(n, p))
    atimes = [np.concatenate(t) if t else np.zeros(0, np.float32) for t in atimes]
    plan.host["au.times"] = np.concatenate(atimes) if atimes else np.zeros(0, np.float32)
    shape = (0, aligner.frames_per_window) if isinstance(aligner, WindowQFormer) else (0,)
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(shape, dtype)
    plan.host.update({"au.piece": cat(piece_idx, np.int64), "au.frame": cat(frame_idx, np.int64)})
    if pad:
        plan.host["au.pad"] = cat(pad, np.bool_)
    seg = np.concatenate(seg) if seg else np.zeros(0, np.int64)
    plan.meta["au.later_segments"] = bool((seg > 0).any())
    if plan.meta["au.later_segments"]:
        plan.host["au.segment"] = seg
    plan.meta.update(frames=frames, audio=[len(t) for t in atimes], frame_times=ftimes, audio_times=atimes)
    # the interleave order of every clip, as one index into [visual; audio]
    n_visual, a_start = sum(frames) * tpf, np.cumsum([0] + [len(t) for t in atimes])
    index, hosts = [], []
    for c, (ft, at) in enumerate(zip(ftimes, atimes)):
        got = order(cfg.interleave, ft, tpf, at, cfg.air, cfg.chunk_seconds)
        if got is None:
            raise ValueError(f"unknown interleaver {cfg.interleave!r} (concat, per_frame, avti, chunked)")
        idx, times, modality = got
        n_v = len(ft) * tpf
        index.append(np.where(idx < n_v, starts[c] * tpf + idx, n_visual + a_start[c] + idx - n_v))
        hosts.append((times, modality))
    plan.meta.update(av=True, av_host=hosts, av_counts=[len(i) for i in index])
    plan.host["av.index"] = np.concatenate(index) if index else np.zeros(0, np.int64)
    plan.host["av.times"] = np.concatenate([h[0] for h in hosts]) if hosts else np.zeros(0, np.float32)
    plan.host["av.modality"] = np.concatenate([h[1] for h in hosts]) if hosts else np.zeros(0, np.int64)
    return plan


def mel_batch(mels, device, dtype):
    """Log-mel segments (n_mels, frames_i) -> one zero-padded (n, n_mels, max frames) batch on the device: padded on
    the host and sent in one pinned copy when they are host tensors, stacked on the device otherwise."""
    T = max(m.shape[-1] for m in mels)
    if any(m.device.type != "cpu" for m in mels):
        return torch.stack([torch.nn.functional.pad(m, (0, T - m.shape[-1])) for m in mels]).to(device, dtype)
    out = np.zeros((len(mels), mels[0].shape[0], T), dtype=np.float32)
    for i, m in enumerate(mels):
        out[i, :, :m.shape[-1]] = m.detach().float().numpy()
    return to_device({"mel": out}, device)["mel"].to(dtype)
