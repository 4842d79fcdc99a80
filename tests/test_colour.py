"""Attribute-factored visual tokens: the colour stream is blind to outlines, the ViT sees colour-mixed frames in
training only, the token sums the two aligned parts, and object tokens take them per salient patch."""
import torch

from avnano.colour import ColourStream, colour_mixed
from avnano.render import RGB
from avnano.vit import preprocess, salient
from tests.test_model import batch, tiny, training_batch

RED, GREEN = (torch.tensor(RGB[c], dtype=torch.uint8) for c in ("red", "green"))  # the toy world's colours


def board():
    f = torch.full((3, 64, 64, 3), 24, dtype=torch.uint8)
    f[0, 2:14, 2:14] = RED                     # a red square in patch 0
    f[1, 2:14, 2:6] = f[1, 10:14, 2:14] = RED  # a red L in patch 0: another outline, the same colour
    f[2, 2:14, 2:14] = GREEN                   # a green square
    return f


def test_colour_stream_sees_the_colour_not_the_outline():
    torch.manual_seed(0)
    stream = ColourStream(patch_size=16, width=8)
    with torch.no_grad():
        out = stream(preprocess(board(), tiny().cfg.vit))
    assert out.shape == (3, 16, 8)
    assert torch.equal(out[0], out[1])            # square and L: the same bag of colours, bit for bit
    assert (out[0, 0] - out[2, 0]).abs().max() > 0.05 and torch.equal(out[0, 1:], out[2, 1:])  # colour moves patch 0 only


def test_colour_stream_rises_with_an_object_that_moves_inside_its_patch():
    torch.manual_seed(0)
    stream = ColourStream(patch_size=16, width=8)
    f = torch.full((2, 64, 64, 3), 24, dtype=torch.uint8)
    f[0, 2:8, 2:8] = f[1, 8:14, 8:14] = RED  # the square moves within patch 0
    with torch.no_grad():
        out = stream(preprocess(f, tiny().cfg.vit), prev=torch.tensor([0, 0]))
    now, rise, fall = out[1, 0].split(8)
    assert torch.equal(now, out[0, 0, :8])  # the patch holds the same colours: its max did not move ...
    assert rise.max() > 0.05 and fall.max() > 0.05 and out[0, :, 8:].abs().max() == 0  # ... its pixels did (first frame: 0)


def test_colour_mixed_is_one_mix_per_clip_and_none_at_p0():
    frames = torch.cat([board(), board()])   # two clips of three frames
    assert torch.equal(colour_mixed(frames, [3, 3], p=0.0), frames.float())
    torch.manual_seed(1)
    mixed = colour_mixed(frames, [3, 3], p=1.0)
    assert not torch.equal(mixed, frames.float())
    red = (frames == RED).all(-1)
    for clip in (slice(0, 3), slice(3, 6)):  # every red pixel of a clip becomes the same colour
        assert len(torch.unique(mixed[clip][red[clip]], dim=0)) == 1
    assert not torch.equal(mixed[0][red[0]][0], mixed[3][red[3]][0])  # the two clips drew different mixes
    torch.manual_seed(1)
    assert torch.equal(colour_mixed(frames, [3, 3], p=1.0), mixed)


def test_model_token_is_a_colour_mixed_vit_part_plus_a_colour_part():
    model = tiny(colour_stream=8, colour_mix=1.0, object_tokens=0)  # one merged token per frame
    frames, _, _ = batch()
    pixels = preprocess(torch.cat(frames), model.cfg.vit)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, k=k: seen.__setitem__(k, inp[0]))
             for k, m in (("vit", model.vit.patch_embed), ("colour", model.colour_stream.pixel))]
    model.train()
    model.encode_visual(frames)
    colour_in = torch.nn.functional.avg_pool2d(pixels, 2)
    assert torch.equal(seen["colour"], colour_in) and not torch.allclose(seen["vit"], pixels)
    model.eval()
    with torch.no_grad():
        got = model.encode_visual(frames, split=False)
    assert torch.equal(seen["colour"], colour_in) and torch.equal(seen["vit"], pixels)  # evaluation: no mix
    for h in hooks:
        h.remove()
    with torch.no_grad():  # the ViT part: the frame's max and its rises and falls; the colour part: its own stream
        x = model.vit.patches(pixels)
        prev = torch.tensor([0, 0, 1, 2] + [4, 4, 5, 6, 7, 8, 9])  # each frame's predecessor (a clip's first: itself)
        d = x - x[prev]
        vit_part = torch.cat([x.amax(1, keepdim=True), d.amax(1, keepdim=True), (-d).amax(1, keepdim=True)], -1)
        colour_part = model.colour_stream(pixels, prev).amax(1, keepdim=True)
        assert torch.allclose(got, model.visual_aligner(vit_part) + model.colour_aligner(colour_part), atol=1e-5)
    model.train()
    out = model(*training_batch(model))
    out["loss"].backward()
    assert model.colour_stream.pixel.weight.grad.abs().sum() > 0 and model.colour_aligner[0].weight.grad.abs().sum() > 0
    assert model.param_groups()["colour_stream.pixel.weight"] == "aligners"


def test_salient_patches_are_the_objects_and_what_left():
    f = torch.full((2, 64, 64, 3), 24, dtype=torch.uint8)
    f[:, 2:14, 2:14] = RED               # patch 0 in both frames
    f[0, 34:46, 18:30] = GREEN           # patch 9 (row 2, column 1) in the first frame only
    f[:, 50:62, 50:62] = GREEN           # patch 15 in both
    f[:, 52:54, 20:22] = 30              # a faint speck in patch 13: barely off the background
    pixels = preprocess(f, tiny().cfg.vit)
    assert salient(pixels, None, 4, 3).tolist() == [[0, 9, 15], [0, 13, 15]]  # in raster order
    assert salient(pixels, torch.tensor([0, 0]), 4, 3).tolist() == [[0, 9, 15], [0, 9, 15]]  # the green left patch 9


def test_object_tokens_take_both_parts_at_the_salient_patches():
    model = tiny(colour_stream=8, object_tokens=2).eval()
    frames, _, _ = batch()
    pixels = preprocess(torch.cat(frames), model.cfg.vit)
    prev = torch.tensor([0, 0, 1, 2] + [4, 4, 5, 6, 7, 8, 9])
    with torch.no_grad():
        got = model.encode_visual(frames, split=False)
        idx = salient(pixels, prev, model.cfg.vit.grid, 2)
        x = model.vit.patches(pixels)
        d = x - x[prev]
        rows = torch.arange(len(x))[:, None]
        vit_part = torch.cat([x[rows, idx], d[rows, idx], -d[rows, idx]], -1)
        colour_part = model.colour_stream(pixels, prev)[rows, idx]
    assert got.shape == (len(x), 2, model.cfg.decoder.dim) and model.cfg.tokens_per_frame == 2
    assert torch.allclose(got, model.visual_aligner(vit_part) + model.colour_aligner(colour_part), atol=1e-5)
    out = model.train()(*training_batch(model))
    assert torch.isfinite(out["loss"])
