"""Grounding (departure, ours): which AV tokens show or sound each event (spans), and the logit-lens loss on them.

spans(): for each toy-world event, when and in which stream ("v" video, "a" audio) it can be seen or
heard, and the caption words that name it: a move over its interval, an appearance over the 1 s after
it (a disappearance over the 1 s before), a sound over its interval, a knock over +-0.5 s of video
around it (the sound alone does not tell which shape knocked), speech as the speaker over the whole
utterance plus each word over its own recording (the asset's length, then render.WORD_GAP of silence).
"""
import re

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .grammar import sentence
from .interleave import AUDIO, VISUAL
from .plan import Plan, flat_tokens, host_view
from .render import WORD_GAP, word_audio

POINT_WINDOW = 1.0         # seconds of video that show an appearance / disappearance
KNOCK_WINDOW = 0.5         # seconds of video either side of a knock
MISSING_WORD_SECONDS = 0.5  # a word with no speech asset: about the mean word's length


def spans(events):
    """Per event: (t0, t1, modalities, text, words) for the grounding loss -- the AV tokens of these
    modalities ("v", "a") whose time is in [t0, t1] show or sound the event, and should name the
    `words` of its caption sentence `text` (timestamp removed)."""
    out = []
    for e in events:
        text = re.sub(r" (at|from) .*$", "", sentence(e))
        if e["type"] == "speech":  # the speaker over the utterance, each word over its own audio
            t = e["start"]
            for w in e["text"].split():
                try:
                    dur = len(word_audio(e["speaker"], w)) / SAMPLE_RATE
                except FileNotFoundError:
                    dur = MISSING_WORD_SECONDS
                out.append((t, t + dur, "a", text, [w]))
                t += dur + WORD_GAP
            span, mods, words = (e["start"], t), "a", [e["speaker"]]
        elif e["type"] == "audio":
            span, mods, words = (e["start"], e["end"]), "a", e["sound"].split()
        elif e["type"] == "av":
            span, mods, words = (e["start"] - KNOCK_WINDOW, e["start"] + KNOCK_WINDOW), "v", [e["colour"], e["shape"]]
        else:
            if e["motion"] == "appears":
                span = (e["start"], e["start"] + POINT_WINDOW)
            elif e["motion"] == "disappears":
                span = (e["start"] - POINT_WINDOW, e["start"])
            else:
                span = (e["start"], e["end"])
            mods, words = "v", [e["colour"], e["shape"], *e["motion"].split()]
        out.append((*span, mods, text, words))
    return out


# ------------------------------------------------------------------------------------- the loss
def targets(tok, spans_list):
    """spans() -> [(t0, t1, modality ids, token ids)]: the ids of the span's caption text whose text is
    one of its words (so 'tiger' and ' tiger' keep the caption's own token)."""
    return [(t0, t1, [{"v": VISUAL, "a": AUDIO}[m] for m in mods],
             [i for i in tok.encode(text) if tok.decode([i]).strip(' "') in words])
            for t0, t1, mods, text, words in spans_list]


def plan_triples(plan, tok, hosts, spans_per_clip):
    """Host half of the loss: the sparse (token row, word id, 1 / words) triples (no tokens x vocab matrix) from each
    clip's AV token times and modality on the host (hosts: per clip (times, modality) numpy arrays). A span's tokens
    of one time form a group (a frame's tokens; an audio window is alone at its time); each group's weight is 1 / the
    span's groups. meta["ground"] = the number of spans that have both tokens and words (0: no loss)."""
    rows, ids, ww, member, group, gw, offset, n_tokens, n_groups = [], [], [], [], [], [], 0, 0, 0
    for (times, modality), spans_list in zip(hosts, spans_per_clip):
        for t0, t1, mods, span_ids in targets(tok, spans_list):
            inside = (times >= np.float32(t0 - 1e-3)) & (times <= np.float32(t1 + 1e-3)) & np.isin(modality, mods)
            r, W = np.flatnonzero(inside), len(span_ids)
            if len(r) and W:
                _, g = np.unique(times[r], return_inverse=True)
                rows.append(np.repeat(r + offset, W))
                ids.append(np.tile(np.asarray(span_ids, dtype=np.int64), len(r)))
                ww.append(np.full(len(r) * W, 1.0 / W, dtype=np.float32))
                member.append(n_tokens + np.repeat(np.arange(len(r)), W))  # each triple's (span, token)
                group.append(n_groups + g.reshape(-1))  # each (span, token)'s (span, time)
                gw.append(np.full(g.max() + 1, 1.0 / (g.max() + 1), dtype=np.float32))
                n_tokens, n_groups = n_tokens + len(r), n_groups + g.max() + 1
        offset += len(times)
    plan.meta["ground"] = len(rows)
    if rows:
        used, row = np.unique(np.concatenate(rows), return_inverse=True)
        plan.host.update({"ground.used": used, "ground.row": row.reshape(-1), "ground.ids": np.concatenate(ids),
                          "ground.ww": np.concatenate(ww), "ground.member": np.concatenate(member),
                          "ground.group": np.concatenate(group), "ground.gw": np.concatenate(gw)})
    return plan


def loss(model, blocks, spans_per_clip, plan=None):
    """Logit-lens grounding (departure, ours): inside an event's span, the tokens of each time, read by the decoder's
    own final norm and output head, should name the event's words (cross-entropy averaged over the words); of a time's
    several tokens (a frame's tokens) only the best-scoring one is held to it, multiple-instance style, since the
    others may show other objects. The decoder then only has to copy a token to say what it shows, instead of first
    discovering a faint direction in it (speaker and word identity were < 2 % of the audio tokens' variance without
    it). It reads the content tokens of model.av_block, without the clock: with the time embedding added it also
    pulled the clock toward the words (held-out mean tIoU 0.80 -> 0.71). plan: a layout.Plan holding this batch's
    triples on the device (plan_triples); made here when None."""
    if plan is None or "ground" not in plan.meta:
        plan = plan_triples(Plan(), model.tok, [host_view(b) for b in blocks], spans_per_clip).to_device(model.device)
    if not plan.meta["ground"]:
        return torch.zeros((), device=model.device)
    d = plan.dev
    logp = torch.log_softmax(model.decoder.logits(model.decoder.norm(flat_tokens(blocks)[d["ground.used"]])).float(), -1)
    picked = d["ground.ww"] * logp[d["ground.row"], d["ground.ids"]]
    token = torch.zeros(len(d["ground.group"]), device=picked.device).index_add(0, d["ground.member"], picked)
    best = torch.zeros(len(d["ground.gw"]), device=picked.device).scatter_reduce(0, d["ground.group"], token, "amax",
                                                                                include_self=False)
    return -(d["ground.gw"] * best).sum() / plan.meta["ground"]
