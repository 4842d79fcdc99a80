"""TMRoPE against transformers' Qwen2.5-Omni thinker: omni_rope's 3-D position ids vs `get_rope_index` (token
layouts from transformers' own processor), the decoder's multi-section rotary vs the thinker's text model, and
generation with a KV cache vs without, continuing 3-D positions as transformers' rope_deltas do."""
import copy
from types import SimpleNamespace

import pytest
import torch

from avnano.decoder import Decoder, DecoderConfig, rope_cos_sin
from avnano.errors import InputError
from avnano.generate import generate
from avnano.omni_rope import OmniRopeConfig, av_chunks, omni_position_ids, omni_position_ids_batch
from avnano.weights import decoder_keymap, load_mapped

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_omni import processing_qwen2_5_omni as hf_proc  # noqa: E402

AUDIO, IMAGE, VIDEO, A_BOS, A_EOS, V_BOS, V_EOS = 290, 291, 292, 293, 294, 295, 296
SECTION = (2, 3, 3)  # head_dim 16: 8 frequencies, 2 read t, 3 read h, 3 read w


@pytest.fixture(scope="module")
def thinker():
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                # transformers 5 wants mrope_section inside rope_parameters (PITFALLS)
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(SECTION)})
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0])
    audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=48, output_dim=64,
                 num_mel_bins=16, max_source_positions=50, n_window=10)
    cfg = transformers.Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, audio_token_index=AUDIO, image_token_index=IMAGE,
        video_token_index=VIDEO, audio_start_token_id=A_BOS, audio_end_token_id=A_EOS, vision_start_token_id=V_BOS,
        vision_end_token_id=V_EOS, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so attention (and with it the rotary) matters
        for name, p in model.model.language_model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
        model.lm_head.weight.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module")
def rope(thinker):
    return OmniRopeConfig.from_config(thinker.config.to_dict())  # the v5 thinker dict: *_token_index names


def text(*ids):
    return list(ids)


