"""Sequence layout: ChatML prompt + AV block + caption -> decoder inputs, as AVCap reads them (AV tokens in the decoder's own sequence).

Each clip's interleaved AV tokens replace the `<|av|>` placeholder of its prompt ids; the caption
follows. The result is one padded batch: input embeddings, position ids, the AV flags the prefix mask
M needs, the valid (non-pad) flags, and labels already shifted (labels[t] is the token predicted *at*
position t, -100 where there is no loss). Positions are sequential, or time-aligned for the AV block
(a 1-D reduction of Qwen2.5-Omni's TMRoPE, see interleave.time_positions) with text continuing after
the block's largest id. The clock (model.time_embed) is added to the AV tokens here, so the blocks
that av_block() returns stay pure content (the grounding loss reads them as they are).
"""
from typing import NamedTuple

import torch

from . import masks
from .interleave import time_positions
from .tokenizer import AV


class Layout(NamedTuple):
    embeds: torch.Tensor     # (B, L, D) inputs_embeds
    positions: torch.Tensor  # (B, L) long position ids
    is_av: torch.Tensor      # (B, L) bool, True on the AV block
    valid: torch.Tensor      # (B, L) bool, False on padding
    labels: torch.Tensor     # (B, L) long, shifted targets, -100 = no loss


def _row(model, av, times, ids, loss_mask, i):
    """One clip: (embeds, positions, is_av, labels) before padding."""
    device, emb = model.device, model.decoder.embed
    ids = torch.as_tensor(ids, device=device)
    k = (ids == model.av_id).nonzero()
    if len(k) == 0:
        raise ValueError(f"sample {i}: no {AV} placeholder in its ids")
    k = int(k[0])  # the first placeholder is the prompt's; one inside a sampled completion stays a token
    before, after = ids[:k], ids[k + 1:]
    if model.time_embed is not None:
        av = av + model.time_embed(times)
    x = torch.cat([emb(before), av.to(emb.weight.dtype), emb(after)])
    n_av = len(av)
    if model.cfg.time_positions:
        av_pos = time_positions(times, k, model.cfg.ids_per_second)
        nxt = (av_pos.max() + 1) if n_av else torch.tensor(k, device=device)
        pos = torch.cat([torch.arange(k, device=device), av_pos, nxt + torch.arange(len(after), device=device)])
    else:
        pos = torch.arange(len(x), device=device)
    is_av = torch.zeros(len(x), dtype=torch.bool, device=device)
    is_av[k:k + n_av] = True
    labels = torch.full((len(x),), -100, dtype=torch.long, device=device)
    if loss_mask is not None:
        lm = torch.as_tensor(loss_mask, device=device).bool()
        tgt = torch.cat([torch.full((k + n_av,), -100, device=device, dtype=torch.long),
                         torch.where(lm[k + 1:], after, -100)])
        labels[:-1] = tgt[1:]  # position t predicts token t+1
    return x, pos, is_av, labels


def assemble(model, blocks, ids_list, loss_masks=None, left_pad=False) -> Layout:
    """blocks: per clip (tokens (N, D), times (N,), modality (N,)) from model.av_block; ids_list: per
    clip the ChatML ids holding one placeholder; loss_masks: per clip 0/1 over ids (1 = train on the
    token). Rows are right-padded, or left-padded for generation."""
    rows = [_row(model, av, times, ids, None if loss_masks is None else loss_masks[i], i)
            for i, ((av, times, _), ids) in enumerate(zip(blocks, ids_list))]
    L, B, D, device = max(len(r[0]) for r in rows), len(rows), rows[0][0].shape[-1], model.device
    out = Layout(torch.zeros(B, L, D, device=device, dtype=rows[0][0].dtype),
                 torch.zeros(B, L, dtype=torch.long, device=device),
                 torch.zeros(B, L, dtype=torch.bool, device=device),
                 torch.zeros(B, L, dtype=torch.bool, device=device),
                 torch.full((B, L), -100, dtype=torch.long, device=device))
    for b, (x, pos, is_av, labels) in enumerate(rows):
        s = slice(L - len(x), L) if left_pad else slice(0, len(x))
        out.embeds[b, s], out.positions[b, s], out.is_av[b, s], out.valid[b, s], out.labels[b, s] = x, pos, is_av, True, labels
    return out


def attention_mask(kind, is_av, valid):
    """AVCap's prefix mask M or plain causal, with padded keys masked, in sdpa's shape.
    None = exactly causal (no padding inside the rows), so the decoder takes sdpa's is_causal path."""
    if kind == "prefix":
        return masks.for_sdpa(masks.av_prefix(is_av) & masks.key_padding(valid))
    if kind != "causal":
        raise ValueError(f"unknown mask {kind!r} (prefix, causal)")
    right_padded = bool((valid.long().diff(dim=1) <= 0).all())
    return None if right_padded else masks.for_sdpa(masks.causal(valid.shape[1], valid.device) & masks.key_padding(valid))
