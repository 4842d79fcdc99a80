"""The tiny AV captioner end to end: padding, overfitting, generation, the prefix mask, the visual delta, long audio,
gradient checkpointing, freezing, save/load, the layout page, completion log-probs, grounding; the shared tiny helpers."""
import functools

import numpy as np
import pytest
import torch

from avnano import grounding
from avnano.checkpoint import load_model, save_model
from avnano.model import AVCaptioner, preset
from avnano.tokenizer import Tokenizer
from avnano.vit import preprocess

CAPTIONS = ["a red circle appears at 0.5 s.", "a knock at 2.0 s; speaker A says \"go\"."]


@functools.lru_cache(maxsize=1)
def tokenizer():  # shared by every tiny model: never mutated
    return Tokenizer.train(CAPTIONS * 10 + ["Describe the clip."] * 5, vocab_size=300)


def batch(seconds=(2.0, 3.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, times, audio = [], [], []
    for s in seconds:
        n = int(s * 2)
        frames.append((torch.rand(n, 32, 32, 3, generator=g) * 255).to(torch.uint8))
        times.append((torch.arange(n) + 0.5) / 2)
        audio.append(torch.randn(int(s * 16000), generator=g) * 0.1)
    return frames, times, audio


def tiny(**overrides):
    torch.manual_seed(0)
    tok = tokenizer()
    return AVCaptioner(preset("tiny", tok.vocab_size, **overrides), tok)


def training_batch(model):
    frames, times, audio = batch()
    rendered = [model.render(c) for c in CAPTIONS]
    return frames, times, audio, [r[0] for r in rendered], [r[1] for r in rendered]


def test_forward_backward_with_padding_and_overfit():
    model = tiny()
    b = training_batch(model)
    out = model(*b)
    assert out["n_tokens"] == sum(sum(r) for r in b[4])  # loss on caption + end tokens only
    out["loss"].backward()
    assert model.visual_aligner[0].weight.grad is not None and model.audio_aligner.queries.grad is not None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out["loss"].item()
    for _ in range(80):
        opt.zero_grad()
        loss = model(*b)["loss"]
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    model.eval()
    texts = model.generate(*b[:3], max_new_tokens=40)
    assert texts == CAPTIONS  # memorised: greedy decoding reproduces both captions
    beams = model.generate(*b[:3], max_new_tokens=40, num_beams=3)
    assert beams == CAPTIONS


def test_prefix_mask_hides_caption_from_av_tokens():
    for mask in ("prefix", "causal"):
        model = tiny(mask=mask).eval()
        frames, times, audio = batch()
        ids_a = [model.render(CAPTIONS[0])[0]]
        ids_b = [model.render(CAPTIONS[1])[0]]
        lm = [[1] * len(ids_a[0])], [[1] * len(ids_b[0])]
        with torch.no_grad():
            ha = model(frames[:1], times[:1], audio[:1], ids_a, lm[0], return_hidden=True)
            hb = model(frames[:1], times[:1], audio[:1], ids_b, lm[1], return_hidden=True)
        av_a, av_b = ha["is_av"][0], hb["is_av"][0]
        assert av_a.sum() > 0 and av_a.sum() == av_b.sum()
        # a different caption does not change any AV hidden state
        assert torch.allclose(ha["hidden"][0][av_a], hb["hidden"][0][av_b], atol=1e-6)
    # and the prefix mask really is bidirectional inside the AV block (unlike causal)
    pre, cau = tiny(mask="prefix").eval(), tiny(mask="causal").eval()
    b = training_batch(pre)
    with torch.no_grad():
        hp, hc = pre(*b, return_hidden=True), cau(*b, return_hidden=True)
    first_av = hp["is_av"][0].nonzero()[0, 0]
    assert not torch.allclose(hp["hidden"][0, first_av], hc["hidden"][0, first_av])


def test_visual_delta_feeds_each_frame_and_its_per_patch_change():
    model = tiny(object_tokens=0)  # one merged token per frame (object tokens and the colour part: tests/test_colour.py)
    assert model.cfg.visual_delta and model.cfg.vit.merge_mode == "max"  # the tiny preset's choice
    frames, _, _ = batch()
    frames[0][1] = frames[0][0]  # an unchanged frame: its change parts are exactly zero
    with torch.no_grad():
        got = model.encode_visual(frames)
        for f, g in zip(frames, got):
            h = model.vit(preprocess(f, model.cfg.vit))[0]  # (n, 16 patches, dim): SigLIP, no class token
            d = h - torch.cat([h[:1], h[:-1]])  # the first frame is compared with itself
            rise, fall = d.amax(1, keepdim=True), (-d).amax(1, keepdim=True)  # merge=4: all 16 patches in one group
            assert torch.allclose(g, model.visual_aligner(torch.cat([h.amax(1, keepdim=True), rise, fall], -1)), atol=1e-5)
        assert model.visual_aligner[0].in_features == 3 * model.cfg.vit.token_dim
        x0 = model.vit.merge(model.vit.patches(preprocess(frames[0][1:2], model.cfg.vit)))
        still = model.visual_aligner(torch.cat([x0, torch.zeros_like(x0), torch.zeros_like(x0)], -1))
        assert torch.allclose(got[0][1], still[0], atol=1e-5)
    # an object that moves keeps its features in the change parts the aligner reads; the change of the
    # merged token (the previous design) nearly cancels it out
    f = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    f[0, 4:12, 4:12] = f[1, 4:12, 52:60] = torch.tensor([230, 50, 50], dtype=torch.uint8)
    seen = []
    hook = model.visual_aligner.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    with torch.no_grad():
        model.encode_visual([f])
    hook.remove()
    D = model.cfg.vit.token_dim
    x = seen[0][:, 0]  # (2 frames, 3 * D): [merge(h_t), rise, fall]
    merged_change = x[1, :D] - x[0, :D]
    assert x[1, D:2 * D].abs().max() > 5 * merged_change.abs().max()
    assert x[1, 2 * D:].abs().max() > 5 * merged_change.abs().max()


def test_audio_longer_than_t_max_is_segmented():
    model = tiny()
    model.cfg.audio.max_positions = round(model.cfg.audio.tokens_per_second)  # t_max = 1 s of encoder positions
    blocks = model.encode_audio([torch.randn(int(2.6 * 16000))])
    tokens, times = blocks[0]
    assert len(tokens) == 2 + 2 + 2  # three segments (1 s, 1 s, 0.6 s) of 0.5 s windows
    assert times.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_grad_checkpointing_same_loss_and_grads_fewer_saved_activations(monkeypatch):
    from avnano import training, transformer
    model = tiny(ground_weight=0.0).train()
    b = training_batch(model)

    def run():
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            out = model(*b)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    loss, grads, plain_bytes = run()
    calls = []
    real = transformer.checkpoint
    monkeypatch.setattr(transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    training.set_grad_checkpointing(model)
    loss_ck, grads_ck, ck_bytes = run()
    assert len(calls) == model.cfg.decoder.n_layers + model.cfg.vit.n_layers + model.cfg.audio.n_layers
    assert torch.allclose(loss, loss_ck, atol=1e-6, rtol=0) and grads.keys() == grads_ck.keys() and len(grads) > 50
    for n in grads:
        assert torch.allclose(grads[n], grads_ck[n], atol=1e-6, rtol=0), n
    assert ck_bytes < 0.7 * plain_bytes  # the blocks' activations are no longer kept for the backward
    calls.clear()
    with torch.no_grad():
        model(*b)
    model.eval()
    model(*b)["loss"].backward()
    assert not calls  # neither without grad nor in eval mode


def test_freezing_groups_and_save_load(tmp_path):
    model = tiny(lora_r=4)
    model.set_trainable({"aligners"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("visual_aligner", "audio_aligner", "segment_embed", "time_embed",
                                                     "colour_stream", "colour_aligner")) for n in trainable)
    model.set_trainable({"lora"})
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        model.set_trainable({"llm"})
    save_model(model, str(tmp_path))
    back = load_model(str(tmp_path))
    b = training_batch(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*b)["loss"], back(*b)["loss"])


def test_load_names_every_key_that_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file
    save_model(tiny(lora_r=4), str(tmp_path))
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    del state["decoder.norm.weight"]                                  # missing
    state["decoder.extra.weight"] = torch.zeros(2)                    # unexpected
    state["time_embed.proj.weight"] = torch.zeros(3, 3)               # wrong shape
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "missing key decoder.norm.weight" in msg and "unexpected key decoder.extra.weight" in msg
    assert "wrong shape for time_embed.proj.weight: file has (3, 3)" in msg


def test_show_layout_page(tmp_path):
    import zlib

    from avnano.media import Clip
    from avnano.show import layout, png_bytes, render_html
    model = tiny(interleave="avti").eval()
    frames, times, audio = batch(seconds=(2.0,))
    clip = Clip(frames[0], times[0], audio[0], 2.0, True, True)
    slots, mask = layout(model, clip)
    kinds = [k for k, _, _ in slots]
    assert len(slots) == mask.shape[0] and kinds.count("audio") > 0 and kinds.count("visual") == 4 * model.cfg.tokens_per_frame == 12
    assert kinds[-1] == "caption"
    page = render_html(slots, mask, "t")
    assert "data:image/png;base64," in page and page.count('class="c"') >= len(slots)
    png = png_bytes(np.full((2, 3, 3), 7, np.uint8))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and zlib.decompress(png[41:-12]) == b"\x00" + bytes([7] * 9) + b"\x00" + bytes([7] * 9)


def test_completion_logprobs_match_the_training_loss():
    model = tiny().eval()
    frames, times, audio = batch()
    comps = [model.completion_ids(c) for c in CAPTIONS]
    with torch.no_grad():
        blocks = model.av_block(frames, times, audio)[0]
        lp, mask = model.completion_logprobs(blocks, comps)
        rendered = [model.render(c) for c in CAPTIONS]
        out = model(frames, times, audio, [r[0] for r in rendered], [r[1] for r in rendered])
    assert mask.sum().item() == out["n_tokens"] and mask[0].sum() == len(comps[0])
    assert torch.allclose(-(lp * mask).sum() / mask.sum(), out["ce"], atol=1e-5)  # same tokens, same numbers
    with torch.no_grad():
        hot, _ = model.completion_logprobs(blocks, comps, temperature=2.0)
        twice, _ = model.completion_logprobs(blocks + blocks, comps + comps)  # one encoding, many sequences
    assert not torch.allclose(hot, lp)
    assert torch.allclose(twice[:2], lp, atol=1e-6) and torch.allclose(twice[2:], lp, atol=1e-6)
    assert model.generate(None, None, None, blocks=blocks, max_new_tokens=6) == model.generate(frames, times, audio, max_new_tokens=6)


def test_grounding_loss_reads_the_span_through_the_output_head():
    model = tiny(ground_weight=0.5)
    tok, D = model.tok, model.cfg.decoder.dim
    spans = [(0.5, 1.0, "a", 'speaker A says "go"', ["A", "go"])]
    (_, _, mods, ids), = grounding.targets(tok, spans)
    assert mods == [1] and [tok.decode([i]) for i in ids] == [" A", "go"]  # the caption's own tokens
    tokens = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    times = torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0, 1.5])
    modality = torch.tensor([0, 1, 0, 1, 0, 1])  # only rows 1 and 3 are audio tokens inside [0.5, 1.0]
    loss = grounding.loss(model, [(tokens, times, modality)], [spans])
    h = tokens[[1, 3]]  # the content tokens, no clock: the clock is not bent by this loss
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.cfg.decoder.norm_eps) * model.decoder.norm.weight
    logp = torch.log_softmax(h @ model.decoder.embed.weight.T, -1)  # tied head
    assert torch.allclose(loss, -logp[:, ids].mean(), atol=1e-5)
    moved = tokens.clone()
    moved[[0, 2, 4, 5]] += 3.0  # outside the span or the wrong modality: no effect
    assert torch.allclose(grounding.loss(model, [(moved, times, modality)], [spans]), loss)
    # a frame's tokens share a time: only the best one is held to the words (the others may show other objects)
    vspans = [(0.0, 1.0, "v", "a red circle appears", ["red", "circle"])]
    vids = grounding.targets(tok, vspans)[0][3]
    vtimes, vmod = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 2.0]), torch.zeros(6, dtype=torch.long)
    h = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + model.cfg.decoder.norm_eps) * model.decoder.norm.weight
    score = torch.log_softmax(h @ model.decoder.embed.weight.T, -1)[:, vids].mean(-1)  # each token's mean over words
    best = (score[:3].max() + score[3:5].max()) / 2  # frames at 0.0 and 1.0 s, each by its best token
    assert torch.allclose(grounding.loss(model, [(tokens, vtimes, vmod)], [vspans]), -best, atol=1e-5)
    assert not torch.allclose(-best, -score[:5].mean())  # not the mean over the span's tokens
    b = training_batch(model)
    out = model(*b, ground=[spans, []])
    assert out["ground"] > 0 and torch.allclose(out["loss"], out["ce"] + 0.5 * out["ground"])
    assert torch.allclose(model(*b)["loss"], out["ce"])  # no spans given: the caption loss alone
