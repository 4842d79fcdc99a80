"""Sequence layout: ChatML prompt + AV block + caption -> decoder inputs, as AVCap reads them (AV tokens in the decoder's own sequence).

Each clip's interleaved AV tokens replace the `<|av|>` placeholder of its prompt ids; the caption
follows. The result is one padded batch: input embeddings, position ids, the AV flags the prefix mask
M needs, the valid (non-pad) flags, and labels already shifted (labels[t] is the token predicted *at*
position t, -100 where there is no loss). Positions are sequential, or time-aligned for the AV block
(a 1-D reduction of Qwen2.5-Omni's TMRoPE, see interleave.time_positions) with text continuing after
the block's largest id. The clock (model.time_embed) is added to the AV tokens here, so the blocks
that av_block() returns stay pure content (the grounding loss reads them as they are).
Host plan (departure from a per-clip loop of device ops, for a GPU that must not wait on the host):
where every token goes is known before anything is encoded -- ids are lists, frame times and audio
lengths come with the batch. A `Plan` holds those index arrays (model.av_block's interleave order, this
layout, the grounding rows), built with numpy, and copies them to the device in one pinned,
non-blocking transfer per batch; the device then does one gather per tensor and never reads back.
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from . import masks
from .audio import HOP, SAMPLE_RATE, MelSegments
from .interleave import WindowQFormer, order, time_positions
from .tokenizer import AV

_DTYPES = {np.dtype(np.int64): torch.long, np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}


class Layout(NamedTuple):
    embeds: torch.Tensor     # (B, L, D) inputs_embeds
    positions: torch.Tensor  # (B, L) long position ids
    is_av: torch.Tensor      # (B, L) bool, True on the AV block
    valid: torch.Tensor      # (B, L) bool, False on padding
    labels: torch.Tensor     # (B, L) long, shifted targets, -100 = no loss
    label_index: torch.Tensor = None    # (n,) long: flat (B * L) index of the positions with a label, row by row
    label_targets: torch.Tensor = None  # (n,) long: their labels
    right_padded: bool = None           # known on the host: no row has padding before a real token


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
    """One batch's index arrays: `host` (numpy, filled by plan_av / plan_rows / grounding.plan) and `meta`
    (python numbers the host needs: counts, flags); to_device() copies `host` once and sets `dev`."""

    def __init__(self):
        self.host, self.meta, self.dev = {}, {}, None

    def to_device(self, device):
        self.dev = to_device(self.host, device)
        return self


def _numpy(t):
    return (t if t.device.type == "cpu" else t.cpu()).detach().numpy() if torch.is_tensor(t) else np.asarray(t)


def segment_tokens(audio, acfg):
    """Encoder tokens of real audio in each t_max segment of one clip (as audio.mel_segments counts them)."""
    if isinstance(audio, MelSegments):
        return list(audio.tokens)
    seg = int(acfg.max_seconds * SAMPLE_RATE)
    return [max(1, acfg.n_tokens(min(seg, len(audio) - start) // HOP)) for start in range(0, max(len(audio), 1), seg)]


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
    tpf = cfg.vit.tokens_per_frame
    frames = [len(f) if "v" in cfg.modalities else 0 for f in frames_list]
    ftimes = [_numpy(t).astype(np.float32) if n else np.zeros(0, np.float32) for t, n in zip(frame_times_list, frames)]
    starts = np.cumsum([0] + frames)[:-1]
    if cfg.visual_delta:
        plan.host["av.prev"] = predecessors(frames)
    # audio: pieces (clip, segment) of the padded encoder batch; the aligner's input rows and each token's time
    pieces = [(c, s, n) for c, a in enumerate(audio_list) for s, n in enumerate(segment_tokens(a, acfg))] \
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


def plan_rows(plan, model, av_times, ids_list, loss_masks=None, left_pad=False):
    """Host half of assemble: per row, which source each slot reads (0 = a zero pad row, then the AV tokens,
    then the text embeddings), its position, flags and shifted label. av_times: per clip, its tokens' times."""
    cfg, rows, text = model.cfg, [], []
    for i, (times, ids) in enumerate(zip(av_times, ids_list)):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if model.av_id not in ids:
            raise ValueError(f"sample {i}: no {AV} placeholder in its ids")
        k = ids.index(model.av_id)  # the first placeholder is the prompt's; one inside a sampled completion stays a token
        after, n_av = ids[k + 1:], len(times)
        n = k + n_av + len(after)
        if cfg.time_positions:
            av_pos = k + np.floor(times * np.float32(cfg.ids_per_second)).astype(np.int64)
            nxt = av_pos.max() + 1 if n_av else k
            pos = np.concatenate([np.arange(k), av_pos, nxt + np.arange(len(after))])
        else:
            pos = np.arange(n)
        labels = np.full(n, -100)
        if loss_masks is not None:
            tgt = np.full(n, -100)
            tgt[k + n_av:] = np.where(np.asarray(loss_masks[i], dtype=bool)[k + 1:], after, -100)
            labels[:-1] = tgt[1:]  # position t predicts token t+1
        rows.append((k, n_av, len(after), pos, labels))
        text += ids[:k] + after
    B, L, n_av_all = len(rows), max(r[0] + r[1] + r[2] for r in rows), sum(len(t) for t in av_times)
    src, positions = np.zeros((B, L), np.int64), np.zeros((B, L), np.int64)
    is_av, valid, labels = np.zeros((B, L), bool), np.zeros((B, L), bool), np.full((B, L), -100)
    a0, t0 = 1, 1 + n_av_all
    for b, (k, n_av, n_after, pos, lab) in enumerate(rows):
        n = k + n_av + n_after
        s = L - n if left_pad else 0
        src[b, s:s + n] = np.concatenate([t0 + np.arange(k), a0 + np.arange(n_av), t0 + k + np.arange(n_after)])
        positions[b, s:s + n], is_av[b, s + k:s + k + n_av], valid[b, s:s + n], labels[b, s:s + n] = pos, True, True, lab
        a0, t0 = a0 + n_av, t0 + k + n_after
    flat = labels.reshape(-1)
    label_index = np.flatnonzero(flat != -100)
    plan.host.update({"rows.src": src, "rows.text": np.asarray(text, dtype=np.int64), "rows.positions": positions,
                      "rows.is_av": is_av, "rows.valid": valid, "rows.labels": labels, "rows.label_index": label_index,
                      "rows.label_targets": flat[label_index], "rows.av_times": np.concatenate(
                          [np.asarray(t, np.float32) for t in av_times]) if av_times else np.zeros(0, np.float32)})
    plan.meta.update(n_tokens=len(label_index), n_seq=int(valid.sum()),
                     right_padded=bool((np.diff(valid.astype(np.int64), axis=1) <= 0).all()))
    return plan


