"""Dense event tagging: an auxiliary loss standing in for the encoder pretraining the papers start from.

video-SALMONN 2, AVicuna and the rest begin SFT from pretrained encoders (SigLIP, Whisper, BEATs)
whose tokens already say *what* is seen and heard; the captioner only learns to read them. The toy
world trains everything from scratch, and identity (colour, shape, word, speaker) is what the model
learns last (README, "why"). Tagging gives the encoders the signal pretraining would have: each
aligned AV token predicts, through a linear head per modality, which event attributes are active
at its time (multi-label binary cross-entropy), read off the manifest's structured events.
Visual tokens are tagged with visual events and the shapes that bounce (av); audio tokens with
sounds, speech (speaker and each word) and knocks (av, no colour or shape: the knock does not say
which shape made it). A token is tagged when its time span [t, t + span] overlaps the event's
[start - 0.25, end + 0.25] (captions round times to 0.5 s); a word lasts ~0.5 s, so speech ends
0.5 s per word after its start. Off unless AVConfig.tag_weight > 0; sampling never uses the heads.
Departure: this is supervision the papers' SFT stage does not see (their encoders got it before,
on other data); the README measures what it buys.
"""
import torch

VISUAL, AUDIO = 0, 1  # interleave's modality ids
OBSERVED = {VISUAL: {"visual": ("colour", "shape", "motion"), "av": ("colour", "shape")},
            AUDIO: {"audio": ("sound",), "speech": ("speaker", "text"), "av": ()}}
TOLERANCE = 0.25
WORD_SECONDS = 0.5


def event_tags(e, modality):
    """The tags `modality` can observe of one event: its type, then type.key=value per attribute
    (speech text: one tag per word). An event the modality cannot observe has none."""
    keys = OBSERVED[modality].get(e["type"])
    if keys is None:
        return []
    tags = [e["type"]]
    for k in keys:
        values = e[k].split() if k == "text" else [e[k]]
        tags += [f"{e['type']}.{k}={v}" for v in values]
    return tags


def vocabulary(rows):
    """Sorted tags over every event of the manifest rows, both modalities (the heads' outputs)."""
    return sorted({t for r in rows for e in r.get("events", []) for m in OBSERVED for t in event_tags(e, m)})


def targets(events, times, modality, vocab, span):
    """(len(times), len(vocab)) 0/1 targets for tokens of one modality starting at `times` (seconds)
    and lasting `span` seconds. Tags outside `vocab` (never seen in training) are dropped."""
    index = {t: i for i, t in enumerate(vocab)}
    hot = torch.zeros(len(events), len(vocab))
    bounds = torch.zeros(len(events), 2)
    for j, e in enumerate(events):
        for t in event_tags(e, modality):
            if t in index:
                hot[j, index[t]] = 1.0
        end = e["end"] + (WORD_SECONDS * len(e["text"].split()) if e["type"] == "speech" else 0.0)
        bounds[j] = torch.tensor([e["start"] - TOLERANCE, end + TOLERANCE])
    t = times.detach().float().cpu()[:, None]
    active = ((t < bounds[:, 1]) & (t + span > bounds[:, 0])).float()  # (N, n_events)
    return (active @ hot).clamp(max=1.0).to(times.device)
