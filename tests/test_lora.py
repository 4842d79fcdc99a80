"""LoRA: fresh adapter is a no-op, merge == adapter forward, disable == base, proxy re-init."""
import torch

from avnano import lora
from avnano.decoder import Decoder, DecoderConfig


def model():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)).eval()


def trained_adapter(m):
    with torch.no_grad():
        for a in lora.adapters(m):
            a.lora_B.normal_(0, 0.1)


IDS = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_changes_nothing_and_counts():
    m = model()
    base = m(IDS)
    names = lora.inject(m, [r"attn\.(q|v)_proj"], r=4, alpha=8)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert torch.equal(m(IDS), base)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    trainable, total = lora.count_trainable(m)
    q, v = 4 * 32 + 32 * 4, 4 * 32 + 16 * 4  # A (r, in) + B (out, r); v_proj is 16 wide (2 kv heads)
    assert trainable == 2 * (q + v) and total > trainable
    assert "blocks.0.attn.q_proj.weight" in m.state_dict()  # base keys unchanged


def test_merge_disable_proxy():
    m = model()
    base = m(IDS)
    lora.inject(m, [r"proj"], r=4, alpha=8)
    trained_adapter(m)
    adapted = m(IDS)
    assert not torch.allclose(adapted, base)
    with lora.disabled(m):
        assert torch.allclose(m(IDS), base, atol=1e-6)
    q = m.blocks[0].attn.q_proj
    want = q.weight + (q.lora_B @ q.lora_A) * 8 / 4  # W + (alpha / r) B A
    for a in lora.adapters(m):
        a.merge()
    assert torch.allclose(q.weight, want) and (m(IDS) - adapted).abs().max() <= 1e-5
    with lora.disabled(m):  # disabling a merged adapter still gives the base model
        assert (m(IDS) - base).abs().max() <= 1e-5
    assert (m(IDS) - adapted).abs().max() <= 1e-5  # and leaving the block merges it back
    lora.new_proxy(m)  # merge + fresh adapter: outputs unchanged, and the "reference" is now the merged model
    assert (m(IDS) - adapted).abs().max() <= 1e-5
    with lora.disabled(m):
        assert (m(IDS) - adapted).abs().max() <= 1e-5


def test_adapter_stays_float32_on_a_bf16_base():
    # the adapter once took the base's dtype: a bf16 B cannot hold the small first updates of a zero init
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    lora.inject(model, [r"0"], r=2, alpha=4)
    layer = model[0]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.fill_(0.1)  # a LoRA term far above bf16 rounding of the output
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)
    base = x.float() @ layer.weight.float().T + layer.bias.float()
    delta = 2.0 * (x.float() @ layer.lora_A.T @ layer.lora_B.T)  # (alpha / r) B A x
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), base + delta, atol=1e-2)
    assert (y.float() - base).abs().max() > 10 * 1e-2  # the adapter's contribution is seen, not lost in the tolerance
    with lora.disabled(model):
        assert torch.allclose(layer(x).float(), base, atol=1e-2)