def image(grid):
    return [V_BOS] + [IMAGE] * (grid[0] * grid[1] * grid[2] // 4) + [V_EOS]


def video(grid):
    return [V_BOS] + [VIDEO] * (grid[0] * grid[1] * grid[2] // 4) + [V_EOS]


def audio(mel_frames):
    return [A_BOS] + [AUDIO] * int(hf_proc._get_feat_extract_output_lengths(torch.tensor(mel_frames))) + [A_EOS]


def video_with_audio(grid, second_per_grid, mel_frames):
    """The block exactly as transformers' processor writes it (replace_video_with_audio_token), in token ids."""
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), audio_bos_token="B", audio_eos_token="E",
                           video_token="V", audio_token="A",
                           get_chunked_index=lambda t, n: hf_proc.Qwen2_5OmniProcessor.get_chunked_index(None, t, n))
    n_audio = hf_proc._get_feat_extract_output_lengths(torch.tensor([mel_frames]))
    s = hf_proc.Qwen2_5OmniProcessor.replace_video_with_audio_token(
        fake, {"video_grid_thw": torch.tensor([grid]), "video_second_per_grid": [second_per_grid]}, 0,
        {"num_audio_tokens": n_audio}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
    return [V_BOS] + [{"B": A_BOS, "E": A_EOS, "V": VIDEO, "A": AUDIO}[c] for c in s] + [V_EOS]


def hf_rope_index(thinker, rows, images=(), videos=(), spg=(), mels=(), in_video=False):
    """transformers' get_rope_index on left-padded rows: (3, B, L), deltas (B,), ids, valid."""
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    valid = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pos, deltas = thinker.model.get_rope_index(
        ids, torch.tensor(images) if images else None, torch.tensor(videos) if videos else None, valid, in_video,
        torch.tensor(mels) if mels else None, torch.tensor(spg) if spg else None)
    return pos, deltas[:, 0], ids, valid.bool()


# 7 frames at 2 fps are padded to 8 = 4 temporal patches of 2 (grid t, h, w in 14 px patches): t = 0, 1, 2, 3 s
ODD_FRAMES = (4, 4, 8)
CASES = {
    "text": ([text(*range(5, 17))], {}),
    "images": ([text(5, 6) + image((1, 4, 6)) + text(7) + image((1, 6, 4)) + text(8, 9)], dict(images=[(1, 4, 6), (1, 6, 4)])),
    # 0.64 s per patch (3.125 fps): float32 puts patch 5 at 79, not 80
    "video, audio apart": ([text(5) + video((6, 4, 4)) + audio(260) + text(8, 9)],
                           dict(videos=[(6, 4, 4)], spg=[0.64], mels=[260])),
    # 2.6 s of audio (65 tokens: not a multiple of the 50-token chunk): chunks V 0-1 s, A 0-2 s, V 2-3 s, A 2-2.6 s
    "video with audio": ([text(5, 6) + video_with_audio(ODD_FRAMES, 1.0, 260) + text(7, 8, 9)],
                         dict(videos=[ODD_FRAMES], spg=[1.0], mels=[260], in_video=True)),
    # 0.5 fps: a patch every 4 s jumps over whole 2 s chunks (transformers' one-cut-per-edge rule)
    "slow video with audio": ([text(5) + video_with_audio((4, 4, 4), 4.0, 800) + text(7)],
                              dict(videos=[(4, 4, 4)], spg=[4.0], mels=[800], in_video=True)),
    # row 0: one tall patch (h ids to start + 19) and 10 audio tokens: the eos follows the audio (start + 10),
    # so the row's largest id is an h id that no text reaches; generation continues after it
    "batch, padded": ([text(5) + video_with_audio((1, 40, 4), 1.0, 40) + text(6, 7),
                       text(5, 6, 7) + image((1, 4, 4)) + text(8)],
                      dict(images=[(1, 4, 4)], videos=[(1, 40, 4)], spg=[1.0], mels=[40], in_video=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_position_ids_match_transformers(thinker, rope, case):
    rows, kw = CASES[case]
    ref, ref_deltas, ids, valid = hf_rope_index(thinker, rows, **kw)
    pos, deltas = omni_position_ids_batch(ids, valid, rope, kw.get("images"), kw.get("videos"), kw.get("spg"))
    assert torch.equal(pos, ref) and torch.equal(deltas, ref_deltas)
    if len(rows) == 1:  # the one-sample form gives the same ids and delta
        one, delta = omni_position_ids(rows[0], rope, kw.get("images"), kw.get("videos"), kw.get("spg"))
        assert torch.equal(one, ref[:, 0]) and delta == int(ref_deltas[0])


def test_audio_in_video_by_hand(rope):
    """The block of "video with audio", written out: the bos pair at 2, both streams from 3, chunk order
    V(t 0, 25) A(0-49) V(t 50, 75) A(50-64). The eos pair sits one past the last (audio) chunk's max, 3 + 64,
    below the video patch at 3 s before it (3 + 75); text continues after the eos; the delta counts from 78."""
    ids = text(5, 6) + video_with_audio(ODD_FRAMES, 1.0, 260) + text(7, 8, 9)
    pos, delta = omni_position_ids(ids, rope, video_grid_thw=[ODD_FRAMES], second_per_grid=[1.0])
    assert av_chunks(ODD_FRAMES, 1.0, 65, rope) == [("video", 0, 16), ("audio", 0, 50), ("video", 16, 32), ("audio", 50, 65)]
    assert pos[:, :4].tolist() == [[0, 1, 2, 2]] * 3
    v0, a0, v1, a1 = pos[:, 4:20], pos[:, 20:70], pos[:, 70:86], pos[:, 86:101]
    hw = [[3] * 4 + [4] * 4, [3, 4, 5, 6] * 2]  # 2 x 4 merged tokens per patch: rows, columns from the start
    assert v0.tolist() == [[3] * 8 + [28] * 8, hw[0] * 2, hw[1] * 2] and v1.tolist() == [[53] * 8 + [78] * 8, hw[0] * 2, hw[1] * 2]
    assert a0.tolist() == [list(range(3, 53))] * 3 and a1.tolist() == [list(range(53, 68))] * 3
    assert pos[:, 101:].tolist() == [[68, 68, 69, 70, 71]] * 3 and delta == 79 - len(ids) == 79 - 106


def test_layout_errors(rope):
    with pytest.raises(InputError, match="grid"):
        omni_position_ids(image((1, 4, 4)), rope, image_grid_thw=[(1, 4, 6)])
    with pytest.raises(InputError, match="more images"):
        omni_position_ids(image((1, 4, 4)), rope)
    swapped = video_with_audio((2, 4, 4), 1.0, 150)
    swapped[2:4] = [AUDIO, VIDEO]  # the first chunk must open with the video
    with pytest.raises(InputError, match="not laid out"):
        omni_position_ids(swapped, rope, video_grid_thw=[(2, 4, 4)], second_per_grid=[1.0])


def test_one_d_positions_unchanged_by_sections():
    """(B, T) ids with a section, and (3, B, T) with t = h = w, give the 1-D tables bit for bit."""
    p = torch.randint(0, 500, (2, 7))
    one = rope_cos_sin(p, 16, 1e4, 1.0, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(one, rope_cos_sin(p, 16, 1e4, 1.0, torch.float32, SECTION)))
    assert all(torch.equal(a, b) for a, b in zip(one, rope_cos_sin(p.expand(3, 2, 7), 16, 1e4, 1.0, torch.float32, SECTION)))


def our_decoder(thinker, dtype):
    hf = thinker.config.text_config
    cfg = DecoderConfig(vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
                        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads, hidden_dim=hf.intermediate_size,
                        norm_eps=hf.rms_norm_eps, rope_theta=hf.rope_parameters["rope_theta"], qkv_bias=True,
                        tie_embeddings=False, mrope_section=SECTION)
    # the thinker's text model holds Qwen2's keys without "model."; its lm_head sits beside it
    state = {"model." + k: v for k, v in thinker.model.language_model.state_dict().items()}
    state["lm_head.weight"] = thinker.lm_head.weight
    dec = Decoder(cfg)
    load_mapped(dec, state, decoder_keymap(cfg), "thinker")
    return dec.to(dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_logits_match_thinker_text_model(thinker, rope, dtype, tol):
    rows, kw = CASES["video with audio"]
    ref_pos = hf_rope_index(thinker, rows, **kw)[0]
    image_row = text(5, 6) + image((1, 8, 8)) + [7] * (len(rows[0]) - 20)
    pos = torch.cat([ref_pos, omni_position_ids(image_row, rope, [(1, 8, 8)])[0][:, None]], dim=1)  # (3, 2, L)
    torch.manual_seed(1)
    x = torch.randn(2, pos.shape[-1], 64, dtype=dtype)
    lm, head = copy.deepcopy(thinker.model.language_model).to(dtype), copy.deepcopy(thinker.lm_head).to(dtype)
    with torch.no_grad():
        ref = head(lm(inputs_embeds=x, position_ids=pos).last_hidden_state)
        ours = our_decoder(thinker, dtype)(inputs_embeds=x, positions=pos)
        one_d = our_decoder(thinker, dtype)(inputs_embeds=x, positions=pos[0])  # t ids only: a different model
    assert (ours - ref).abs().max() <= tol
    assert (one_d - ref).abs().max() > 1e3 * tol  # the h / w sections matter at this size


def test_generation_cache_continues_3d_positions(thinker, rope):
    """Greedy decoding with the KV cache from 3-D prefill ids (a left-padded batch) equals decoding without
    a cache where new token k of a row sits at t = h = w = (row length + k) + transformers' rope delta."""
    rows, kw = CASES["batch, padded"]
    _, hf_deltas, ids, valid = hf_rope_index(thinker, rows, **kw)
    pos, _ = omni_position_ids_batch(ids, valid, rope, kw["images"], kw["videos"], kw["spg"])
    dec = our_decoder(thinker, torch.float32)
    new = generate(dec, input_ids=ids, attention_mask=valid, positions=pos, max_new_tokens=12)
    assert new.shape == (2, 12)
    for b, row in enumerate(rows):
        n = len(row)
        cont = (n + torch.arange(12) + hf_deltas[b]).expand(3, 12)
        full_pos = torch.cat([pos[:, b, -n:], cont], dim=1)[:, None]
        with torch.no_grad():
            logits = dec(input_ids=torch.cat([ids[b, -n:], new[b]])[None], positions=full_pos)[0, n - 1:-1]
        assert torch.equal(logits.argmax(-1), new[b])
