"""Attribute-blind views: what each view hides, in pixels, loss masks, fed words and grounding targets."""
import numpy as np
import torch

from avnano.augment import blind_views

COLOUR_IDS, SHAPE_IDS = [10, 11, 12, 13], [20, 21, 22]
KINDS = ((COLOUR_IDS, ("red", "green", "blue", "yellow")), (SHAPE_IDS, ("circle", "square", "triangle")))


def clip():
    frames = np.full((2, 32, 32, 3), 24, dtype=np.uint8)
    frames[0, 2:9, 3:12] = (230, 50, 50)   # a red object inside the first 16 x 16 block
    frames[1, 18:30, 20:25] = (60, 100, 240)
    ids = [1, 2, 3, 10, 21, 4, 5]          # prompt (3 tokens), then "red square ..."
    mask = [0, 0, 0, 1, 1, 1, 1]
    ground = [(0.0, 1.0, "v", "a red square appears", ["red", "square", "appears"])]
    return ("row", torch.from_numpy(frames), torch.tensor([0.0, 0.5]), torch.zeros(8)), ids, mask, ground


def run(p_draw):
    item, ids, mask, ground = clip()
    g = torch.Generator().manual_seed(0)
    (out,), (new_ids,), (new_mask,), (new_ground,) = blind_views([item], [ids], [mask], [ground], KINDS, p_draw, 0.0, g)
    return item, ids, mask, out, new_ids, new_mask, new_ground


def test_colour_blind_view_mixes_channels_and_hides_the_colour_word():
    item, ids, mask, out, new_ids, new_mask, new_ground = run(1.0)  # p = 1: every clip colour-blind
    before, after = item[1].reshape(-1, 3).numpy(), out[1].reshape(-1, 3).numpy()
    # one colour map per clip: pixels of one colour stay of one colour, and the colours changed
    for c in np.unique(before, axis=0):
        assert len(np.unique(after[(before == c).all(1)], axis=0)) == 1
    assert not np.array_equal(before, after)
    assert new_mask == [0, 0, 0, 0, 1, 1, 1] and new_ids[3] in COLOUR_IDS  # colour untrained, fed as a colour word
    assert new_ids[:3] + new_ids[4:] == ids[:3] + ids[4:]
    assert new_ground[0][4] == ["square", "appears"]
    assert item[1][0, 2, 3].tolist() == [230, 50, 50] and ids[3] == 10 and mask[3] == 1  # the inputs are not modified


def test_shape_blind_view_keeps_block_means_and_hides_the_shape_word():
    item, ids, mask, ground = clip()
    (out,), (new_ids,), (new_mask,), (new_ground,) = blind_views([item], [ids], [mask], [ground], KINDS, 0.0, 1.0,
                                                                  torch.Generator())
    f = item[1].numpy().astype(np.float64)
    for t in range(2):
        for by in range(2):
            for bx in range(2):
                block = out[1][t, by * 16:(by + 1) * 16, bx * 16:(bx + 1) * 16].numpy()
                expect = np.round(f[t, by * 16:(by + 1) * 16, bx * 16:(bx + 1) * 16].reshape(-1, 3).mean(0))
                assert (block == expect).all()  # each 16 x 16 square is its mean colour
    assert out[1][0, 0, 0].tolist() == [int(round((24 * (256 - 63) + 230 * 63) / 256)), int(round((24 * 193 + 50 * 63) / 256)),
                                         int(round((24 * 193 + 50 * 63) / 256))]  # 7 x 9 red pixels in a block of 256
    assert new_mask == [0, 0, 0, 1, 0, 1, 1] and new_ids[4] in SHAPE_IDS and new_ids[3] == 10
    assert new_ground[0][4] == ["red", "appears"]


def test_no_view_when_not_drawn():
    item, ids, mask, ground = clip()
    out = blind_views([item], [ids], [mask], [ground], KINDS, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert out[1] == [ids] and out[2] == [mask] and out[3] == [ground] and torch.equal(out[0][0][1], item[1])


def test_shape_blind_blur_is_a_box_blur_clipped_at_the_border():
    item, ids, mask, ground = clip()
    (out,), _, (new_mask,), _ = blind_views([item], [ids], [mask], [ground], KINDS, 0.0, 1.0, torch.Generator(), blur=5)
    f = item[1].numpy().astype(np.float64)
    for t, y, x in ((0, 5, 7), (0, 0, 0), (1, 31, 22)):  # inside, a corner, the bottom edge
        window = f[t, max(0, y - 2):y + 3, max(0, x - 2):x + 3].reshape(-1, 3)
        assert out[1][t, y, x].tolist() == np.round(window.mean(0)).astype(int).tolist()
    assert new_mask == [0, 0, 0, 1, 0, 1, 1]
