"""The Qwen2.5-Omni thinker (avnano/omni.py) against transformers' Qwen2_5OmniThinkerForConditionalGeneration on tiny random
checkpoints written here in both layouts (thinker-only by save_pretrained, v5 rope_parameters; the full qwen2_5_omni layout
written by hand: thinker.-prefixed keys, talker.* / token2wav.* keys to skip, v4 rope_scaling, two shards): logits and greedy
tokens; sample.py on real mp4s; bad checkpoints named; loading peak memory; LoRA SFT / GRPO steps; LoRA merge."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import sample
from avnano import lora
from avnano.media import load_clip, write_clip
from avnano.omni import OmniThinker, load_omni, save_omni
from avnano.omni_audio import audio_features
from avnano.tokenizer import Tokenizer
from tests.helpers import ROOT, one_error, run_in_process, run_script

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration  # noqa: E402

# the released template (Qwen2.5-Omni / AVoCaDO chat_template.jinja), default system prompt included
TEMPLATE = ("{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = "
            "namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
            "message['content'] %}{% if content['type'] == 'video' or 'video' in content %}<|vision_bos|><|VIDEO|>"
            "<|vision_eos|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>",
            "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"]
IDS = dict(audio_token_index=3, audio_start_token_id=4, audio_end_token_id=5, vision_start_token_id=6, vision_end_token_id=7,
           image_token_index=8, video_token_index=9)
VOCAB = 320


def thinker_config():
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]),
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
                          max_source_positions=1500, n_window=100), **IDS)


def write_tokenizer(path):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["Describe this video in detail.", "A red square moves left while a tone plays.", "You are a helpful assistant."]
    tok.train_from_iterator(texts * 20, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE}, f)
    with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:  # small frames: 56 x 56 .. 112 x 112
        json.dump({"min_pixels": 56 * 56, "max_pixels": 112 * 112}, f)


def write_full_layout(hf, thinker_dir, path, shards=2, extra=None):
    """The released qwen2_5_omni layout from a save_pretrained thinker: its keys with thinker. in front (+ talker /
    token2wav to skip), v4 rope_scaling, shards."""
    os.makedirs(path, exist_ok=True)
    state = {"thinker." + k: v for k, v in load_file(os.path.join(thinker_dir, "model.safetensors")).items()}
    state.update({"talker.model.layers.0.mlp.up_proj.weight": torch.zeros(3, 2), "token2wav.code_embedding.weight": torch.zeros(2, 2)})
    state.update(extra or {})
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: state[k] for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    thinker = hf.config.to_dict()
    text = thinker["text_config"]
    rope = text.pop("rope_parameters")  # v4 form: top-level rope_theta + rope_scaling with the sections
    text.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "default", "rope_type": "default",
                                                                "mrope_section": rope["mrope_section"]})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen2_5OmniForConditionalGeneration"], "model_type": "qwen2_5_omni",
                   "enable_audio_output": False, "thinker_config": thinker, "talker_config": {}, "token2wav_config": {}}, f)
    write_tokenizer(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(transformers thinker fp32, {"thinker": dir, "full": dir})."""
    tmp = tmp_path_factory.mktemp("omni")
    torch.manual_seed(0)
    hf = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config()).eval()
    with torch.no_grad():  # break the zero / one initialisations so every weight matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(str(tmp / "thinker"))
    write_tokenizer(str(tmp / "thinker"))
    write_full_layout(hf, str(tmp / "thinker"), str(tmp / "full"))
    return hf, {"thinker": str(tmp / "thinker"), "full": str(tmp / "full")}


