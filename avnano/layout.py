"""Sequence layout: ChatML prompt + AV block + caption -> decoder inputs, as AVCap reads them (AV tokens in the decoder's own sequence).

Each clip's interleaved AV tokens replace the `<|av|>` placeholder of its prompt ids; the caption
follows. The result is one padded batch: input embeddings, position ids, the AV flags the prefix mask
M needs, the valid (non-pad) flags, and labels already shifted (labels[t] is the token predicted *at*
position t, -100 where there is no loss). Positions are sequential, or time-aligned for the AV block
(a 1-D reduction of Qwen2.5-Omni's TMRoPE: a token at t seconds gets k + floor(t * ids_per_second), k the
placeholder's index, so tokens of one instant share an id) with text continuing after the block's largest id.
The clock (model.time_embed) is added to the AV tokens here, so the blocks that av_block() returns stay pure content
(the grounding loss reads them as they are).
The layout is planned on the host (plan_rows: numpy, from the ids and each block's token times) and copied
once (plan.py); assembling it on the device is one gather.
"""
from typing import NamedTuple

import numpy as np
import torch

from . import masks
from .plan import Plan, flat_tokens, host_view
from .tokenizer import AV


class Layout(NamedTuple):
    embeds: torch.Tensor     # (B, L, D) inputs_embeds
    positions: torch.Tensor  # (B, L) long position ids
    is_av: torch.Tensor      # (B, L) bool, True on the AV block
    valid: torch.Tensor      # (B, L) bool, False on padding
    labels: torch.Tensor     # (B, L) long, shifted targets, -100 = no loss
    label_index: torch.Tensor = None    # (n,) long: flat (B * L) index of the positions with a label, row by row
    label_targets: torch.Tensor = None  # (n,) long: their labels
    right_padded: bool = None           # known on the host: no row has padding before a real token


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