def assemble(model, blocks, ids_list, loss_masks=None, left_pad=False, plan=None) -> Layout:
    """blocks: per clip (tokens (N, D), times (N,), modality (N,)) from model.av_block; ids_list: per
    clip the ChatML ids holding one placeholder; loss_masks: per clip 0/1 over ids (1 = train on the
    token). Rows are right-padded, or left-padded for generation. plan: a Plan already holding this
    layout (plan_rows) on the device; made here (one copy) when None."""
    if plan is None or "rows.src" not in plan.host:
        plan = plan_rows(Plan(), model, [host_view(b)[0] for b in blocks], ids_list, loss_masks, left_pad).to_device(model.device)
    d, emb = plan.dev, model.decoder.embed
    av = flat_tokens(blocks) if len(blocks) else emb.weight.new_zeros(0, emb.weight.shape[1])
    if model.time_embed is not None:
        av = av + model.time_embed(d["rows.av_times"])
    source = torch.cat([emb.weight.new_zeros(1, emb.weight.shape[1]), av.to(emb.weight.dtype), emb(d["rows.text"])])
    return Layout(source[d["rows.src"]], d["rows.positions"], d["rows.is_av"], d["rows.valid"], d["rows.labels"],
                  d["rows.label_index"], d["rows.label_targets"], plan.meta["right_padded"])


def attention_mask(kind, is_av, valid, right_padded=None):
    """AVCap's prefix mask M or plain causal, with padded keys masked, in sdpa's shape.
    None = exactly causal (no padding inside the rows), so the decoder takes sdpa's is_causal path.
    right_padded: known on the host (Layout.right_padded); None reads it from `valid` (a device sync)."""
    if kind == "prefix":
        return masks.for_sdpa(masks.av_prefix(is_av) & masks.key_padding(valid))
    if kind != "causal":
        raise ValueError(f"unknown mask {kind!r} (prefix, causal)")
    if right_padded is None:
        right_padded = bool((valid.long().diff(dim=1) <= 0).all())
    return None if right_padded else masks.for_sdpa(masks.causal(valid.shape[1], valid.device) & masks.key_padding(valid))
