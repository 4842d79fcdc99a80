"""Decoder parity with transformers (Llama untied, Qwen2 tied + bias + GQA), KV cache, sampling, loader errors.
Only the parity tests need transformers (each skips without it); the rest run on plain torch."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from avnano import masks
from avnano.decoder import Decoder, DecoderConfig
from avnano.generate import beam_search, generate
from avnano.weights import load_decoder, save_decoder


def tiny_hf(kind):
    """A tiny random Llama or Qwen2 from transformers (skips the calling test without transformers)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, attn_implementation="sdpa")
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5,
                                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # random biases too, so a dropped bias would show
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def save_hf(model, path, config_form):
    model.save_pretrained(path)
    if config_form == "old":  # rewrite as a v4-era config: top-level rope_theta + rope_scaling with "type"
        file = os.path.join(path, "config.json")
        cfg = json.load(open(file))
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp["rope_theta"]
        cfg["rope_scaling"] = None if rp["rope_type"] == "default" else {"type": rp["rope_type"], "factor": rp["factor"]}
        json.dump(cfg, open(file, "w"))


@pytest.fixture(params=[("llama", "new"), ("llama", "old"), ("qwen2", "new"), ("qwen2", "old")], ids=lambda p: "-".join(p))
def pair(request, tmp_path):
    kind, form = request.param
    hf = tiny_hf(kind)
    save_hf(hf, tmp_path, form)
    return hf, str(tmp_path)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_logits_match_transformers(pair, dtype, tol):
    hf, path = pair
    ours = load_decoder(path, dtype=dtype)
    hf = hf.to(dtype)
    ids = torch.randint(3, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (ref - got).abs().max().item() <= tol


def left_padded_batch():
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    attn[2, :5] = 0
    ids[attn == 0] = 0
    return ids, attn


def test_greedy_generation_matches_transformers_with_left_padding(pair):
    hf, path = pair
    ours = load_decoder(path, dtype=torch.float64)
    hf = hf.to(torch.float64)
    ids, attn = left_padded_batch()
    ref = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, attention_mask=attn, max_new_tokens=24)
    assert got.shape == (3, 24) and torch.equal(ref, got)


def test_kv_cache_equals_full_recompute():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                  qkv_bias=True)).eval()
    ids, attn = left_padded_batch()
    ids = ids % 64
    valid = attn.bool()
    cache = model.new_cache(3, 16)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    step_logits = [model(ids, positions=pos, cache=cache, mask=masks.for_sdpa(masks.causal(9) & masks.key_padding(valid)))[:, -1]]
    seq, full_valid, p = ids, valid, pos[:, -1]
    for t in range(5):
        nxt = torch.randint(3, 64, (3, 1), generator=torch.Generator().manual_seed(t))
        seq, full_valid, p = torch.cat([seq, nxt], 1), torch.cat([full_valid, torch.ones(3, 1, dtype=torch.bool)], 1), p + 1
        step_logits.append(model(nxt, positions=p[:, None], cache=cache,
                                 mask=masks.for_sdpa(masks.key_padding(full_valid)))[:, -1])
        full_pos = (full_valid.long().cumsum(-1) - 1).clamp(min=0)
        full = model(seq, positions=full_pos,
                     mask=masks.for_sdpa(masks.causal(seq.shape[1]) & masks.key_padding(full_valid)))
        assert (full[:, -1] - step_logits[-1]).abs().max() <= 1e-5
        assert (full[:, 8] - step_logits[0]).abs().max() <= 1e-5


def small_model():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=48)).eval()


