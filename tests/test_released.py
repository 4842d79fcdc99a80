"""Released towers: chat templates as transformers renders them, the 'released' preset from three checkpoints, and
train_sft.py --vit/--audio/--llm (align, then --init sft with a LoRA, --resume, a manifest without events) on tiny
released-format SigLIP, Whisper and Qwen2 checkpoints, then sample.py (tests needing transformers skip without it)."""
import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

import sample
from avnano import masks, training
from avnano.checkpoint import load_model, released_captioner
from avnano.errors import InputError
from avnano.grpo import up_to_eos
from avnano.layout import assemble
from avnano.media import load_clip
from avnano.tokenizer import Tokenizer
from avnano.weights import audio_keymap, decoder_keymap, read_safetensors, vit_keymap
from tests.helpers import assert_prints_caption, run_in_process, run_script
from tests.test_model import CAPTIONS, batch, training_batch

# Qwen2-*-Instruct's template (tokenizer_config.json); SmolLM2's; a Llama-3 style one avnano does not render
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are "
         "a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
         "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SMOLLM2 = QWEN2.replace("You are a helpful assistant.", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
          "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
ALIGNERS = ("visual_aligner.", "audio_aligner.", "segment_embed.", "time_embed.")


def llm_tokenizer(folder, captions, template=QWEN2, jinja=False):
    """A byte-level BPE saved as a base Qwen2.5 tokenizer would be: eos <|endoftext|>, the template in
    tokenizer_config.json (or in chat_template.jinja)."""
    tok = Tokenizer.train(captions + ["Describe the clip."], vocab_size=300)
    tok.save(str(folder))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if jinja:
        (folder / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_file(str(folder))


@pytest.mark.parametrize("template,jinja", [(QWEN2, False), (SMOLLM2, True)], ids=["qwen2-config", "smollm2-jinja"])
def test_chatml_template_renders_as_transformers(tmp_path, template, jinja):
    transformers = pytest.importorskip("transformers")
    ours = llm_tokenizer(tmp_path, ["a knock at 2.0 s."], template, jinja)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    user = [{"role": "user", "content": "<|av|>\nDescribe the clip."}]
    want = hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>system\nYou are a helpful" in want  # the default system prompt is there to match
    ids, mask = ours.render(user)
    assert ours.decode(ids, skip_special=False) == want and sum(mask) == 0
    assert ids == hf(want, add_special_tokens=False)["input_ids"]
    ids, mask = ours.render(user, completion="a knock at 2.0 s.")
    full = hf.apply_chat_template(user + [{"role": "assistant", "content": "a knock at 2.0 s."}], tokenize=False)
    assert ours.decode(ids, skip_special=False) + "\n" == full  # ours stops at <|im_end|>, the turn's newline is not trained
    assert ours.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "a knock at 2.0 s.<|im_end|>"
    assert ours.token_id("<|im_end|>") in ours.eos_ids and ours.token_id("<|endoftext|>") in ours.eos_ids
    again_dir = tmp_path / "again"
    ours.save(str(again_dir))  # a checkpoint keeps the template
    assert Tokenizer.from_file(str(again_dir)).render(user, "x") == ours.render(user, "x")


def test_non_chatml_template_is_refused_naming_the_file(tmp_path):
    tok = llm_tokenizer(tmp_path, ["a knock."], LLAMA3)
    with pytest.raises(InputError, match="tokenizer_config.json.*not ChatML"):
        tok.render([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny released-format towers (SiglipVisionModel, WhisperForConditionalGeneration, Qwen2ForCausalLM with
    a ChatML tokenizer) and a tiny toy world. Every weight gets a little noise: no two tensors of a kind are equal
    (fresh norms are all ones, biases all zeros), so a swapped key mapping shows in the values."""
    transformers = pytest.importorskip("transformers")
    from avnano import toyworld

    def save(model, folder):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(folder)
    root = tmp_path_factory.mktemp("released")
    toyworld.build(str(root / "world"), 8, 2, seed=1, workers=1, progress=False)
    captions = [json.loads(line)["caption"] for line in open(root / "world" / "train.jsonl")]
    torch.manual_seed(0)
    save(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)), root / "vit")
    save(transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=100, vocab_size=100, num_mel_bins=80,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)), root / "whisper")
    (root / "llm").mkdir()
    tok = llm_tokenizer(root / "llm", captions)
    save(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
        eos_token_id=0)), root / "llm")
    return root


def run(*args):
    return run_script("train_sft.py", *args).stdout


TINY = ("--batch-size", 2, "--eval-n", 2, "--save-every", 1000, "--warmup", 1, "--lr", 1e-2, "--device", "cpu", "--no-cache")


def released_tensors(root):
    """Our parameter name -> the released tensor it was loaded from, through weights.py's key maps."""
    from avnano.weights import audio_config_from_hf, decoder_config_from_hf, read_config, vit_config_from_hf
    vit_cfg, out = vit_config_from_hf(read_config(str(root / "vit"))), {}
    for tower, folder, keymap in (("vit", "vit", vit_keymap(vit_cfg, "")),
                                  ("audio", "whisper", audio_keymap(audio_config_from_hf(read_config(str(root / "whisper"))))),
                                  ("decoder", "llm", decoder_keymap(decoder_config_from_hf(read_config(str(root / "llm")))))):
        state = read_safetensors(str(root / folder))
        out.update({f"{tower}.{ours}": state[hf] for hf, ours in keymap.items()})
    return out


def test_train_sft_from_released_towers(released, tmp_path, monkeypatch, capsys):
    world, towers = released / "world", ("--vit", released / "vit", "--audio", released / "whisper", "--llm", released / "llm")
    align = tmp_path / "align"
    log = run(*towers, "--data", world, "--stage", "align", "--steps", 2, "--out", align, *TINY)
    assert "step=2 " in log and "held-out:" in log
    saved, ref = load_file(align / "model.safetensors"), released_tensors(released)
    towers_keys = {k for k in saved if not k.startswith(ALIGNERS)}
    assert towers_keys == set(ref)  # every tower parameter is one of the released tensors, and nothing else
    for k in ref:
        assert torch.equal(saved[k], ref[k]), f"{k} changed in the align stage"
    # a few pairs written out by hand, not through weights.py's key maps: a swapped mapping fails here too
    llm, vit, whisper = (read_safetensors(str(released / d)) for d in ("llm", "vit", "whisper"))
    by_hand = {"decoder.embed.weight": llm["model.embed_tokens.weight"],
               "decoder.blocks.0.attn.q_proj.weight": llm["model.layers.0.self_attn.q_proj.weight"],
               "decoder.blocks.1.attn.k_proj.weight": llm["model.layers.1.self_attn.k_proj.weight"],
               "decoder.blocks.1.attn.v_proj.weight": llm["model.layers.1.self_attn.v_proj.weight"],
               "decoder.blocks.0.attn.k_proj.bias": llm["model.layers.0.self_attn.k_proj.bias"],
               "decoder.blocks.0.attn.o_proj.weight": llm["model.layers.0.self_attn.o_proj.weight"],
               "decoder.blocks.1.attn_norm.weight": llm["model.layers.1.input_layernorm.weight"],
               "decoder.blocks.1.mlp_norm.weight": llm["model.layers.1.post_attention_layernorm.weight"],
               "decoder.blocks.0.mlp.gate_proj.weight": llm["model.layers.0.mlp.gate_proj.weight"],
               "decoder.blocks.0.mlp.up_proj.weight": llm["model.layers.0.mlp.up_proj.weight"],
               "decoder.norm.weight": llm["model.norm.weight"],
               "vit.patch_embed.weight": vit["embeddings.patch_embedding.weight"],
               "vit.pos_embed": vit["embeddings.position_embedding.weight"],
               "vit.blocks.1.attn.q_proj.weight": vit["encoder.layers.1.self_attn.q_proj.weight"],
               "vit.blocks.1.attn.k_proj.bias": vit["encoder.layers.1.self_attn.k_proj.bias"],
               "vit.blocks.0.norm1.weight": vit["encoder.layers.0.layer_norm1.weight"],
               "vit.blocks.0.norm2.bias": vit["encoder.layers.0.layer_norm2.bias"],
               "vit.blocks.0.fc1.weight": vit["encoder.layers.0.mlp.fc1.weight"],
               "vit.post_norm.weight": vit["post_layernorm.weight"],
               "vit.head.probe": vit["head.probe"],
               "audio.conv1.weight": whisper["model.encoder.conv1.weight"],
               "audio.conv2.bias": whisper["model.encoder.conv2.bias"],
               "audio.pos_embed": whisper["model.encoder.embed_positions.weight"],
               "audio.blocks.0.attn.v_proj.weight": whisper["model.encoder.layers.0.self_attn.v_proj.weight"],
               "audio.blocks.1.attn.out_proj.bias": whisper["model.encoder.layers.1.self_attn.out_proj.bias"],
               "audio.blocks.1.norm1.weight": whisper["model.encoder.layers.1.self_attn_layer_norm.weight"],
               "audio.blocks.1.norm2.weight": whisper["model.encoder.layers.1.final_layer_norm.weight"],
               "audio.blocks.0.fc2.weight": whisper["model.encoder.layers.0.fc2.weight"],
               "audio.norm.bias": whisper["model.encoder.layer_norm.bias"]}
    for ours, theirs in by_hand.items():
        assert torch.equal(saved[ours], theirs), ours
    # the aligners the script started from: build_model with the same flags and seed
    p = argparse.ArgumentParser()
    training.model_args(p, architecture=True)
    training.opt_args(p)
    args = p.parse_args([str(a) for a in towers])
    fresh = training.build_model(args, [], p).state_dict()
    moved = [k for k in saved if k.startswith(("visual_aligner.", "audio_aligner.")) and not torch.equal(saved[k], fresh[k])]
    assert len(moved) == len([k for k in saved if k.startswith(("visual_aligner.", "audio_aligner."))]) > 4
    cfg = json.loads((align / "config.json").read_text())["avnano"]
    assert cfg["vit"]["merge"] == 2 and cfg["audio"]["exact"] and cfg["decoder"]["qkv_bias"]
    assert "You are a helpful assistant." in json.loads((align / "tokenizer_config.json").read_text())["chat_template"]

    # sft from the align checkpoint with a LoRA, on a user's manifest without events (grounding off by itself)
    plain = tmp_path / "plain"
    plain.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(world / f"{split}.jsonl")]
        rows = [{"video": str(world / r["video"]), "caption": r["caption"]} for r in rows]
        (plain / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = tmp_path / "sft"
    log = run("--init", align, "--data", plain, "--stage", "sft", "--lora-r", 4, "--steps", 2, "--out", sft,
              "--grad-checkpointing", "--grad-accum", 2, *TINY)
    assert "step=2 " in log and " ground=0.0000 " in log
    assert "held-out: heldout_ce=" in log  # a manifest without events is evaluated by its cross-entropy
    after = load_file(sft / "model.safetensors")
    lora = {k for k in after if "lora_" in k}
    assert lora and set(after) - lora == set(saved)
    assert any(after[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # B starts at zero
    for k in saved:
        if not k.startswith(ALIGNERS):
            assert torch.equal(after[k], saved[k]), f"{k} changed in the sft stage"
        elif k.startswith(("visual_aligner.", "audio_aligner.")):
            assert not torch.equal(after[k], saved[k]), f"{k} did not train in the sft stage"

    log = run("--resume", "--data", plain, "--stage", "sft", "--steps", 3, "--out", sft, *TINY[:2], "--eval-n", 0, *TINY[4:])
    assert "resumed from" in log and "at step 2" in log and "step=3 " in log
    assert json.loads((sft / "train_state.json").read_text())["step"] == 3

    # sample.py prints the caption the trained model gives the decoded clip
    clip = str(world / json.loads(open(world / "test.jsonl").readline())["video"])
    out, _ = run_in_process(monkeypatch, capsys, sample.main, "--ckpt", sft, "--video", clip, "--max-new-tokens", 8,
                            "--device", "cpu")
    model = load_model(str(sft))
    cfg = model.cfg
    c = load_clip(clip, cfg.fps, cfg.max_frames, (cfg.vit.image_size, cfg.vit.image_size))
    assert_prints_caption(out, model.generate([c.frames], [c.frame_times], [c.audio], max_new_tokens=8)[0])


def test_released_flags_are_all_or_none_and_init_keeps_its_towers(released):
    p = argparse.ArgumentParser()
    training.model_args(p, architecture=True)
    training.opt_args(p)
    vit, audio, llm = (str(released / d) for d in ("vit", "whisper", "llm"))
    with pytest.raises(InputError, match="--audio missing"):
        training.build_model(p.parse_args(["--vit", vit, "--llm", llm]), [], p)
    with pytest.raises(InputError, match="merge 3 does not divide the 4 x 4 patch grid"):
        training.build_model(p.parse_args(["--vit", vit, "--audio", audio, "--llm", llm, "--merge", "3"]), [], p)
    with pytest.raises(InputError, match="cannot also load --vit"):
        training.build_model(p.parse_args(["--init", "out/x", "--vit", vit, "--audio", audio, "--llm", llm]), [], p)
    args = p.parse_args(["--vit", vit, "--audio", audio, "--llm", llm, "--merge", "4", "--lora-r", "2"])
    model = training.build_model(args, [], p)
    assert model.cfg.vit.tokens_per_frame == 1 and model.cfg.lora_r == 2 and any("lora_" in k for k in model.state_dict())


def test_released_preset_from_three_checkpoints(released):
    model = released_captioner(*(str(released / d) for d in ("vit", "whisper", "llm"))).eval()
    assert model.cfg.audio.exact and model.cfg.vit.family == "siglip" and model.cfg.decoder.qkv_bias
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in released_tensors(released).items())  # the towers hold the released tensors
    assert model.tok.chat and model.tok.decode(model.completion_ids(CAPTIONS[0]), skip_special=False) == CAPTIONS[0] + "<|im_end|>"
    out = model(*training_batch(model))
    assert torch.isfinite(out["loss"]) and out["n_tokens"] > 0
    frames, times, audio = batch()
    with torch.no_grad():
        texts, ids = model.generate(frames, times, audio, max_new_tokens=5, return_ids=True)
        # greedy with the KV cache: each token is the top logit of a full forward over the prompt and the tokens before it
        blocks, prompt = model.av_block(frames, times, audio)[0], model.render()[0]
        x = assemble(model, blocks, [prompt + row for row in ids.tolist()], [[0] * len(prompt) + [1] * ids.shape[1]] * len(ids))
        h = model.decoder(inputs_embeds=x.embeds, positions=x.positions, mask=masks.for_sdpa(
            masks.av_prefix(x.is_av) & masks.key_padding(x.valid)), return_hidden=True)
        logits = model.decoder.logits(h[x.labels != -100]).float().view(*ids.shape, -1)
    chosen = logits.gather(-1, ids[..., None])[..., 0]
    lengths = torch.tensor([len(c) for c in up_to_eos(ids.tolist(), model.tok.eos_ids)])
    real = torch.arange(ids.shape[1]) < lengths[:, None]  # up to and including the end token
    assert ids.shape[0] == 2 and real.sum() > 0
    assert (chosen >= logits.amax(-1) - 1e-4)[real].all()
    assert texts == [model.tok.decode([t for t, r in zip(row, m) if r and t not in model.tok.eos_ids])
                     for row, m in zip(ids.tolist(), real.tolist())]
