"""The decoder's CUDA attention path (one additive prefix mask per forward, shared by all layers, aligned for the
memory-efficient kernel; kv heads expanded instead of enable_gqa) equals the boolean-mask path, run here on the CPU."""
import pytest
import torch

from avnano import decoder, masks
from avnano.decoder import Decoder, DecoderConfig, additive_mask
from avnano.generate import generate


def test_additive_mask_draws_the_boolean_one_and_is_aligned():
    m = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)[None, None]
    a = additive_mask(m, torch.float32)
    inf = float("-inf")
    assert a.tolist() == [[[[0.0, inf, inf], [0.0, 0.0, inf], [0.0, 0.0, 0.0]]]]
    assert a.shape == (1, 1, 3, 3) and a.stride(-2) == 16 and a.dtype == torch.float32  # rows padded to 16 keys


def batch(dtype, B=3, T=11):
    torch.manual_seed(0)
    is_av = torch.zeros(B, T, dtype=torch.bool)
    is_av[:, 2:7] = True                                        # prompt 2, AV block 5, caption 4
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 9:] = False                                        # a right-padded row
    mask = masks.for_sdpa(masks.av_prefix(is_av) & masks.key_padding(valid))
    return torch.randn(B, T, 48, dtype=dtype, requires_grad=True), mask


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_additive_path_equals_the_boolean_path(monkeypatch, dtype, tol):
    torch.manual_seed(1)
    model = Decoder(DecoderConfig(vocab_size=64, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=96)).to(dtype)
    out = {}
    for additive in (False, True):
        monkeypatch.setattr(decoder, "ADDITIVE_MASK", additive)
        x, mask = batch(dtype)
        logits = model(inputs_embeds=x, mask=mask)
        logits.square().sum().backward()
        out[additive] = logits.detach(), x.grad, model.blocks[0].attn.k_proj.weight.grad.clone()
        model.zero_grad()
    for a, b in zip(out[False], out[True]):
        assert (a - b).abs().max() < tol * max(1.0, a.abs().max())


def test_greedy_ids_are_the_same_on_either_path(monkeypatch):
    torch.manual_seed(2)
    model = Decoder(DecoderConfig(vocab_size=64, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=96)).eval()
    ids = torch.randint(3, 64, (2, 7))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :2] = False                                       # left padding: masks in prefill and every step
    got = []
    for additive in (False, True):
        monkeypatch.setattr(decoder, "ADDITIVE_MASK", additive)
        got.append(generate(model, ids, attention_mask=valid, max_new_tokens=12))
    assert torch.equal(got[0], got[1])