def test_beam1_and_topk1_equal_greedy_and_seed_reproduces():
    model = small_model()
    ids, attn = left_padded_batch()
    ids = ids % 50
    greedy = generate(model, ids, attention_mask=attn, max_new_tokens=12, eos_ids=[7])
    assert torch.equal(greedy, beam_search(model, ids, attention_mask=attn, max_new_tokens=12, eos_ids=[7], num_beams=1))
    topk1 = generate(model, ids, attention_mask=attn, max_new_tokens=12, eos_ids=[7], temperature=1.3, top_k=1,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, topk1)
    a, b, c = (generate(model, ids, attention_mask=attn, max_new_tokens=12, temperature=1.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sequence_eos_stops_and_pads():
    model = small_model()
    ids = torch.randint(3, 50, (4, 5), generator=torch.Generator().manual_seed(3))
    g = lambda: dict(temperature=1.0, generator=torch.Generator().manual_seed(0))
    free = generate(model, ids, max_new_tokens=10, **g())
    # the first token some row emits for the first time at step k >= 1 becomes "EOS"
    r, k = next((r, k) for k in range(1, 10) for r in range(4) if free[r, k] not in free[r, :k])
    eos = int(free[r, k])
    out = generate(model, ids, max_new_tokens=10, eos_ids=[eos], pad_id=-1, **g())
    row = out[r].tolist()
    assert row[:k + 1] == free[r, :k + 1].tolist() and all(t == -1 for t in row[k + 1:])
    for r in range(4):  # after each row's first EOS only pad follows
        hits = (out[r] == eos).nonzero()
        if len(hits):
            assert (out[r, hits[0, 0] + 1:] == -1).all()


def test_beam_search_finds_better_or_equal_scored_sequence_than_greedy():
    model = small_model()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, ids, max_new_tokens=8)
    beam = beam_search(model, ids, max_new_tokens=8, num_beams=4, length_penalty=0.0)

    def logprob(seq):
        full = torch.cat([ids, seq], 1)
        lp = model(full)[:, ids.shape[1] - 1:-1].log_softmax(-1)
        return lp.gather(-1, seq[..., None]).squeeze(-1).sum(-1)
    assert (logprob(beam) >= logprob(greedy) - 1e-6).all()


def test_inputs_embeds_prompt_equals_ids_prompt():
    model = small_model()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    a = generate(model, ids, max_new_tokens=8)
    b = generate(model, inputs_embeds=model.embed(ids), max_new_tokens=8)
    assert torch.equal(a, b)


def test_save_load_roundtrip(tmp_path):
    model = small_model()
    save_decoder(model, tmp_path)
    back = load_decoder(str(tmp_path))
    ids = torch.randint(0, 50, (1, 7))
    assert torch.equal(model(ids), back(ids))


def test_transformers_reads_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model()
    save_decoder(model, tmp_path)
    ids = torch.randint(0, 50, (1, 7))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert (hf(ids).logits - model(ids)).abs().max() <= 1e-5


def test_loader_errors_name_the_problem(tmp_path):
    torch.manual_seed(0)  # a Qwen2-shaped decoder (q/k/v biases) in the released layout
    save_decoder(Decoder(DecoderConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                       qkv_bias=True)), tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    bad = dict(state)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.extra.weight"] = torch.zeros(2)
    bad["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(5)
    save_file(bad, file)
    with pytest.raises(ValueError) as e:
        load_decoder(str(tmp_path))
    msg = str(e.value)
    assert "missing key model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected key model.layers.0.extra.weight" in msg
    assert "wrong shape for model.layers.0.self_attn.q_proj.bias" in msg and "(5,)" in msg
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_decoder(str(tmp_path))
    cfg["rope_parameters"]["rope_type"] = "default"
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    os.remove(file)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_decoder(str(tmp_path))
    with pytest.raises(ValueError, match="pickle checkpoint refused"):
        from avnano.weights import read_safetensors
        read_safetensors(str(tmp_path / "pytorch_model.bin"))


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_decoder(str(tmp_path))
    ids = torch.randint(3, 97, (1, 5))
    assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-5


def test_kv_cache_overflow_is_named():
    model = small_model()
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(RuntimeError, match="KV cache full"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
