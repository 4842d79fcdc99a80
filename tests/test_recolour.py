"""Colour-swap augmentation: frames, caption and events permuted alike; edges blended with the background follow."""
import random

import torch

from avnano.recolour import recolour_frames, recolour_row, recoloured
from avnano.render import BACKGROUND, RGB

SWAP = [2, 1, 0, 3]  # red <-> blue (grammar.COLOURS order: red, green, blue, yellow)


def frame():
    f = torch.full((1, 64, 64, 3), BACKGROUND, dtype=torch.uint8)
    f[0, 2:14, 2:14] = torch.tensor(RGB["red"])
    f[0, 2:14, 14] = torch.tensor([127, 37, 37])  # an edge half red, half background
    f[0, 30:40, 30:40] = torch.tensor(RGB["green"])
    f[0, 50:60, 50:60] = torch.tensor([200, 200, 200])  # not a palette blend: kept
    return f


def test_recolour_frames_moves_objects_and_their_edges():
    g = recolour_frames(frame(), SWAP)[0]
    assert g[5, 5].tolist() == list(RGB["blue"])
    half = [round(BACKGROUND + (c - BACKGROUND) * (127 - BACKGROUND) / (RGB["red"][0] - BACKGROUND)) for c in RGB["blue"]]
    assert (g[5, 14] - torch.tensor(half)).abs().max() <= 2
    f = frame()[0]
    for ys, xs in ((slice(30, 40), slice(30, 40)), (slice(50, 60), slice(50, 60)), (slice(20, 28), slice(40, 50))):
        assert torch.equal(g[ys, xs], f[ys, xs])  # green (kept by SWAP), grey and background: unchanged
    assert torch.equal(recolour_frames(frame(), [0, 1, 2, 3]), frame())


def test_recolour_row_and_items():
    row = {"caption": "a red circle appears at 1.0 s. the blue square knocks at 2.0 s. a high tone plays from 1.0 to 2.0 s.",
           "events": [{"type": "visual", "colour": "red"}, {"type": "av", "colour": "blue"}, {"type": "audio"}]}
    out = recolour_row(row, SWAP)
    assert out["caption"] == "a blue circle appears at 1.0 s. the red square knocks at 2.0 s. a high tone plays from 1.0 to 2.0 s."
    assert [e.get("colour") for e in out["events"]] == ["blue", "red", None] and row["events"][0]["colour"] == "red"
    items = [(row, frame(), torch.zeros(1), torch.zeros(16))] * 8
    assert recoloured(items, 0.0, random.Random(0)) == items
    a, b = recoloured(items, 1.0, random.Random(0)), recoloured(items, 1.0, random.Random(0))
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))  # the rng decides, nothing else
    assert len({r["caption"] for r, *_ in a}) > 1  # the clips drew different permutations
    for r, f, *_ in a:  # each clip: its caption names the colour its red square now has
        colour = next(c for c, rgb in RGB.items() if f[0, 5, 5].tolist() == list(rgb))
        assert r["caption"].startswith(f"a {colour} circle")
