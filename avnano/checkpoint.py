"""avnano checkpoints: the captioner's own files, and training state that survives a kill at any moment.

An AV model directory holds model.safetensors, config.json ({"avnano": AVConfig}) and tokenizer.json
(`save_model` / `load_model`; `released_captioner` assembles one from three released towers). A
training checkpoint adds optimizer.safetensors (every optimizer tensor plus the torch RNG state) and
train_state.json (step, data position, argparse namespace, optimizer hyper-parameters). The whole
directory is written under a temporary name and swapped in with os.replace; the previous one is
kept as DIR.old until the swap is done, and `resume_path` falls back to it, so a kill mid-write
never loses the last good checkpoint. Nothing is pickled.
"""
import os
import shutil
from dataclasses import asdict, replace

import torch

from .errors import InputError
from .model import AVCaptioner, AVConfig
from .tokenizer import AV, Tokenizer
from .weights import (load_audio_encoder, load_decoder, load_mapped, load_vit, read_config, read_safetensors, save_file_atomic,
                      write_json_atomic)


def save_model(model, path):
    """model.safetensors + config.json + tokenizer.json, each written atomically. A Qwen2.5-Omni thinker is written in
    its released thinker-only layout (omni.save_omni), its LoRA beside the layers."""
    if getattr(model, "omni", False):
        from .omni import save_omni
        return save_omni(model, path)
    os.makedirs(path, exist_ok=True)
    save_file_atomic(model.state_dict(), os.path.join(path, "model.safetensors"))
    write_json_atomic({"avnano": asdict(model.cfg)}, os.path.join(path, "config.json"))
    model.tok.save(path)


def load_model(path, device="cpu", dtype=None):
    """An AV model directory -> AVCaptioner in eval mode; every missing, unexpected or mis-shaped key named. A
    Qwen2.5-Omni directory (config.json model_type qwen2_5_omni or qwen2_5_omni_thinker) -> omni.OmniThinker, read
    shard by shard into `dtype` (default: bfloat16 on CUDA, float32 on the CPU; AVCaptioner checkpoints stay float32)."""
    raw = read_config(path)
    from .omni_load import is_omni
    if is_omni(raw):
        from .omni import load_omni
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        return load_omni(path, dtype=dtype, device=device)
    if "avnano" not in raw:
        raise InputError(os.path.join(path, "config.json"), "not an avnano AV checkpoint (released LLMs load with sample.py --llm)")
    try:
        cfg = AVConfig.from_dict(raw["avnano"])
    except (ValueError, TypeError) as e:  # unknown fields (a newer avnano's checkpoint) or malformed values
        raise InputError(os.path.join(path, "config.json"), str(e)) from None
    with torch.device("cpu"):  # built on the host whatever the default device, filled, then moved to `device`
        model = AVCaptioner(cfg, Tokenizer.from_file(path))
    state = read_safetensors(os.path.join(path, "model.safetensors"))
    load_mapped(model, state, {k: k for k in model.state_dict()}, path)
    return model.to(device).eval()


def released_captioner(vit_dir, audio_dir, llm_dir, merge=1, exact_audio=True, **overrides):
    """SigLIP/CLIP + Whisper encoder + Llama/Qwen2 LLM from three released directories, fresh aligners.
    The tokenizer is the LLM's; the <|av|> placeholder is added if missing (it is replaced before
    embedding, so it needs no row). overrides: AVConfig fields."""
    vit, audio, dec = load_vit(vit_dir, merge=merge), load_audio_encoder(audio_dir, exact=exact_audio), load_decoder(llm_dir)
    tok = Tokenizer.from_file(llm_dir)
    if tok.tok.token_to_id(AV) is None:
        tok.tok.add_special_tokens([AV])
    cfg = replace(AVConfig(vit=vit.cfg, audio=audio.cfg, decoder=dec.cfg), **overrides)
    return AVCaptioner(cfg, tok, vit=vit, audio=audio, decoder=dec)


def save(path, model, optimizer, state):
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    opt = optimizer.state_dict()
    tensors, scalars = {"rng.torch": torch.get_rng_state()}, {}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    save_file_atomic(tensors, os.path.join(tmp, "optimizer.safetensors"))
    write_json_atomic(dict(state, param_groups=opt["param_groups"], optimizer_scalars=scalars),
                      os.path.join(tmp, "train_state.json"))
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def resume_path(path):
    """The checkpoint to resume from: DIR, or DIR.old when a kill interrupted the swap."""
    for p in (path, path + ".old"):
        if os.path.exists(os.path.join(p, "train_state.json")):
            return p
    raise InputError(path, "no complete checkpoint to resume from")


def load_state(path, optimizer=None):
    """Restore the RNG and the optimizer (unless None: a run that makes a fresh one, as DPO per round) from a
    checkpoint directory; returns the saved state dict."""
    state = read_config(os.path.join(path, "train_state.json"))
    tensors = read_safetensors(os.path.join(path, "optimizer.safetensors"))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if optimizer is None:
        return state
    opt_state = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for key, v in state.pop("optimizer_scalars").items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state
