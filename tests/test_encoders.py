"""ViT (SigLIP / CLIP) and Whisper encoder + log-mel parity with transformers on tiny random checkpoints;
patch merging and audio pooling on plain torch (only the parity tests need transformers)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from avnano.audio import AudioConfig, AudioEncoder, log_mel, mel_filters
from avnano.vit import ViT, ViTConfig
from avnano.weights import load_audio_encoder, load_vit

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def vit_reference(kind, full):
    """(saved model, callable pixel_values -> (last_hidden_state, pooled)) for the four layouts."""
    transformers = pytest.importorskip("transformers")
    if kind == "siglip":
        vc = transformers.SiglipVisionConfig(**VIT, attn_implementation="sdpa")
        if full:
            tc = transformers.SiglipTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2)
            m = transformers.SiglipModel(transformers.SiglipConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                                                                   attn_implementation="sdpa"))
            tower = lambda x: m.vision_model(pixel_values=x)
        else:
            m = transformers.SiglipVisionModel(vc)
            tower = lambda x: m(pixel_values=x)
    else:
        vc = transformers.CLIPVisionConfig(**VIT, projection_dim=16, attn_implementation="sdpa")
        if full:
            tc = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
            m = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                                                               projection_dim=16, attn_implementation="sdpa"))
            tower = lambda x: m.vision_model(pixel_values=x)
        else:
            m = transformers.CLIPVisionModel(vc)
            tower = lambda x: m(pixel_values=x)
    randomise(m)
    return m, lambda x: (lambda o: (o.last_hidden_state, o.pooler_output))(tower(x))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("full", [False, True], ids=["tower", "full-model"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_vit_matches_transformers(tmp_path, kind, full, dtype, tol):
    m, ref = vit_reference(kind, full)
    m.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("vision_model.") for k in keys) == full  # both key layouts really exercised
    ours = load_vit(str(tmp_path), dtype=dtype)
    m.to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_hidden, ref_pooled = ref(x)
        hidden, pooled = ours(x)
    assert (hidden - ref_hidden).abs().max() <= tol
    assert (pooled - ref_pooled).abs().max() <= tol  # SigLIP: MAP head; CLIP: post-normed class token
    with torch.no_grad():  # the aligner's input: one output per patch, CLIP's class token dropped
        patches = ours.patches(x)
    assert torch.equal(patches, hidden if kind == "siglip" else hidden[:, 1:]) and patches.shape == (2, 16, 32)


def test_vit_merge_2x2_concatenates_averages_or_max_pools():
    torch.manual_seed(0)
    merged = ViT(ViTConfig(family="siglip", image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                           merge=2)).eval()
    with torch.no_grad():
        t = merged.patches(torch.randn(1, 3, 32, 32))  # (1, 4 x 4 patches, 32)
        tm = merged.merge(t)
    grid = t.view(1, 4, 4, 32)
    assert tm.shape == (1, 4, 4 * 32) and merged.cfg.token_dim == 4 * 32
    # token (R, C) holds patches (2R + r, 2C + c) for r, c in 0..1, row-major inside the group
    for R, C in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        want = torch.cat([grid[0, 2 * R + r, 2 * C + c] for r in range(2) for c in range(2)])
        assert torch.equal(tm[0, 2 * R + C], want)
    merged.cfg.merge_mode = "mean"  # averaging: the same groups, one vector of width dim each
    tmean = merged.merge(t)
    assert tmean.shape == (1, 4, 32)
    for R, C in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        want = grid[0, 2 * R:2 * R + 2, 2 * C:2 * C + 2].reshape(4, 32).mean(0)
        assert torch.allclose(tmean[0, 2 * R + C], want, atol=1e-6)
    merged.cfg.merge_mode = "max"  # max-pooling: per feature, the largest of the four patches
    tmax = merged.merge(t)
    assert tmax.shape == (1, 4, 32)
    for R, C in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        group = [grid[0, 2 * R + r, 2 * C + c] for r in range(2) for c in range(2)]
        want = torch.stack([max(g[k] for g in group) for k in range(32)])
        assert torch.equal(tmax[0, 2 * R + C], want)


def synthetic_audio(seconds=3.0, seed=0):
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t)
            + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_feature_extractor(n_mels):
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    assert np.abs(mel_filters(n_mels) - fe.mel_filters).max() <= 1e-6
    audio = synthetic_audio()
    ref = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
    ours = log_mel(audio, n_mels, exact=True)
    assert ours.shape == ref.shape == (1, n_mels, 3000)
    assert (ours - ref).abs().max() <= 1e-5


def tiny_whisper():
    """A tiny random Whisper from transformers (skips the calling test without transformers)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     max_source_positions=50, vocab_size=100, num_mel_bins=80, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, attn_implementation="sdpa")
    return randomise(transformers.WhisperForConditionalGeneration(cfg))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_whisper_encoder_matches_transformers(tmp_path, dtype, tol):
    hf = tiny_whisper()
    hf.save_pretrained(tmp_path)
    ours = load_audio_encoder(str(tmp_path), dtype=dtype)
    hf.to(dtype)
    mel = torch.randn(2, 80, 100, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.encoder(mel).last_hidden_state
        got = ours(mel)
    assert got.shape == (2, 50, 32) and (got - ref).abs().max() <= tol
    # native mode: a shorter clip uses the first rows of the same position table
    with torch.no_grad():
        short = ours(mel[:, :, :40])
    assert short.shape == (2, 20, 32)


def test_whisper_loader_names_bad_keys(tmp_path):
    hf = tiny_whisper()
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.encoder.layers.0.self_attn.k_proj.bias"] = torch.zeros(32)  # Whisper has none
    del state["model.encoder.layer_norm.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_audio_encoder(str(tmp_path))
    assert "unexpected key model.encoder.layers.0.self_attn.k_proj.bias" in str(e.value)
    assert "missing key model.encoder.layer_norm.bias" in str(e.value)
    assert "decoder" not in str(e.value)  # the decoder half is skipped by name, not reported


def test_audio_pool_averages_stem_tokens():
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig(n_mels=80, dim=16, n_layers=0, n_heads=2, hidden_dim=32, max_positions=40, pool=5)).eval()
    assert enc.cfg.tokens_per_second == 10 and enc.cfg.max_seconds == 4.0 and enc.cfg.n_tokens(199) == 20 and enc.cfg.n_tokens(181) == 19
    mel = torch.randn(1, 80, 200)  # 100 stem tokens -> 20 pooled
    with torch.no_grad():
        stem = F.gelu(enc.conv2(F.gelu(enc.conv1(mel))))[0].T  # (100, 16)
        want = enc.norm(stem.view(20, 5, 16).mean(1) + enc.pos_embed[:20])
        assert torch.allclose(enc(mel)[0], want, atol=1e-6)
        assert enc(mel[..., :190]).shape[1] == 19  # a partial window still makes a token


def test_audio_rows_encode_the_same_alone_or_padded_in_a_batch():
    """With `lengths`, a padded row's conv stem, partial pooling window and attention see only its own frames."""
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig(n_mels=80, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_positions=40, pool=5)).eval()
    mel = torch.randn(2, 80, 200)
    frames = [137, 200]  # 69 stem tokens -> 14 pooled, the last window partial; 100 -> 20
    n = [enc.cfg.n_tokens(f) for f in frames]
    mel[0, :, frames[0]:] = 0  # the batch's padding
    with torch.no_grad():
        batched = enc(mel, lengths=torch.tensor(frames))
        alone = enc(mel[:1, :, :frames[0]])[0]
        full = enc(mel[1:])[0]
        careless = enc(mel)  # without lengths the padding leaks into the stem, the pooling and the attention
    assert n == [14, 20] and alone.shape == (14, 16)
    assert torch.allclose(batched[0, :14], alone, atol=1e-5) and torch.allclose(batched[1], full, atol=1e-5)
    assert not torch.allclose(careless[0, :14], alone, atol=1e-3)


def test_a_tail_shorter_than_one_stft_window_still_encodes():
    # a clip a few ms longer than the encoder's t_max left a tail segment the STFT's reflect padding refused
    from avnano.audio import log_mel
    assert log_mel(torch.zeros(100), 80, exact=False).shape == (1, 80, 2)
    from tests.test_model import tiny
    model = tiny()
    model.cfg.audio.max_positions = round(model.cfg.audio.tokens_per_second)  # t_max = 1 s
    (tokens, times), = model.encode_audio([torch.randn(16000 + 100)])  # 1 s + 6 ms
    assert len(tokens) == 3 and times.tolist() == [0.0, 0.5, 1.0]  # two 0.5 s windows, then the tail's one
