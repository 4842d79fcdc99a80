"""Colour-swap augmentation (ours): a training clip seen with its palette colours permuted, in the frames and, the
same way, in its caption and events, so the model is shown every colour-shape pair.

The toy world's training split never shows, e.g., a red triangle (toyworld.HELD_OUT), and a captioner learns that
prior from the pairs it is shown. Swapping colours in the image and the same colour words in the text is the
image-text form of label-preserving augmentation (the caption stays true of the recoloured clip). Here the permuted
colours are the toy palette (render.RGB) on its dark background: a pixel is moved by as much of a colour's shift as
it holds of that colour, so the edges H.264 blended with the background follow their object (89 % of the decoded
clips' object pixels lie within 48 of such a blend; the rest, chroma noise at edges, keep their colour). With it,
the held-out pairs are no longer unseen by the model in the strict sense: the README reports figures without it.
"""
import re

import torch

from .grammar import COLOURS
from .render import BACKGROUND, RGB

WORD = re.compile(rf"\b({'|'.join(COLOURS)})\b")


def recolour_frames(frames, perm, tol=48.0, floor=6):
    """uint8 frames (n, H, W, 3) on the host, perm a permutation of range(len(COLOURS)) -> the frames with each pixel
    that lies on a line from the background to a palette colour k, a * k + (1 - a) * background (within distance tol),
    moved by a * (COLOURS[perm[k]] - k): whole objects and the edges H.264 blended with the background. Pixels within
    floor of the background are left alone and not computed (97 % of a toy frame: 7x less work)."""
    palette = torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float32, device=frames.device) - BACKGROUND
    lit = (frames.to(torch.int16) - BACKGROUND).abs().amax(-1) > floor
    f = frames[lit].float() - BACKGROUND                                # (pixels, 3)
    fp, pp = f @ palette.T, palette.pow(2).sum(-1)
    a = (fp / pp).clamp(0, 1)                                           # (pixels, K): how much of colour k
    off = f.pow(2).sum(-1, keepdim=True) - 2 * a * fp + a * a * pp      # squared distance to each line
    best = off.argmin(-1, keepdim=True)
    w = torch.zeros_like(a).scatter(-1, best, a.gather(-1, best) * (off.gather(-1, best) < tol * tol))
    out = frames.clone()
    out[lit] = (f + w @ (palette[list(perm)] - palette) + BACKGROUND).round().clamp(0, 255).to(torch.uint8)
    return out


def recolour_row(row, perm):
    """A manifest row with its caption's colour words and its events' colours permuted as perm says."""
    name = {c: COLOURS[p] for c, p in zip(COLOURS, perm)}
    events = [dict(e, colour=name[e["colour"]]) if "colour" in e else e for e in row.get("events", [])]
    return dict(row, caption=WORD.sub(lambda m: name[m[1]], row["caption"]), events=events)


def recoloured(items, p, rng):
    """Loader items (row, frames, times, audio) on the host: each, with probability p, under its own random palette
    permutation drawn from rng (a random.Random). Made for data.Loader's transform (its background thread)."""
    out = []
    for row, frames, *rest in items:
        if rng.random() < p:
            perm = rng.sample(range(len(COLOURS)), len(COLOURS))
            row, frames = recolour_row(row, perm), recolour_frames(frames, perm)
        out.append((row, frames, *rest))
    return out
