"""Released towers from the command line: chat templates as transformers renders them, gradient checkpointing
(same numbers, fewer saved activations), and train_sft.py --vit/--audio/--llm (align, then --init sft with a LoRA,
--resume, a manifest without events) on tiny released-format SigLIP, Whisper and Qwen2 checkpoints, then sample.py."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from avnano import training
from avnano.errors import InputError
from avnano.model import AVCaptioner, preset
from avnano.tokenizer import Tokenizer
from avnano.weights import audio_keymap, decoder_keymap, read_safetensors, vit_keymap

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_grad_checkpointing_same_loss_and_grads_fewer_saved_activations(monkeypatch):
    from avnano import transformer
    from tests.test_model import tiny, training_batch
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


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny released-format towers (SiglipVisionModel, WhisperForConditionalGeneration, Qwen2ForCausalLM with
    a ChatML tokenizer) and a tiny toy world."""
    from avnano import toyworld
    root = tmp_path_factory.mktemp("released")
    toyworld.build(str(root / "world"), 8, 2, seed=1, workers=1, progress=False)
    captions = [json.loads(line)["caption"] for line in open(root / "world" / "train.jsonl")]
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)).save_pretrained(root / "vit")
    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=100, vocab_size=100, num_mel_bins=80,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(root / "whisper")
    (root / "llm").mkdir()
    tok = llm_tokenizer(root / "llm", captions)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
        eos_token_id=0)).save_pretrained(root / "llm")
    return root


def run(*args, script="train_sft.py"):
    out = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


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


def test_train_sft_from_released_towers(released, tmp_path):
    world, towers = released / "world", ("--vit", released / "vit", "--audio", released / "whisper", "--llm", released / "llm")
    align = tmp_path / "align"
    log = run(*towers, "--data", world, "--stage", "align", "--steps", 2, "--out", align, *TINY)
    assert "step=2 " in log and "held-out:" in log
    saved, ref = load_file(align / "model.safetensors"), released_tensors(released)
    towers_keys = {k for k in saved if not k.startswith(ALIGNERS)}
    assert towers_keys == set(ref)  # every tower parameter is one of the released tensors, and nothing else
    for k in ref:
        assert torch.equal(saved[k], ref[k]), f"{k} changed in the align stage"
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

    clip = world / json.loads(open(world / "test.jsonl").readline())["video"]
    out = run("--ckpt", sft, "--video", clip, "--max-new-tokens", 8, script="sample.py")
    assert out.strip()


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
