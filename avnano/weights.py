"""Released-weight I/O: read Hugging Face safetensors (single or sharded), map keys explicitly, check shapes.

Every loader here is a plain dict {released key: our key} built from the config, plus a list of
released keys that are skipped on purpose (by name, e.g. a text tower or a Whisper decoder). The
state is then checked as a whole and *every* missing, unexpected and mis-shaped key is named in
one error. Pickled checkpoints (.bin/.pt) are refused: unpickling runs arbitrary code.
Our own decoder checkpoints are written in the same Hugging Face layout, so transformers reads them too.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .decoder import Decoder, DecoderConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("avnano reads safetensors only (unpickling can run arbitrary code). Convert once in a "
                "trusted environment: `from safetensors.torch import save_file; "
                "save_file(torch.load(p, weights_only=True), 'model.safetensors')`.")


def read_safetensors(path):
    """A .safetensors file, or a directory holding model.safetensors or model.safetensors.index.json."""
    if os.path.isdir(path):
        single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(single):
            return load_file(single)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(os.path.join(path, shard)))
            return state
        pickles = [f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(f"{path}: only pickle weights found ({', '.join(sorted(pickles))}). {CONVERT_HINT}")
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path}: pickle checkpoint refused. {CONVERT_HINT}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return load_file(path)


def read_config(path):
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: missing (released checkpoints ship a config.json beside the weights)")
    with open(file) as f:
        return json.load(f)


def load_mapped(module, state, keymap, source, skip=lambda key: False):
    """Copy state[released] into module[ours] for every pair of keymap; name every problem at once."""
    ours = module.state_dict()
    problems = []
    for key in sorted(state):
        if key not in keymap and not skip(key):
            problems.append(f"unexpected key {key}")
    for hf_key, our_key in keymap.items():
        if hf_key not in state:
            problems.append(f"missing key {hf_key}")
        elif tuple(state[hf_key].shape) != tuple(ours[our_key].shape):
            problems.append(f"wrong shape for {hf_key}: file has {tuple(state[hf_key].shape)}, "
                            f"model expects {tuple(ours[our_key].shape)}")
    not_filled = sorted(set(ours) - set(keymap.values()))
    problems += [f"model key {k} has no source in the key map" for k in not_filled]
    if problems:
        raise ValueError(f"{source}: cannot load weights:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for hf_key, our_key in keymap.items():
            ours[our_key].copy_(state[hf_key])


# ---------------------------------------------------------------------------------------------------
# Decoder: LlamaForCausalLM (SmolLM2) and Qwen2ForCausalLM

SUPPORTED_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def _rope(hf, source):
    """Both config forms: transformers-5 `rope_parameters`, or v4 top-level rope_theta + rope_scaling
    (whose type key was once "type", later "rope_type"). Returns (theta, linear factor)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    factor = params.get("factor", scaling.get("factor", 1.0))
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(factor)
    raise ValueError(f"{source}: rope type '{kind}' is not supported (avnano implements 'default' and 'linear'); "
                     "refusing rather than silently computing different positions")


def decoder_config_from_hf(hf, source="config.json"):
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{source}: architecture {arch} is not supported (expected one of {SUPPORTED_ARCHS})")
    theta, factor = _rope(hf, source)
    return DecoderConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or 0, hidden_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
        rope_theta=theta, rope_linear_factor=factor,
        qkv_bias=arch == "Qwen2ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=min(hf.get("max_position_embeddings", 4096), 32768))


def decoder_keymap(cfg: DecoderConfig):
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.", f"blocks.{i}."
        m[hf + "input_layernorm.weight"] = us + "attn_norm.weight"
        m[hf + "post_attention_layernorm.weight"] = us + "mlp_norm.weight"
        for p in ("q", "k", "v", "o"):
            m[hf + f"self_attn.{p}_proj.weight"] = us + f"attn.{p}_proj.weight"
            if cfg.qkv_bias and p != "o":
                m[hf + f"self_attn.{p}_proj.bias"] = us + f"attn.{p}_proj.bias"
        for p in ("gate", "up", "down"):
            m[hf + f"mlp.{p}_proj.weight"] = us + f"mlp.{p}_proj.weight"
    return m


def load_decoder(path, dtype=torch.float32, device="cpu"):
    """A released (or avnano-saved) LlamaForCausalLM / Qwen2ForCausalLM directory -> Decoder."""
    cfg = decoder_config_from_hf(read_config(path), os.path.join(path, "config.json"))
    state = read_safetensors(path)
    model = Decoder(cfg)
    # Tied checkpoints sometimes still carry a copy of the head; it equals the embedding, so skip it.
    load_mapped(model, state, decoder_keymap(cfg), path,
                skip=lambda k: cfg.tie_embeddings and k == "lm_head.weight")
    return model.to(device=device, dtype=dtype).eval()


def save_file_atomic(tensors, file, metadata=None):
    """Write to a temporary name in the same directory, then os.replace: never a half-written file."""
    tmp = file + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, file)


def write_json_atomic(obj, file):
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, file)


def save_decoder(model: Decoder, path):
    """Write our decoder in the released layout (config.json + model.safetensors)."""
    cfg = model.cfg
    os.makedirs(path, exist_ok=True)
    ours = model.state_dict()
    save_file_atomic({hf: ours[us] for hf, us in decoder_keymap(cfg).items()}, os.path.join(path, "model.safetensors"))
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_linear_factor != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_linear_factor)
    write_json_atomic({
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if cfg.qkv_bias else "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu"}, os.path.join(path, "config.json"))
