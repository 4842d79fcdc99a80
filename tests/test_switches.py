"""Each AVConfig ablation switch has the effect it claims, on the tiny preset and hand-made clips;
a clip's log-probs and caption do not depend on its batch-mates; AVConfig.from_dict rejects unknown fields."""
from dataclasses import asdict

import pytest
import torch

from avnano.interleave import AUDIO, VISUAL
from avnano.layout import assemble
from avnano.model import AVConfig, preset
from avnano.tokenizer import AV
from tests import test_model
from tests.test_model import CAPTIONS
from tests.test_ot import by_hand


def tiny(**overrides):
    return test_model.tiny(**overrides).eval()


def clips(seconds=(2.0, 3.5), seed=0):
    """Random frames at 2 fps (times 0.25, 0.75, ... s) and random 16 kHz audio, per clip."""
    return test_model.batch(seconds, seed)


def captions(model, n=2):
    rendered = [model.render(c) for c in CAPTIONS[:n]]
    return [r[0] for r in rendered], [r[1] for r in rendered]


def loss(model, frames, times, audio, **kw):
    with torch.no_grad():
        return model(frames, times, audio, *captions(model, len(frames)), **kw)


# ------------------------------------------------------------------------------- modalities
def test_video_only_ignores_the_audio():
    model = tiny(modalities="v")
    frames, times, audio = clips()
    other = [torch.randn(len(a) // 2) for a in audio]  # different sound, different length
    assert torch.equal(loss(model, frames, times, audio)["loss"], loss(model, frames, times, other)["loss"])
    assert not torch.equal(loss(model, frames, times, audio)["loss"], loss(model, clips(seed=1)[0], times, audio)["loss"])
    with torch.no_grad():
        assert all((m == VISUAL).all() for _, _, m in model.av_block(frames, times, audio)[0])
    model.cfg.modalities = "av"  # the same weights with both streams do hear the audio
    assert not torch.equal(loss(model, frames, times, audio)["loss"], loss(model, frames, times, other)["loss"])


def test_audio_only_ignores_the_frames():
    model = tiny(modalities="a")
    frames, times, audio = clips()
    other = [f[:1].flip(1) for f in frames]  # one different frame per clip
    assert torch.equal(loss(model, frames, times, audio)["loss"], loss(model, other, [t[:1] for t in times], audio)["loss"])
    assert not torch.equal(loss(model, frames, times, audio)["loss"], loss(model, frames, times, clips(seed=1)[2])["loss"])
    with torch.no_grad():
        assert all((m == AUDIO).all() for _, _, m in model.av_block(frames, times, audio)[0])


# ------------------------------------------------------------------------------- OT fusion and loss
def test_ot_fusion_mixes_each_stream_with_the_other_through_the_plan():
    model = tiny(interleave="concat", time_embed=False)  # concat: [visual; audio], no clock: pure content
    frames, times, audio = clips()
    with torch.no_grad():
        plain = model.av_block(frames, times, audio)[0]
        model.cfg.ot_fusion = True  # same weights
        fused = model.av_block(frames, times, audio)[0]
    for (x, t, m), (y, ty, my) in zip(plain, fused):
        n_v = int((m == VISUAL).sum())
        v, a = x[:n_v], x[n_v:]
        _, P = by_hand(v, a)  # the naive Sinkhorn plan on the cosine cost
        want = torch.cat([v + n_v * P @ a, a + len(a) * P.T @ v])  # v' = v + n_v P a, a' = a + n_a P^T v
        assert not torch.allclose(y, x, atol=1e-2) and torch.allclose(y, want, atol=1e-4)
        assert torch.equal(t, ty) and torch.equal(m, my)


def test_ot_weight_adds_lambda_times_the_mean_plan_cost():
    model = tiny(interleave="concat", ot_weight=0.3, time_embed=False)  # the block is [visual; audio] content
    frames, times, audio = clips()
    out = loss(model, frames, times, audio)
    with torch.no_grad():
        blocks = model.av_block(frames, times, audio)[0]
    terms = []
    for x, _, m in blocks:
        n_v = int((m == VISUAL).sum())
        C, P = by_hand(x[:n_v], x[n_v:])
        terms.append((P * C).sum())
    assert torch.allclose(out["ot"], torch.stack(terms).mean(), atol=1e-5) and out["ot"] > 0
    assert torch.allclose(out["loss"], out["ce"] + 0.3 * out["ot"])
    model.cfg.ot_weight = 0.0
    assert loss(model, frames, times, audio)["ot"] == 0 and torch.allclose(loss(model, frames, times, audio)["loss"], out["ce"])


# ------------------------------------------------------------------------------- label smoothing
def test_label_smoothing_changes_the_loss_by_the_hand_computed_amount():
    model = tiny(label_smoothing=0.1)
    frames, times, audio = clips()
    ids, masks = captions(model)
    with torch.no_grad():
        out = model(frames, times, audio, ids, masks, return_hidden=True)
        nll, smooth = [], []
        for b, (row, lm) in enumerate(zip(ids, masks)):
            n_av = int(out["is_av"][b].sum())  # the placeholder (one id) became n_av AV tokens
            for j in (j for j, keep in enumerate(lm) if keep):
                p = j + n_av - 2  # token j sits at j - 1 + n_av and is predicted one step before
                logp = torch.log_softmax(model.decoder.logits(out["hidden"][b, p]).float(), -1)
                nll.append(-logp[row[j]])
                smooth.append(-logp.mean())
        assert len(nll) == out["n_tokens"] == sum(map(sum, masks))
        nll, smooth = torch.stack(nll).mean(), torch.stack(smooth).mean()
        assert torch.allclose(out["ce"], 0.9 * nll + 0.1 * smooth, atol=1e-5)  # (1 - eps) NLL + eps mean(-log p)
        model.cfg.label_smoothing = 0.0
        plain = model(frames, times, audio, ids, masks)["ce"]
    assert torch.allclose(plain, nll, atol=1e-5) and (out["ce"] - plain).abs() > 1e-3


# ------------------------------------------------------------------------------- audio aligner
@pytest.mark.parametrize("kind", ["qformer", "linear", "mlp"])
def test_audio_aligner_token_counts_and_times(kind):
    """The tiny encoder gives 10 tokens/s (50 Hz / pool 5). A linear or MLP aligner keeps every one,
    timed at k / 10 s; the Q-Former gives n_queries tokens per 0.5 s window, timed at the window start."""
    model = tiny(audio_aligner=kind, interleave="concat", n_queries=2)
    frames, times, audio = clips()  # 2.0 s and 3.5 s
    with torch.no_grad():
        blocks = model.av_block(frames, times, audio)[0]
    for (_, t, m), seconds in zip(blocks, (2.0, 3.5)):
        got = t[m == AUDIO]
        if kind == "qformer":
            want = torch.arange(int(seconds / 0.5)).float().repeat_interleave(2) * 0.5
        else:
            want = torch.arange(int(seconds * 10)).float() / 10
        assert got.shape == want.shape and torch.allclose(got, want)


# ------------------------------------------------------------------------------- interleaving and positions
def test_interleave_kinds_order_the_same_tokens_differently():
    """2 s clip: four frames of one token at 0.25, 0.75, 1.25, 1.75 s; four audio tokens at 0, 0.5, 1, 1.5 s."""
    model = tiny(interleave="concat", chunk_seconds=1.0, air=0.25, object_tokens=0)  # one merged token per frame
    frames, times, audio = clips(seconds=(2.0,))
    orders = {"concat": "VVVVAAAA", "per_frame": "VAVAVAVA", "chunked": "VVAAVVAA",
              "avti": "AVVVV"}  # AVTI: N = round(4 / 0.75) = 5 slots, one audio token (resampled), k = 2
    got = {}
    for kind in orders:
        model.cfg.interleave = kind
        with torch.no_grad():
            got[kind] = model.av_block(frames, times, audio)[0][0]
        assert "".join("A" if m == AUDIO else "V" for m in got[kind][2]) == orders[kind], kind
    x = got["concat"][0]  # V0 V1 V2 V3 A0 A1 A2 A3
    assert torch.equal(got["per_frame"][0], x[[0, 4, 1, 5, 2, 6, 3, 7]])
    assert torch.equal(got["chunked"][0], x[[0, 1, 4, 5, 2, 3, 6, 7]])
    assert torch.equal(got["avti"][0], x[[4, 0, 1, 2, 3]])


def test_time_positions_follow_the_clock():
    """Sequential ids 0..L-1; time-aligned: the AV block at k + floor(25 t), the text after from max + 1."""
    model = tiny(interleave="concat", object_tokens=0)  # one merged token per frame
    frames, times, audio = clips(seconds=(2.0,))
    ids, masks = captions(model, 1)
    k = ids[0].index(model.tok.token_id(AV))
    with torch.no_grad():
        blocks = model.av_block(frames, times, audio)[0]
        seq = assemble(model, blocks, ids, masks).positions[0]
        model.cfg.time_positions = True
        timed = assemble(model, blocks, ids, masks).positions[0]
    L = len(ids[0]) - 1 + 8
    assert seq.tolist() == list(range(L))
    av = [6, 18, 31, 43, 0, 12, 25, 37]  # 25 * (0.25, 0.75, 1.25, 1.75, 0, 0.5, 1, 1.5), floored
    assert timed.tolist() == list(range(k)) + [k + p for p in av] + list(range(k + 44, k + 44 + L - k - 8))
    on = loss(model, frames, times, audio)["loss"]
    model.cfg.time_positions = False
    assert not torch.allclose(on, loss(model, frames, times, audio)["loss"])  # the decoder reads them


# ------------------------------------------------------------------------------- attention mask
@pytest.mark.parametrize("mask", ["prefix", "causal"])
def test_mask_decides_whether_av_tokens_see_later_av_tokens(mask):
    """Changing the last frame (the last AV token under concat, video only) reaches the first AV token's
    hidden state under the prefix mask (bidirectional AV block), never under the causal one; a
    different caption reaches no AV token under either."""
    model = tiny(mask=mask, modalities="v", interleave="concat")
    frames, times, audio = clips(seconds=(2.0,))
    changed = [frames[0].clone()]
    changed[0][-1] = 255 - changed[0][-1]
    ids, masks = captions(model, 1)
    with torch.no_grad():
        h = model(frames, times, audio, ids, masks, return_hidden=True)
        h2 = model(changed, times, audio, ids, masks, return_hidden=True)
        other = [model.render(CAPTIONS[1])]
        h3 = model(frames, times, audio, [other[0][0]], [other[0][1]], return_hidden=True)
    first = h["is_av"][0].nonzero()[0, 0]
    moved = (h["hidden"][0, first] - h2["hidden"][0, first]).abs().max()
    assert (moved > 1e-4) if mask == "prefix" else (moved == 0)
    av = h["is_av"][0]
    assert torch.allclose(h["hidden"][0][av], h3["hidden"][0][h3["is_av"][0]], atol=1e-6)


# ------------------------------------------------------------------------------- padding invariance
@pytest.mark.parametrize("mask,seconds", [("prefix", 2.0), ("causal", 2.0), ("prefix", 2.03)])
def test_a_clip_scores_and_captions_the_same_alone_or_with_a_longer_batch_mate(mask, seconds):
    """2.03 s: 203 mel frames, 102 stem tokens, a partial last pooling window (2.0 s fills them all)."""
    model = tiny(mask=mask)
    frames, times, audio = clips(seconds=(seconds, 3.5))  # the batch-mate is longer: clip 0 gets padded
    comp = [model.completion_ids(CAPTIONS[0]), model.completion_ids(CAPTIONS[1])]
    with torch.no_grad():
        alone_blocks = model.av_block(frames[:1], times[:1], audio[:1])[0]
        both_blocks = model.av_block(frames, times, audio)[0]
        assert torch.allclose(alone_blocks[0][0], both_blocks[0][0], atol=1e-5)
        alone, _ = model.completion_logprobs(alone_blocks, comp[:1])
        both, m = model.completion_logprobs(both_blocks, comp)
        assert m[0].sum() == len(comp[0]) and torch.allclose(both[0, :len(comp[0])], alone[0], atol=1e-5)
        ids, lm = captions(model, 1)
        one = model(frames[:1], times[:1], audio[:1], ids, lm)["loss"]
        both_loss = model(frames, times, audio, *captions(model))
    n0 = len(comp[0])
    assert torch.allclose(one, -alone[0].sum() / n0, atol=1e-5)  # the loss is the same clip's mean NLL
    assert both_loss["n_tokens"] == n0 + len(comp[1])
    greedy_alone = model.generate(frames[:1], times[:1], audio[:1], max_new_tokens=12)
    greedy_both = model.generate(frames, times, audio, max_new_tokens=12)
    assert greedy_alone[0] == greedy_both[0] and len(greedy_alone[0]) > 0


# ------------------------------------------------------------------------------- config
def test_config_round_trips_and_rejects_unknown_fields():
    cfg = preset("tiny", 300, lora_r=4, interleave="avti")
    assert AVConfig.from_dict(asdict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"unknown AVConfig fields \['bogus', 'interleaver'\]"):
        AVConfig.from_dict({**asdict(cfg), "interleaver": "avti", "bogus": 1})


def test_word_dropout_blanks_caption_inputs_in_training_only():
    model = test_model.tiny(word_dropout=1.0)
    frames, times, audio = test_model.batch(seconds=(2.0,))
    ids, mask = model.render(CAPTIONS[0])
    start = mask.index(1)
    shuffled = ids[:start] + ids[start:-1][::-1] + ids[-1:]  # the same caption tokens in another order
    blocks = model.av_block(frames, times, audio)[0]
    with torch.no_grad():
        ha, xa = model.hidden_states(blocks, [ids], [mask], word_dropout=1.0)
        hb, xb = model.hidden_states(blocks, [shuffled], [mask], word_dropout=1.0)
        hc, _ = model.hidden_states(blocks, [shuffled], [mask])
    assert torch.equal(ha, hb)  # every caption input blanked: the words before cannot tell the next one
    assert not torch.allclose(ha, hc) and not torch.equal(xa.labels, xb.labels)  # the labels stay the caption's
    plain = test_model.tiny().eval()  # the same weights without word dropout
    model.eval()
    with torch.no_grad():  # evaluation reads the words it has written
        assert torch.equal(model(frames, times, audio, [ids], [mask])["ce"], plain(frames, times, audio, [ids], [mask])["ce"])
        model.train()
        assert not torch.equal(model(frames, times, audio, [ids], [mask])["ce"], plain(frames, times, audio, [ids], [mask])["ce"])


def test_word_swap_feeds_random_swap_words_keeps_labels_and_only_trains():
    model = test_model.tiny(word_swap=1.0, swap_words=("red", "circle"))
    assert len(model.swap_ids) == 2  # both are single tokens of the test tokenizer
    frames, times, audio = test_model.batch(seconds=(2.0,))
    a, mask = model.render("a red circle appears at 0.5 s.")
    b, _ = model.render("a circle red appears at 0.5 s.")  # the two swap words exchanged
    first = next(t for t, i in enumerate(a) if i != b[t])
    blocks = model.av_block(frames, times, audio)[0]
    with torch.no_grad():
        torch.manual_seed(1)
        ha, xa = model.hidden_states(blocks, [a], [mask], word_swap=1.0)
        torch.manual_seed(1)
        hb, xb = model.hidden_states(blocks, [b], [mask], word_swap=1.0)
        hc, _ = model.hidden_states(blocks, [a], [mask])
    assert torch.equal(ha, hb)  # whichever swap word was written, the input is the same random draw
    assert not torch.equal(xa.labels, xb.labels)  # the labels stay each caption's own
    n_av = len(blocks[0][0])
    cut = first + n_av - 1  # positions before the first swap word's input are untouched
    assert torch.equal(ha[:, :cut], hc[:, :cut]) and not torch.allclose(ha, hc)
    plain = test_model.tiny().eval()  # the same weights without swapping
    model.eval()
    with torch.no_grad():  # evaluation reads the words it has written
        assert torch.equal(model(frames, times, audio, [a], [mask])["ce"], plain(frames, times, audio, [a], [mask])["ce"])
