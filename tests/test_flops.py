"""The MFU formula (avnano/flops.py) against FLOPs counted by hand for a tiny captioner, in three training stages."""
import math
from dataclasses import replace

import pytest
import torch

from avnano import lora
from avnano.audio import AudioConfig, MelSegments, mel_segments
from avnano.decoder import DecoderConfig
from avnano.flops import FlopCounter, mfu
from avnano.interleave import avti_order, per_frame_order
from avnano.model import AVCaptioner, AVConfig
from avnano.tokenizer import Tokenizer
from avnano.vit import ViTConfig

# ViT: 16 px / patch 8 = 2 x 2 patches, dim 8, 1 layer, MLP 16; audio: 80 mels, dim 8, 1 layer, MLP 16, 100 positions
# (50 tokens/s: 2 s segments); decoder: dim 8, 2 heads of 4, 1 kv head, MLP 16, vocab 320, 1 layer.
CFG = AVConfig(vit=ViTConfig(image_size=16, patch_size=8, dim=8, n_layers=1, n_heads=2, hidden_dim=16),
               audio=AudioConfig(n_mels=80, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_positions=100),
               decoder=DecoderConfig(vocab_size=320, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16),
               visual_aligner="linear", audio_aligner="qformer", interleave="concat", mask="prefix")
# one clip: 2 frames; 1 s of audio = 100 mel frames -> 50 encoder tokens -> 2 Q-Former windows of 25 frames;
# AV block 2 x 4 visual + 2 audio = 10 tokens; 7 ids with the placeholder at index 2 and 3 caption labels -> L = 16
CLIP = dict(n_frames=2, audio=MelSegments([torch.zeros(80, 100)], [50]), n_ids=7, placeholder=2, n_labels=3)


def model(stage):
    torch.manual_seed(0)
    tok = Tokenizer.train(["a red square appears.", "Describe the clip."], vocab_size=300)
    m = AVCaptioner(CFG, tok)
    if stage == "lora":
        lora.inject(m.decoder, CFG.lora_targets, r=2, alpha=4)
    m.set_trainable({"full": {"vit", "audio", "aligners", "decoder"}, "align": {"aligners"}, "lora": {"aligners", "lora"}}[stage])
    return m


# weights per token of each part (matrices only; biases, norms, tables left out)
PATCH = 8 * 3 * 8 * 8                # conv 3 -> 8 channels, 8 x 8 kernel
ENC_BLOCK = 4 * 8 * 8 + 2 * 8 * 16   # q, k, v, out + fc1, fc2 (ViT and audio blocks alike)
CONV1, CONV2 = 8 * 80 * 3, 8 * 8 * 3
KV = 2 * 8 * 8                       # Q-Former k and v projections, on every encoder frame
PER_QUERY = 8 * 8 * 5                # Q-Former q, out_proj, MLP (2 layers), out, on each query
CLOCK = 32 * 8                       # time embedding: 16 sines + 16 cosines -> 8
DEC_BLOCK = 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k, v (1 kv head of 4), o, gate, up, down = 576
HEAD = 320 * 8                       # tied embedding as the output head
DEC_LORA = 2 * ((8 + 8) + 2 * (8 + 4) + (8 + 8) + 3 * (8 + 16))  # r (in + out) for q, k, v, o, gate, up, down
# attention pairs: ViT 2 frames x 4^2; audio 50^2; Q-Former 1 query x 50 frames; decoder causal 16 x 17 / 2
# + prefix mask (placeholder 2 x 10 AV tokens + 10 x 9 / 2 among the AV tokens)
VIT_PAIRS, AUDIO_PAIRS, QF_PAIRS, DEC_PAIRS = 2 * 16, 50 * 50, 50, 136 + 20 + 45


def attention(pairs, grad=True):
    return 4 * 8 * pairs * (3 if grad else 1)  # d = 8 in every tower here


