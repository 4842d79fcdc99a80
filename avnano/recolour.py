"""Colour-swap augmentation (ours): a training clip seen with its palette colours permuted, in the frames and, the
same way, in its caption and events, so the model is shown every colour-shape pair.

The toy world's training split never shows, e.g., a red triangle (toyworld.HELD_OUT), and a captioner learns that
prior from the pairs it is shown. Swapping colours in the image and the same colour words in the text is the
image-text form of label-preserving augmentation (the caption stays true of the recoloured clip). Here the permuted
colours are the toy palette (render.RGB) on its dark background: a pixel is moved by as much of a colour's shift as
it holds of that colour, so the edges H.264 blended with the background follow their object (90 % of the object
pixels of decoded clips lie within 40 of such a blend; the rest, chroma noise at edges, keep their colour). With it, the held-out pairs are no longer
unseen by the model in the strict sense: the README reports the figures with and without it.
"""
import re

import torch

from .grammar import COLOURS
from .render import BACKGROUND, RGB

WORD = re.compile(rf"\b({'|'.join(COLOURS)})\b")


def recolour_frames(frames, perm, tol=48):
    """uint8 frames (n, H, W, 3) on any device, perm a permutation of range(len(COLOURS)) -> the frames with each pixel
    that lies on the line from the background to a palette colour k, a * k + (1 - a) * background (within tol per
    channel), moved by a * (COLOURS[perm[k]] - k): whole objects and the edges H.264 blended with the background."""
    palette = torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float32, device=frames.device) - BACKGROUND
    f = frames.float() - BACKGROUND
    a = ((f[..., None, :] * palette).sum(-1) / palette.pow(2).sum(-1)).clamp(0, 1)  # (n, H, W, K): how much of k
    off, k = (f[..., None, :] - a[..., None] * palette).abs().amax(-1).min(-1)        # the nearest line and its k
    a = a.gather(-1, k[..., None])
    shift = a * (palette[list(perm)] - palette)[k]
    return (f + torch.where((off < tol)[..., None], shift, 0.0) + BACKGROUND).round().clamp(0, 255).to(torch.uint8)


def recolour_row(row, perm):
    """A manifest row with its caption's colour words and its events' colours permuted as perm says."""
    name = {c: COLOURS[p] for c, p in zip(COLOURS, perm)}
    events = [dict(e, colour=name[e["colour"]]) if "colour" in e else e for e in row.get("events", [])]
    return dict(row, caption=WORD.sub(lambda m: name[m[1]], row["caption"]), events=events)


def recoloured(items, p, rng):
    """Loader items (row, frames, times, audio): each, with probability p, under its own random palette permutation
    drawn from rng (a random.Random: on the host, no device read)."""
    out = []
    for row, frames, *rest in items:
        if rng.random() < p:
            perm = rng.sample(range(len(COLOURS)), len(COLOURS))
            row, frames = recolour_row(row, perm), recolour_frames(frames, perm)
        out.append((row, frames, *rest))
    return out
