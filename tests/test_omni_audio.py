"""Qwen2.5-Omni's audio tower and features (avnano/omni_audio.py) against transformers 5.24 on tiny random
towers and the same samples; the audio of a video's own stream (avnano/media.py) in the cases Omni prompts meet."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avnano.errors import InputError
from avnano.media import load_clip, write_clip
from avnano.omni_audio import (OMNI_AUDIO_UNUSED, OmniAudio, OmniAudioConfig, audio_features, audio_token_count,
                               load_omni_audio, omni_audio_keymap)

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5OmniAudioEncoderConfig, WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder  # noqa: E402
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor  # noqa: E402

# Qwen2.5-Omni-7B's config.json audio_config (the 3B differs in output_dim: 2048)
OMNI_7B_AUDIO = {"activation_function": "gelu", "d_model": 1280, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                 "encoder_layers": 32, "max_source_positions": 1500, "model_type": "qwen2_5_omni_audio_encoder",
                 "n_window": 100, "num_mel_bins": 128, "output_dim": 3584, "scale_embedding": False}
# Qwen2.5-Omni's preprocessor_config.json, audio part (what Qwen2_5OmniProcessor.from_pretrained builds)
OMNI_FEATURES = dict(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300,
                     padding_value=0.0, padding_side="right", return_attention_mask=True, dither=0.0)


def tiny_tower(n_window, seed=0):
    """A random 2-layer transformers tower (weights drawn wide enough that every part matters) and its config."""
    hc = Qwen2_5OmniAudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                       d_model=32, max_source_positions=max(n_window, 8), n_window=n_window,
                                       output_dim=24, attn_implementation="sdpa")
    torch.manual_seed(seed)
    hf = Qwen2_5OmniAudioEncoder(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    return hf, hc.to_dict()


def test_config_from_json():
    cfg = OmniAudioConfig.from_json(OMNI_7B_AUDIO)
    assert (cfg.n_mels, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.max_positions, cfg.n_window,
            cfg.output_dim) == (128, 1280, 32, 20, 5120, 1500, 100, 3584)
    with pytest.raises(InputError, match="cfg.json: audio_config lacks n_window"):
        OmniAudioConfig.from_json({k: v for k, v in OMNI_7B_AUDIO.items() if k != "n_window"}, "cfg.json")
    with pytest.raises(InputError, match="only 'gelu'"):
        OmniAudioConfig.from_json(dict(OMNI_7B_AUDIO, activation_function="relu"))


def test_token_count_hand_computed():
    # mel frames -> ceil(T/2) conv tokens -> floor(./2) pooled: 100 frames/s -> 25 tokens/s
    for frames, tokens in ((0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (7, 2), (100, 25), (101, 25), (103, 26),
                           (200, 50), (1000, 250), (30000, 7500)):
        assert audio_token_count(frames) == tokens, frames
    assert audio_token_count(torch.tensor([100, 103])).tolist() == [25, 26]


@pytest.mark.parametrize("n_window", [4, 3])  # 3: odd, so pooled pairs straddle two chunks (transformers pairs per clip)
def test_tower_matches_transformers(n_window):
    hf, hc = tiny_tower(n_window)
    cfg = OmniAudioConfig.from_json(hc)
    state = {"thinker.audio_tower." + k: v for k, v in hf.state_dict().items()}
    assert "thinker.audio_tower.audio_bos_eos_token.weight" in state  # stored, skipped by name
    ours = load_omni_audio(state, cfg, hf_prefix="thinker.audio_tower.").eval()
    lengths = [37, 2 * n_window, 5, 1, 2 * n_window + 1]  # several chunks, a short last chunk, shorter than one chunk
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        hf.to(dtype), ours.to(dtype)
        torch.manual_seed(1)
        clips = [torch.randn(128, T, dtype=dtype) for T in lengths]
        with torch.no_grad():
            ref = hf(torch.cat(clips, 1), feature_lens=torch.tensor(lengths)).last_hidden_state
            out = ours(clips)
            # the padded-batch form, its padding full of NaN: nothing leaks into the real tokens
            batch = torch.full((len(clips), 128, max(lengths)), float("nan"), dtype=dtype)
            for b, c in enumerate(clips):
                batch[b, :, :c.shape[1]] = c
            padded = ours(batch, torch.tensor(lengths))
            alone = torch.cat([ours(c) for c in clips])
        assert ref.shape == out.shape == (sum(audio_token_count(T) for T in lengths), 24)
        assert (out - ref).abs().max() <= tol, (dtype, (out - ref).abs().max())
        assert (padded - ref).abs().max() <= tol and (alone - ref).abs().max() <= tol


def test_key_map_names_every_problem():
    hf, hc = tiny_tower(4)
    cfg = OmniAudioConfig.from_json(hc)
    state = {"audio_tower." + k: v for k, v in hf.state_dict().items()}
    keymap = omni_audio_keymap(cfg)
    # every released key is mapped or skipped by name, and every parameter of ours has a source
    assert set(state) == set(keymap) | {"audio_tower." + k for k in OMNI_AUDIO_UNUSED}
    assert set(keymap.values()) == set(OmniAudio(cfg).state_dict())
    del state["audio_tower.layers.1.fc2.bias"]
    state["audio_tower.proj.weight"] = torch.zeros(5, 32)
    state["audio_tower.positional_embedding.positional_embedding"] = torch.zeros(8, 32)
    state["visual.merger.mlp.0.bias"] = torch.zeros(3)  # another tower's key: not the audio loader's business
    with pytest.raises(InputError) as e:
        load_omni_audio(state, cfg, source="ckpt/model.safetensors")
    msg = str(e.value)
    assert msg.startswith("ckpt/model.safetensors: cannot load weights")
    assert "missing key audio_tower.layers.1.fc2.bias" in msg
    assert "wrong shape for audio_tower.proj.weight: file has (5, 32), model expects (24, 32)" in msg
    assert "unexpected key audio_tower.positional_embedding.positional_embedding" in msg
    assert "visual" not in msg


def test_features_match_the_omni_processor():
    """Qwen2_5OmniProcessor._process_audio itself (its padding / mask / token-count code) on the feature extractor
    its preprocessor_config.json builds, against audio_features on the same samples."""
    rng = np.random.default_rng(0)
    tone = np.concatenate([0.5 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000), 1e-6 * rng.standard_normal(9001)])
    click = 1e-4 * rng.standard_normal(16000)
    click[-1] = 1.0  # loudest in the frame just past the last kept one: the max-8 floor must still see it
    wavs = [w.astype(np.float32) for w in (tone, click, 0.1 * rng.standard_normal(159))]  # 17001: not whole hops
    fake = SimpleNamespace(feature_extractor=WhisperFeatureExtractor(**OMNI_FEATURES),
                           replace_audio_token=lambda inputs, audio_idx: "")
    got, _ = Qwen2_5OmniProcessor._process_audio(fake, wavs, **Qwen2_5OmniProcessor.audio_kwargs, return_tensors="pt")
    assert got["input_features"].shape == (3, 128, 30000)
    for i, w in enumerate(wavs):
        keep = got["feature_attention_mask"][i].bool()
        ours = audio_features(torch.from_numpy(w))
        assert ours.shape == (128, -(-len(w) // 160)) == (128, int(keep.sum()))
        assert (ours - got["input_features"][i][:, keep]).abs().max() <= 1e-5
        assert audio_token_count(ours.shape[1]) == int(got["num_audio_tokens"][i])
    tone_mel, click_mel = audio_features(torch.from_numpy(wavs[0])), audio_features(torch.from_numpy(wavs[1]))
    assert abs(tone_mel.min() - (tone_mel.max() - 2.0)) < 1e-6  # the max-8 floor ((x+4)/4 units: 2) is active
    assert click_mel.min() > click_mel.max() - 2.0 + 0.4  # ... and here set by the frame past the kept ones


def test_audio_from_a_videos_own_stream(tmp_path):
    """5.1 AAC at 48 kHz in an mp4 beside H.264 -> 16 kHz mono, 25 tokens/s; an mp4 without audio -> no audio
    (clip.has_audio False, so the prompt gets no audio tokens), not an error."""
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    t = np.arange(96000) / 48000
    tones = (110, 220, 330, 440, 550, 660)  # FL FR FC LFE BL BR
    surround = np.stack([0.2 * np.sin(2 * np.pi * f * t) for f in tones]).astype(np.float32)
    write_clip(str(tmp_path / "surround.mp4"), frames, fps=5, audio=surround, sample_rate=48000)
    clip = load_clip(str(tmp_path / "surround.mp4"))
    assert clip.has_video and clip.has_audio and clip.audio.shape == (32000,) and clip.audio.dtype == torch.float32
    spectrum = np.abs(np.fft.rfft(clip.audio[8000:24000].numpy()))  # 1 s: 1 Hz bins
    floor = 100 * np.median(spectrum)
    assert all(spectrum[f] > floor for f in (110, 220, 330, 550, 660))  # FFmpeg's downmix: the five main channels
    assert spectrum[440] < floor  # ... and not the LFE
    mel = audio_features(clip.audio)
    assert mel.shape == (128, 200) and audio_token_count(mel.shape[1]) == 50
    write_clip(str(tmp_path / "silent.mp4"), frames, fps=5)
    clip = load_clip(str(tmp_path / "silent.mp4"))
    assert clip.has_video and not clip.has_audio and clip.duration == pytest.approx(2.0)


def test_gradients_with_checkpointing():
    """Training through the tower: the same gradients with per-block recomputation as without."""
    hf, hc = tiny_tower(4)
    tower = load_omni_audio(hf.state_dict(), OmniAudioConfig.from_json(hc), hf_prefix="").train()
    torch.manual_seed(2)
    clips = [torch.randn(128, 21), torch.randn(128, 8)]
    grads = []
    for checkpointing in (False, True):
        tower.grad_checkpointing = checkpointing
        tower.zero_grad()
        tower(clips).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in tower.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_position_table_is_float32_whatever_the_default_dtype():
    """The table is not in the checkpoint: it must be computed exactly as transformers computes it (in float32),
    also when a float64 parity run builds the model under torch.set_default_dtype(torch.float64)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SinusoidsPositionEmbedding
    cfg = OmniAudioConfig(dim=64, n_layers=0, n_heads=4, hidden_dim=8, n_window=100, output_dim=8)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        ours = OmniAudio(cfg).pos
    finally:
        torch.set_default_dtype(default)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, SinusoidsPositionEmbedding(1500, 64).positional_embedding[:100])