FULL = sum([
    4 * PATCH * 8,              # patch embedding: trained, but pixels need no gradient: 4N x 8 patches
    6 * ENC_BLOCK * 8,          # ViT block: 8 tokens
    attention(VIT_PAIRS),
    6 * 8 * 8 * 8,              # visual aligner (linear 8 -> 8) on 8 visual tokens
    4 * CONV1 * 100,            # conv1 at 100 mel frames (mel needs no gradient)
    6 * CONV2 * 50,             # conv2, stride 2: 50 positions
    6 * ENC_BLOCK * 50,         # audio block: 50 tokens
    attention(AUDIO_PAIRS),
    6 * KV * 50 + 6 * PER_QUERY * 2,
    attention(QF_PAIRS),
    4 * CLOCK * 10,             # the clock on 10 AV tokens (times need no gradient)
    6 * DEC_BLOCK * 16,
    attention(DEC_PAIRS),
    6 * HEAD * 3,               # logits on the 3 label positions only
])
ALIGN = sum([
    2 * PATCH * 8, 2 * ENC_BLOCK * 8, attention(VIT_PAIRS, grad=False),  # frozen ViT: forward only
    6 * 8 * 8 * 8,
    2 * CONV1 * 100, 2 * CONV2 * 50, 2 * ENC_BLOCK * 50, attention(AUDIO_PAIRS, grad=False),
    6 * KV * 50 + 6 * PER_QUERY * 2, attention(QF_PAIRS),
    4 * CLOCK * 10,
    4 * DEC_BLOCK * 16,         # frozen decoder, gradients pass through to the aligners
    attention(DEC_PAIRS),
    4 * HEAD * 3,
])
LORA = ALIGN + 6 * DEC_LORA * 16


@pytest.mark.parametrize("stage, expected", [("full", FULL), ("align", ALIGN), ("lora", LORA)])
def test_flops_of_one_clip_match_the_hand_count(stage, expected):
    m = model(stage)
    assert FlopCounter(m).clip(**CLIP) == expected
    ids, mask = [1, 2, m.av_id, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1, 1]  # CLIP's 7 ids, placeholder at 2, 3 labels
    items = [({}, torch.zeros(2, 16, 16, 3, dtype=torch.uint8), torch.zeros(2), CLIP["audio"])]
    assert FlopCounter(m).batch(items * 2, [ids] * 2, [mask] * 2) == 2 * expected  # two clips of the hand-counted one


def test_full_is_more_than_align_by_the_backward_of_the_towers():
    vit = 2 * PATCH * 8 + 4 * ENC_BLOCK * 8 + 4 * 8 * VIT_PAIRS * 2
    audio = 2 * CONV1 * 100 + 4 * CONV2 * 50 + 4 * ENC_BLOCK * 50 + 4 * 8 * AUDIO_PAIRS * 2
    assert FULL - ALIGN == vit + audio + 2 * DEC_BLOCK * 16 + 2 * HEAD * 3


def test_audio_segments_and_av_tokens_by_hand():
    c = FlopCounter(model("full"))
    assert c.audio_segments(torch.zeros(16000)) == [(100, 50)]               # 1 s: 100 mel frames, 50 tokens
    wav = torch.randn(40000)                                                   # 2.5 s: a 2 s segment and 0.5 s
    assert c.audio_segments(wav) == [(200, 100), (50, 25)]
    assert c.audio_segments(mel_segments(wav, CFG.audio)) == [(200, 100), (50, 25)]  # the loader's log-mel alike
    c.cfg = CFG.__class__(**{**CFG.__dict__, "interleave": "per_frame"})
    assert c.av_tokens(8, 2, 3) == 8 + 2 * 2 == len(per_frame_order(2, 4, 3))  # 3 -> 4 audio
    c.cfg = CFG.__class__(**{**CFG.__dict__, "interleave": "avti"})
    assert c.av_tokens(8, 2, 3) == round(8 / 0.75) == 11 == len(avti_order(2, 4, 3, 0.25))


def test_mfu_is_one_ranks_flops_over_one_gpus_peak():
    assert mfu(494.5e12, 1.0, 989e12) == pytest.approx(0.5)
    assert mfu(494.5e12, 2.0, 989e12) == pytest.approx(0.25)
    assert math.isclose(mfu(FULL, 1e-6, 1e12), FULL / 1e6)


def test_colour_stream_adds_its_pixel_layer_and_its_aligner():
    torch.manual_seed(0)
    tok = Tokenizer.train(["a red square appears.", "Describe the clip."], vocab_size=300)
    m = AVCaptioner(replace(CFG, colour_stream=4), tok)
    m.set_trainable({"vit", "audio", "aligners", "decoder"})
    # 3 -> 4 per pixel at half resolution (8 x 8 pixels per 16 px frame, 2 frames; pixels need no gradient: 4N), then
    # the colour aligner (linear 4 -> 8) on the 8 visual tokens (6N)
    assert FlopCounter(m).clip(**CLIP) == FULL + 4 * (3 * 4) * 2 * 64 + 6 * 4 * 8 * 8