def clip_inputs(seed=0, groups=3, h=4, w=6, seconds=2.7):
    """Pixel values of a video of `groups` temporal patches on an h x w patch grid, and 16 kHz audio of `seconds`."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(groups * h * w, 3 * 2 * 14 * 14, generator=g)
    wav = torch.randn(int(seconds * 16000), generator=g) * 0.1
    return (pixels, (groups, h, w), 1.0), audio_features(wav)  # 1 s per temporal patch (2 frames at 2 fps)


def hf_inputs(model, block, ids, video, mel, dtype):
    """transformers' inputs for the same token sequence: the video's pixels + grid, the audio's features (either may be
    None: a video without audio, an audio file)."""
    out = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
               use_audio_in_video=video is not None and mel is not None)
    if video is not None:
        out.update(pixel_values_videos=video[0].to(dtype), video_grid_thw=torch.tensor([video[1]]),
                   video_second_per_grid=torch.tensor([block.second_per_grid]))
    if mel is not None:
        out.update(input_features=mel[None].to(dtype), feature_attention_mask=torch.ones(1, mel.shape[-1], dtype=torch.long))
    return out


def our_sequence(model, block):
    prompt = model.render()[0]
    k = prompt.index(model.ids["video"])
    return prompt[:k - 1] + block.ids + prompt[k + 2:]


@pytest.mark.parametrize("layout, dtype, tol, streams", [("thinker", torch.float32, 1e-5, "av"), ("full", torch.float32, 1e-5, "av"),
                                                         ("thinker", torch.float64, 1e-10, "av"), ("full", torch.float64, 1e-10, "v"),
                                                         ("full", torch.float64, 1e-10, "a")])
def test_logits_match_transformers(ckpts, layout, dtype, tol, streams):
    """A ChatML prompt with a video and its audio (2.7 s: the last 2 s chunk is partial), the video alone, the audio alone."""
    hf, dirs = ckpts
    ref = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(dirs["thinker"], dtype=dtype, attn_implementation="sdpa").eval()
    model = load_omni(dirs[layout], dtype=dtype)
    assert model.dtype == dtype and not any(p.is_meta for p in model.parameters())
    video, mel = clip_inputs()
    video, mel = (video if "v" in streams else None), (mel if "a" in streams else None)
    block = model.encode([(video, mel)])[0]
    ids = our_sequence(model, block)
    # 2.7 s of audio: 67 tokens; 3 temporal patches x (4 x 6 patches / 2 x 2) = 18 merged video tokens
    assert ids.count(model.ids["audio"]) == 67 * ("a" in streams) and ids.count(model.ids["video"]) == 18 * ("v" in streams)
    with torch.no_grad():
        want = ref(**hf_inputs(model, block, ids, video, mel, dtype)).logits[0]
        h, x = model.hidden_states([block], [model.render()[0]])
        got = model.decoder.logits(h)[0]
    assert x.valid.sum() == len(ids)
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


def test_greedy_tokens_match_transformers(ckpts):
    hf, dirs = ckpts
    model = load_omni(dirs["full"])
    video, mel = clip_inputs(seed=1)
    block = model.encode([(video, mel)])[0]
    ids = our_sequence(model, block)
    want = hf.generate(**hf_inputs(model, block, ids, video, mel, torch.float32), max_new_tokens=24, do_sample=False)[0, len(ids):]
    assert not set(want[:20].tolist()) & set(model.tok.eos_ids), "the random model ends early: pick another seed"
    _, got = model.generate(None, None, None, blocks=[block], return_ids=True, max_new_tokens=24)
    n = next((i + 1 for i, t in enumerate(want.tolist()) if t in model.tok.eos_ids), 24)
    assert got[0, :n].tolist() == want[:n].tolist() and n >= 20
    other = model.encode([clip_inputs(seed=3, groups=2, h=6, w=4, seconds=1.1)])[0]  # shorter: left-padded in a batch
    _, both = model.generate(None, None, None, blocks=[other, block], return_ids=True, max_new_tokens=24)
    _, alone = model.generate(None, None, None, blocks=[other], return_ids=True, max_new_tokens=24)
    assert both[1, :n].tolist() == want[:n].tolist() and both[0, :alone.shape[1]].tolist() == alone[0].tolist()


def test_lora_merge_and_save_roundtrip(ckpts, tmp_path):
    """A LoRA-tuned thinker: merged == unmerged (float64), and save_omni -> load_omni gives the same logits."""
    _, dirs = ckpts
    model = load_omni(dirs["thinker"], dtype=torch.float64)
    model.cfg.lora_r, model.cfg.lora_alpha = 4, 8.0
    lora.inject(model.decoder, model.cfg.lora_targets, 4, 8.0)
    torch.manual_seed(1)
    for m in lora.adapters(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)
        m.double()
    video, mel = clip_inputs(seed=2, groups=2, seconds=1.3)
    with torch.no_grad():
        block = model.encode([(video, mel)])[0]
        logits = lambda: model.decoder.logits(model.hidden_states([block], [model.render("A red square.")[0]])[0])
        unmerged = logits()
        save_omni(model, str(tmp_path / "tuned"))
        for m in lora.adapters(model):
            m.merge()
        merged = logits()
        with lora.disabled(model):
            base = logits()
        again = load_omni(str(tmp_path / "tuned"), dtype=torch.float64)
        for m in lora.adapters(again):
            m.double()
        reloaded = again.decoder.logits(again.hidden_states([block], [again.render("A red square.")[0]])[0])
    assert (base - unmerged).abs().max() > 1e-3  # the adapter matters
    assert (merged - unmerged).abs().max() < 1e-10
    assert again.cfg.lora_r == 4 and len(lora.adapters(again)) == len(lora.adapters(model))
    assert (reloaded - unmerged).abs().max() < 1e-10


def tone(seconds, rate=16000, channels=1, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (freq + 110 * c) * t) for c in range(channels)]).astype(np.float32)


def frames(n, h=64, w=80, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, :, :, rng.integers(3)] = 40
        out[i, 8:30, 4 + 4 * i:26 + 4 * i] = (200, 30, 30)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("omni_media")
    paths = {"aac": str(tmp / "aac.mp4"), "silent": str(tmp / "silent.mp4"), "surround": str(tmp / "surround.mp4")}
    write_clip(paths["aac"], frames(30), fps=10, audio=tone(3.0))
    write_clip(paths["silent"], frames(30, seed=1), fps=10)
    write_clip(paths["surround"], frames(25, seed=2), fps=10, audio=tone(2.5, 48000, 6), sample_rate=48000)
    return paths


@pytest.mark.parametrize("name, audio_tokens", [("aac", 75), ("silent", 0), ("surround", 62)])
def test_sample_captions_a_real_mp4(ckpts, videos, monkeypatch, capsys, name, audio_tokens):
    """sample.py --ckpt OMNI_DIR --video FILE prints the library's caption; the audio stream (mono AAC 16 kHz, none,
    5.1 AAC 48 kHz) gives 25 tokens / s or none at all."""
    _, dirs = ckpts
    out, err = run_in_process(monkeypatch, capsys, sample.main, "--ckpt", dirs["full"], "--video", videos[name],
                              "--device", "cpu", "--max-new-tokens", "12")
    model = load_omni(dirs["full"])
    clip = load_clip(videos[name], size=None, frame_indices=model.frame_indices)
    wav = clip.audio if clip.has_audio else clip.audio[:0]
    block = model.av_block([clip.frames], [clip.frame_times], [wav])[0][0]
    # 30 frames at 10 fps -> 6 frames, 25 -> 4 (an even count): 3 or 2 temporal patches of 64 x 80 -> 56 x 84 px = 4 x 6 patches
    assert block.ids.count(model.ids["audio"]) == audio_tokens and block.grid == [(2 if name == "surround" else 3, 4, 6)]
    assert (block.ids[:2] == [model.ids["vbos"], model.ids["abos"]]) == (audio_tokens > 0)
    text = model.generate(None, None, None, blocks=[block], max_new_tokens=12)[0]
    assert out == (text if text.strip() else "(empty caption: the model ended at once; an undertrained checkpoint does this)") + "\n"
    assert err == ([f"note: {videos[name]} has no audio; captioning from the frames alone"] if name == "silent" else [])


def test_frames_are_qwen_omni_utils_sample(ckpts, tmp_path):
    """The thinker's frames (sample.py's load_clip and the training ClipStore): qwen-omni-utils' rule over the decoded
    stream's frame indices; the seconds per temporal patch as transformers' processor derives them."""
    import pickle
    from avnano.data import ClipStore
    from avnano.media import MediaError
    total = 80  # 3.2 s at 25 fps; frame k shows k in binary: 7 bands of 8 px, black (0) or white (1)
    bits = (np.arange(total)[:, None] >> np.arange(7)) & 1
    video = np.ascontiguousarray(np.broadcast_to(np.repeat(bits * 255, 8, 1).astype(np.uint8)[:, None, :, None], (total, 32, 56, 3)))
    path = str(tmp_path / "count.mp4")
    write_clip(path, video, fps=25)
    index = lambda f: ((f[:, 16, 4::8, 0].numpy() > 127) @ (1 << np.arange(7))).tolist()
    seen = []
    every = load_clip(path, size=None, frame_indices=lambda n, rate: seen.append((n, rate)) or range(n))
    assert seen == [(total, 25.0)] and index(every.frames) == list(range(total))  # what the codec kept: every index
    model = load_omni(ckpts[1]["thinker"])
    # n = 80 / 25 * 2 = 6.4, within [4, 80], floored to an even 6; round(linspace(0, 79, 6)) = round(0, 15.8, 31.6, 47.4, 63.2, 79)
    clip = load_clip(path, size=None, frame_indices=model.frame_indices)
    assert index(clip.frames) == [0, 16, 32, 47, 63, 79]
    assert torch.allclose(clip.frame_times, torch.tensor([0, 16, 32, 47, 63, 79]) / 25)
    store = ClipStore([{"path": path}], model.cfg.fps, model.cfg.max_frames, model.cfg.vit.image_size,
                      frame_indices=pickle.loads(pickle.dumps(model.frame_indices)))  # as the data workers get it
    assert torch.equal(store.get(0)[0], clip.frames)
    # transformers' Qwen2_5OmniProcessor: second_per_grid = temporal_patch_size / its fps argument (2.0 when not given,
    # as in AVoCaDO's script) = 1.0, not 2 / the sampled rate (6 / 80 * 25 = 1.875 fps)
    pixels, grid, second_per_grid = model.preprocess(clip.frames, clip.audio)[0]
    assert grid[0] == 3 and second_per_grid == 1.0
    model.cfg.max_frames = 4  # the cap (qwen-omni-utils' max_frames): round(linspace(0, 79, 4)) = round(0, 26.3, 52.7, 79)
    clip = load_clip(path, size=None, frame_indices=model.frame_indices)
    assert index(clip.frames) == [0, 26, 53, 79] and model.preprocess(clip.frames, clip.audio)[0][2] == 1.0
    write_clip(one := str(tmp_path / "one.mp4"), video[:1], fps=25)
    with pytest.raises(MediaError, match="too short"):
        load_clip(one, size=None, frame_indices=model.frame_indices)


def test_bad_checkpoints_are_named(ckpts, videos, monkeypatch, capsys, tmp_path):
    """A missing shard, a wrong shape, a pickle: sample.py stops with one line naming the file and the problem."""
    import shutil
    _, dirs = ckpts
    refuse = lambda d: one_error(run_in_process(monkeypatch, capsys, sample.main, "--ckpt", d, "--video", videos["aac"],
                                                "--device", "cpu", status=2)[1])
    cut = str(tmp_path / "cut")
    shutil.copytree(dirs["full"], cut)
    os.remove(os.path.join(cut, "model-00002-of-00002.safetensors"))
    assert refuse(cut) == f"error: {cut}/model-00002-of-00002.safetensors: missing shard (listed in model.safetensors.index.json)"
    bent = str(tmp_path / "bent")
    shutil.copytree(dirs["thinker"], bent)
    state = load_file(os.path.join(bent, "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 60)
    del state["visual.merger.ln_q.weight"]
    state["visual.merger.extra.weight"] = torch.zeros(2)
    save_file(state, os.path.join(bent, "model.safetensors"))
    assert refuse(bent) == (f"error: {bent}: cannot load weights: missing key visual.merger.ln_q.weight unexpected key "
                            "visual.merger.extra.weight wrong shape for model.layers.1.mlp.up_proj.weight: file has "
                            "(128, 60), model expects (128, 64)")
    pickled = str(tmp_path / "pickled")
    shutil.copytree(dirs["thinker"], pickled)
    os.remove(os.path.join(pickled, "model.safetensors"))
    torch.save({"lm_head.weight": torch.zeros(2)}, os.path.join(pickled, "pytorch_model.bin"))
    assert refuse(pickled).startswith(f"error: {pickled}: only pickle weights found (pytorch_model.bin). avnano reads "
                                      "safetensors only")
    torch.save({"lm_head.weight": torch.zeros(2)}, os.path.join(pickled, "model.safetensors"))  # a pickle by another name
    assert refuse(pickled).startswith(f"error: {pickled}/model.safetensors: a pickle file, not safetensors.")


PEAK = """
import sys, torch
from avnano.omni import load_omni
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
with torch.device("meta"):  # torch imports its meta kernels on first use (~75 MB of Python, whatever the model size)
    torch.nn.init.kaiming_uniform_(torch.empty(2, 2)), torch.nn.init.normal_(torch.empty(2, 2))
