"""Every mask equals the matrix drawn in its docstring; the AVCap prefix mask's rules one by one."""
import torch

from avnano import masks


def drawn(rows):
    return torch.tensor([[int(c) for c in r.split()] for r in rows], dtype=torch.bool)


def test_causal():
    assert torch.equal(masks.causal(4), drawn(["1 0 0 0", "1 1 0 0", "1 1 1 0", "1 1 1 1"]))


def test_key_padding_left_pad():
    m = masks.key_padding(torch.tensor([[0, 0, 1, 1]]))
    assert m.shape == (1, 1, 4) and torch.equal(m[0, 0], torch.tensor([False, False, True, True]))
    combined = masks.causal(4) & m
    assert torch.equal(combined[0], drawn(["0 0 0 0", "0 0 0 0", "0 0 1 0", "0 0 1 1"]))
    # sdpa form opens the all-False pad rows (their outputs are never read) and keeps the rest
    sd = masks.for_sdpa(combined)
    assert sd.shape == (1, 1, 4, 4)
    assert torch.equal(sd[0, 0], drawn(["1 1 1 1", "1 1 1 1", "0 0 1 0", "0 0 1 1"]))


def test_av_prefix_drawn():
    is_av = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    expected = drawn(["1 1 1 0 0", "1 1 1 0 0", "1 1 1 0 0", "1 1 1 1 0", "1 1 1 1 1"])
    assert torch.equal(masks.av_prefix(is_av)[0], expected)


def test_av_prefix_rules():
    is_av = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    m = masks.av_prefix(is_av)[0]
    av = is_av[0].nonzero().flatten().tolist()
    prompt, caption = [0, 1], [5, 6, 7]
    for i in av:  # AV block bidirectional within itself
        for j in av:
            assert m[i, j]
    for i in av:  # AV sees the prompt before it, never the caption
        assert all(m[i, j] for j in prompt) and not any(m[i, j] for j in caption)
    for i in prompt + caption:  # text: causal over text, every AV token visible
        assert all(m[i, j] for j in av)
        for j in prompt + caption:
            assert m[i, j] == (j <= i)


def test_packed_sequences_equal_separate_runs():
    """Two sequences packed in one row, each restarting its positions, under causal & same-sequence:
    the decoder's positions and explicit masks give each the outputs of its own run."""
    from avnano.decoder import Decoder, DecoderConfig
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)).eval()
    a, b = torch.randint(0, 40, (1, 3)), torch.randint(0, 40, (1, 4))
    packed = torch.cat([a, b], 1)
    seq = torch.tensor([0] * 3 + [1] * 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    out = model(packed, positions=pos, mask=masks.for_sdpa(masks.causal(7) & (seq[:, None] == seq[None])))
    assert (out[:, :3] - model(a)).abs().max() < 1e-5 and (out[:, 3:] - model(b)).abs().max() < 1e-5