base = status("VmRSS:")
model = load_omni(sys.argv[1])
print(base, status("VmHWM:"), sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_loading_peak_memory(ckpts, tmp_path):
    """A ~300 MB float32 thinker in two shards loads with a peak of the model plus a little (one tensor at a time),
    not two copies: the process's high-water mark (VmHWM) over its size before loading."""
    from avnano.omni_load import keymap, omni_config, params_on_meta
    _, dirs = ckpts
    big = tmp_path / "big"
    big.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        (big / f).write_bytes(open(os.path.join(dirs["thinker"], f), "rb").read())
    config = json.load(open(os.path.join(dirs["thinker"], "config.json")))
    config["text_config"].update(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                 num_key_value_heads=4, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                             mrope_section=[8, 12, 12]))
    config["vision_config"]["out_hidden_size"] = config["audio_config"]["output_dim"] = 1024
    (big / "config.json").write_text(json.dumps(config))
    cfg, _ = omni_config(str(big))
    with params_on_meta():
        model = OmniThinker(cfg, Tokenizer.from_file(str(big)))
    shapes = {hf: tuple(dict(model.named_parameters())[ours].shape) for hf, ours in keymap(model, "").items()}
    keys, weight_map = sorted(shapes), {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: torch.full(shapes[k], 0.01) for k in keys[s::2]}, str(big / name))
        weight_map.update({k: name for k in keys[s::2]})
    (big / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = subprocess.run([sys.executable, "-c", PEAK, str(big)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak, size = map(int, out.stdout.split())
    largest = max(np.prod(s) for s in shapes.values()) * 4
    print(f"model {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, peak over baseline {(peak - base) / 1e6:.0f} MB")
    assert size > 280e6 and peak - base < 1.1 * size, (base, peak, size)  # two copies would be 2x


def test_lora_sft_and_grpo_steps(ckpts, tmp_path):
    """train_sft.py and train_grpo.py --init OMNI_DIR --lora-r 4: 2 LoRA steps each on a manifest of real mp4s (decoded at
    the processor's 2 fps and the source size); the saved LoRA-tuned thinker captions again with sample.py."""
    _, dirs = ckpts
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(6):
        write_clip(str(data / f"c{i}.mp4"), frames(20, seed=i), fps=10, audio=tone(2.0, freq=300.0 + 60 * i))
        rows.append({"video": f"c{i}.mp4", "caption": f"A red square moves at {i} seconds.", "checklist": ["a red square"]})
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    common = ["--data", data, "--device", "cpu", "--batch-size", "2", "--eval-n", "2", "--lora-r", "4"]
    sft = run_script("train_sft.py", "--init", dirs["full"], "--stage", "sft", "--steps", "2", "--warmup", "1",
                     "--out", tmp_path / "sft", *common, timeout=300)
    steps = [l for l in sft.stdout.splitlines() if l.startswith("step=")]
    assert len(steps) == 2 and "trainable" in sft.stdout, sft.stdout[-2000:]
    saved = json.load(open(tmp_path / "sft" / "config.json"))
    assert saved["model_type"] == "qwen2_5_omni_thinker" and saved["avnano"]["lora_r"] == 4
    # R_L with a 1-word budget: sampled captions of different lengths get different rewards, so the LoRA gets a gradient
    grpo = run_script("train_grpo.py", "--init", tmp_path / "sft", "--steps", "2", "--samples", "4", "--max-new-tokens", "8",
                      "--max-words", "1",
                      "--out", tmp_path / "grpo", *common, timeout=300)
    grpo_steps = [l for l in grpo.stdout.splitlines() if l.startswith("step=")]
    assert len(grpo_steps) == 2 and max(float(l.split("grad_norm=")[1].split()[0]) for l in grpo_steps) > 0, grpo.stdout[-2000:]
    print("\n".join(l for l in (sft.stdout + grpo.stdout).splitlines() if l.startswith("step=")))
    out = run_script("sample.py", "--ckpt", tmp_path / "grpo", "--video", data / "c0.mp4", "--device", "cpu",
                     "--max-new-tokens", "6")
    assert out.stdout.strip(), out.stderr


def test_prompt_is_the_processors(ckpts):
    """The token sequence equals the reference's: the chat template rendered by jinja2 (default system prompt included,
    as apply_chat_template does), with <|VIDEO|> replaced by Qwen2_5OmniProcessor.replace_video_with_audio_token's text
    (run unbound on a stand-in: the real processor needs torchvision), for a 2.7 s clip with 3 temporal patches."""
    import types
    jinja2 = pytest.importorskip("jinja2")
    from transformers import Qwen2_5OmniProcessor
    _, dirs = ckpts
    model = load_omni(dirs["thinker"])
    video, mel = clip_inputs()
    block = model.encode([(video, mel)])[0]
    text = jinja2.Environment().from_string(TEMPLATE).render(add_generation_prompt=True, messages=[{"role": "user", "content": [
        {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": model.cfg.prompt}]}])
    stand_in = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2), audio_bos_token="<|audio_bos|>",
                                     audio_eos_token="<|audio_eos|>", video_token="<|VIDEO|>", audio_token="<|AUDIO|>")
    stand_in.get_chunked_index = types.MethodType(Qwen2_5OmniProcessor.get_chunked_index, stand_in)
    av = Qwen2_5OmniProcessor.replace_video_with_audio_token(
        stand_in, {"video_grid_thw": np.array([video[1]]), "video_second_per_grid": [block.second_per_grid]}, 0,
        {"num_audio_tokens": [67]}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
    assert "You are a helpful assistant." in text
    assert model.tok.encode(text.replace("<|VIDEO|>", av)) == our_sequence(model, block)


def test_thinker_sft_trains_float32_masters_and_refuses_avnano_losses(ckpts):
    """train_sft --init OMNI_DIR: a thinker loaded in bfloat16 (as on CUDA) and set to the sft stage trains float32
    master weights (its frozen weights stay bfloat16); --ground-weight / --word-swap / --ot-weight are refused by name."""
    import argparse
    from avnano.errors import InputError
    from avnano.training import model_args, released_omni
    from train_sft import STAGES
    _, dirs = ckpts
    p = argparse.ArgumentParser()
    model_args(p, architecture=True)
    for flag in (["--ground-weight", "0.5"], ["--word-swap", "0.1"], ["--ot-weight", "0.1"]):
        with pytest.raises(InputError, match=flag[0]):
            released_omni(load_omni(dirs["thinker"]), p.parse_args(["--init", dirs["thinker"], *flag]), p)
    for lora_r, stage in ((4, {"aligners", "lora"}), (0, {"aligners", "decoder"})):  # train_sft's sft with and without LoRA
        model = released_omni(load_omni(dirs["thinker"], dtype=torch.bfloat16),
                              p.parse_args(["--init", dirs["thinker"], "--lora-r", str(lora_r)]), p)
        model.set_trainable(STAGES["sft"] if lora_r else stage)
        trained = {n: q.dtype for n, q in model.named_parameters() if q.requires_grad}
        assert trained and set(trained.values()) == {torch.float32}, trained
        assert "visual.merger.mlp.0.weight" in trained and any(("lora_" in n) == bool(lora_r) for n in trained)
        assert model.visual.blocks[0].attn.q.weight.dtype == torch.bfloat16  # frozen: stays bfloat16
        video, mel = clip_inputs(seconds=1.3)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the mixed model runs as train_sft runs it on CUDA
            block = model.encode([(video, mel)])[0]
            ids, mask = model.render("A red square.")
            h, x = model.hidden_states([block], [ids], [mask])
            loss = torch.nn.functional.cross_entropy(model.decoder.logits(h[0][x.labels[0] != -100]).float(),
                                                     x.labels[0][x.labels[0] != -100])
        loss.backward()
        assert all(q.grad is not None and q.grad.dtype == torch.float32 for q in model.parameters() if q.requires_grad)


def test_preprocess_resizes_with_the_cpu_uint8_kernel_for_frames_on_any_device(ckpts):
    """Frames that a loader moved to an accelerator get the same uint8 resize as the CPU frames sample.py reads (the
    float32 path torchvision takes on a GPU differs by a few levels on these frames): training sees what sampling sees."""
    import torch.nn.functional as F
    from avnano import omni_video
    _, dirs = ckpts
    model = load_omni(dirs["thinker"])
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 50, 70, 3), dtype=torch.uint8, generator=g)  # resized to 56 x 56
    wav = torch.randn(16000, generator=g) * 0.1
    x = frames.permute(0, 3, 1, 2).contiguous()
    uint8 = F.interpolate(x, size=(56, 56), mode="bicubic", antialias=True, align_corners=False)
    floats = F.interpolate(x.float(), size=(56, 56), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255).round()
    assert (floats - uint8.float()).abs().max() >= 1  # the two paths do differ here
    (want, grid, _), mel = model.preprocess(frames.numpy(), wav.numpy())
    assert grid == (2, 4, 4) and torch.equal(want, omni_video.patchify(omni_video.normalise(uint8))[0])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
    for device in devices:
        (got, _, _), got_mel = model.preprocess(frames.to(device), wav.to(device))
        assert got.device.type == "cpu" and torch.equal(got, want) and torch.equal(got_mel, mel), device


def test_omni_flops_by_hand(ckpts):
    """avnano/omni_flops.py against a count by hand from the tiny config (thinker_config): one clip of 4 frames at
    56 x 224 (2 temporal patches of a 4 x 16 grid) and 1.5 s of audio, trained as train_sft's sft stage with a LoRA."""
    from avnano.omni_audio import audio_token_count
    from avnano.omni_flops import OmniFlopCounter
    from avnano.training import add_lora
    _, dirs = ckpts
    model = load_omni(dirs["thinker"])
    add_lora(model, 4, 8.0)
    model.set_trainable({"aligners", "lora"})
    frames, wav = torch.zeros(4, 56, 224, 3, dtype=torch.uint8), torch.full((24000,), 0.1)
    ids, mask = model.render("A red square.")
    # vision: patches 2 x 4 x 16 = 128, 32 merged tokens; windows of 112 / 14 = 8 patches: two 4 x 8 windows a group
    P, merged = 128, 32
    patch = 32 * 3 * 2 * 14 * 14                  # Conv3d, frozen: 2N
    vblock = 4 * 32 * 32 + 3 * 32 * 64            # q, k, v, proj + gate, up, down
    vpairs = 2 * (2 * 32 ** 2 + 64 ** 2)          # 2 groups x (window block: 2 windows of 32; full block: 64)
    merger = 128 * 128 + 128 * 64                 # trained, gradient at its input by flops.py's rule: 6N
    vision = 2 * patch * P + 2 * 2 * vblock * P + 4 * 32 * vpairs + 6 * merger * merged
    # audio: 150 mel frames -> 75 after the stride-2 conv (one 100-token chunk) -> 37 after pooling
    T, stem, n = 150, 75, 37
    assert audio_token_count(T) == n
    conv1, conv2, ablock, proj = 32 * 128 * 3, 32 * 32 * 3, 4 * 32 * 32 + 2 * 32 * 64, 32 * 64
    audio = 2 * conv1 * T + 2 * conv2 * stem + 2 * 2 * ablock * stem + 4 * 32 * 2 * stem ** 2 + 6 * proj * n
    # decoder: the 3 tag ids become vbos abos [32 video + 37 audio] aeos veos; frozen blocks with gradients passing (4N)
    # and their LoRA (r (in + out) per matrix, trained: 6N); causal attention pairs; the frozen head on the labels
    L = len(ids) - 3 + 4 + merged + n
    dblock, lora_ = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), 2 * 4 * (128 + 96 + 96 + 128 + 3 * 192)
    decoder = 4 * dblock * L + 6 * lora_ * L + 2 * 4 * 64 * (L * (L + 1) // 2) * 3 + 4 * 320 * 64 * sum(mask)
    counter = OmniFlopCounter(model)
    assert counter.clip(frames, len(wav), len(ids), sum(mask)) == vision + audio + decoder
    assert counter.batch([(None, frames, None, wav)], [ids], [mask]) == vision + audio + decoder
    assert counter.batch([(None, frames, None, torch.zeros(24000))], [ids], [mask]) < vision + audio + decoder  # silence: no audio
