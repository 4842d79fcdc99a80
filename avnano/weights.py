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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .decoder import Decoder, DecoderConfig
from .errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("avnano reads safetensors only (unpickling can run arbitrary code). Convert once in a "
                "trusted environment: `from safetensors.torch import save_file; "
                "save_file(torch.load(p, weights_only=True), 'model.safetensors')`.")


def read_safetensors(path):
    """A .safetensors file, or a directory holding model.safetensors or model.safetensors.index.json.
    A missing, truncated or corrupt file, a missing shard or a pickle file raises InputError naming it."""
    if os.path.isdir(path):
        return {k: v for file in shard_files(path) for k, v in _load_safetensors(file).items()}
    if path.endswith(PICKLE_SUFFIXES):
        raise InputError(path, f"pickle checkpoint refused. {CONVERT_HINT}")
    return _load_safetensors(path)


def shard_files(path):
    """The safetensors files of a checkpoint directory: model.safetensors, or every shard its index names."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(index, 'no "weight_map" object naming the shards')
        files = [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise InputError(f, "missing shard (listed in model.safetensors.index.json)")
        return files
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InputError(path, f"only pickle weights found ({', '.join(pickles)}). {CONVERT_HINT}")
    raise InputError(path, "no model.safetensors or model.safetensors.index.json")


def _load_safetensors(file):
    """One safetensors file; a failure names it and tells a pickle from a truncated or corrupt file."""
    if not os.path.isfile(file):
        raise InputError(file, "no such file")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        with open(file, "rb") as f:
            head = f.read(4)
        if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip or a bare pickle
            raise InputError(file, f"a pickle file, not safetensors. {CONVERT_HINT}") from None
        problem = str(e).removeprefix("Error while deserializing header: ")
        raise InputError(file, f"truncated or corrupt safetensors file ({problem})") from None


def read_config(path):
    """A JSON file (or a directory's config.json) -> dict; a missing or malformed one raises InputError."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise InputError(file, "missing (checkpoints ship a config.json beside the weights)" if file != path
                         else "no such file")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(file, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise InputError(file, "not a JSON text file (it is not UTF-8)") from None
    if not isinstance(config, dict):
        raise InputError(file, f"expected a JSON object, found a {type(config).__name__}")
    return config


def check_keys(keymap, model_shapes, file_shapes, source, skip=lambda key: False):
    """keymap {released key: our key}, model_shapes {our key: shape}, file_shapes {released key: shape}: one
    InputError naming every unexpected (and not skipped), missing and mis-shaped released key and every model key
    the keymap leaves without a source."""
    problems = [f"unexpected key {k}" for k in file_shapes if k not in keymap and not skip(k)]
    for hf_key, our_key in keymap.items():
        if hf_key not in file_shapes:
            problems.append(f"missing key {hf_key}")
        elif tuple(file_shapes[hf_key]) != tuple(model_shapes[our_key]):
            problems.append(f"wrong shape for {hf_key}: file has {tuple(file_shapes[hf_key])}, "
                            f"model expects {tuple(model_shapes[our_key])}")
    problems += [f"model key {k} has no source in the key map" for k in set(model_shapes) - set(keymap.values())]
    if problems:
        raise InputError(source, "cannot load weights:\n  " + "\n  ".join(sorted(problems)))


def load_mapped(module, state, keymap, source, skip=lambda key: False):
    """Copy state[released] into module[ours] for every pair of keymap; name every problem at once."""
    ours = module.state_dict()
    check_keys(keymap, {k: v.shape for k, v in ours.items()}, {k: v.shape for k, v in state.items()}, source, skip)
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
    raise InputError(source, f"rope type '{kind}' is not supported (avnano implements 'default' and 'linear'); "
                     "refusing rather than silently computing different positions")


REQUIRED_LLM_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "rms_norm_eps")


def decoder_config_from_hf(hf, source="config.json"):
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise InputError(source, f"architecture {arch} is not supported (expected one of {SUPPORTED_ARCHS})")
    theta, factor = _rope(hf, source)
    if missing := [k for k in REQUIRED_LLM_FIELDS if k not in hf]:
        raise InputError(source, f"missing {', '.join(missing)} (required in a {arch} config)")
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


# ---------------------------------------------------------------------------------------------------
# Vision towers: SiglipVisionModel / SiglipModel, CLIPVisionModel / CLIPModel

TEXT_TOWER_PREFIXES = ("text_model.", "logit_scale", "logit_bias", "visual_projection.", "text_projection.")
VIT_ACT = {"siglip": "gelu_pytorch_tanh", "clip": "quick_gelu"}


def vit_config_from_hf(hf, source="config.json", merge=1):
    from .vit import ViTConfig
    family = "siglip" if hf.get("model_type", "").startswith("siglip") else "clip" if hf.get("model_type", "").startswith("clip") else None
    if family is None:
        raise InputError(source, f"model_type {hf.get('model_type')!r} is neither a SigLIP nor a CLIP vision model")
    v = hf.get("vision_config", hf)
    act = v.get("hidden_act", VIT_ACT[family])
    if act != VIT_ACT[family]:
        raise InputError(source, f"hidden_act {act!r} differs from {family}'s {VIT_ACT[family]!r}; not supported")
    try:
        return ViTConfig(family=family, image_size=v["image_size"], patch_size=v["patch_size"], dim=v["hidden_size"],
                         n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"], hidden_dim=v["intermediate_size"],
                         map_head=family == "siglip" and v.get("vision_use_head", True), merge=merge)
    except ValueError as e:  # e.g. a merge that does not divide the patch grid
        raise InputError(source, str(e)) from None


def vit_keymap(cfg, prefix=""):
    from .transformer import block_keymap
    p = prefix
    m = {p + "embeddings.patch_embedding.weight": "patch_embed.weight",
         p + "embeddings.position_embedding.weight": "pos_embed",
         p + "post_layernorm.weight": "post_norm.weight", p + "post_layernorm.bias": "post_norm.bias"}
    if cfg.family == "siglip":
        m[p + "embeddings.patch_embedding.bias"] = "patch_embed.bias"
    else:
        m[p + "embeddings.class_embedding"] = "cls"
        m[p + "pre_layrnorm.weight"], m[p + "pre_layrnorm.bias"] = "pre_norm.weight", "pre_norm.bias"
    for i in range(cfg.n_layers):
        m.update(block_keymap(f"{p}encoder.layers.{i}.", f"blocks.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")))
    if cfg.map_head:
        h = p + "head."
        m.update({h + "probe": "head.probe", h + "attention.in_proj_weight": "head.in_proj.weight",
                  h + "attention.in_proj_bias": "head.in_proj.bias"})
        for hf, ours in (("attention.out_proj", "out_proj"), ("layernorm", "norm"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            m[f"{h}{hf}.weight"], m[f"{h}{hf}.bias"] = f"head.{ours}.weight", f"head.{ours}.bias"
    return m


def load_vit(path, dtype=torch.float32, merge=1):
    """A released SigLIP / CLIP directory (vision tower alone or the full two-tower model) -> ViT."""
    from .vit import ViT
    cfg = vit_config_from_hf(read_config(path), os.path.join(path, "config.json"), merge)
    state = read_safetensors(path)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    model = ViT(cfg)
    load_mapped(model, state, vit_keymap(cfg, prefix), path, skip=lambda k: k.startswith(TEXT_TOWER_PREFIXES))
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------
# Whisper encoder: WhisperForConditionalGeneration ("model.encoder.*") or WhisperModel ("encoder.*")

WHISPER_DECODER_PREFIXES = ("model.decoder.", "decoder.", "proj_out.")


def audio_config_from_hf(hf, source="config.json", exact=True):
    from .audio import AudioConfig
    if hf.get("model_type") != "whisper":
        raise InputError(source, f"model_type {hf.get('model_type')!r} is not a Whisper model")
    return AudioConfig(n_mels=hf["num_mel_bins"], dim=hf["d_model"], n_layers=hf["encoder_layers"],
                       n_heads=hf["encoder_attention_heads"], hidden_dim=hf["encoder_ffn_dim"],
                       max_positions=hf["max_source_positions"], exact=exact)


def audio_keymap(cfg, prefix="model.encoder."):
    from .transformer import block_keymap
    p = prefix
    m = {p + "embed_positions.weight": "pos_embed", p + "layer_norm.weight": "norm.weight", p + "layer_norm.bias": "norm.bias"}
    for conv in ("conv1", "conv2"):
        m[f"{p}{conv}.weight"], m[f"{p}{conv}.bias"] = f"{conv}.weight", f"{conv}.bias"
    for i in range(cfg.n_layers):
        m.update(block_keymap(f"{p}layers.{i}.", f"blocks.{i}.", ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"),
                              k_bias=False))
    return m


def load_audio_encoder(path, dtype=torch.float32, exact=True):
    """The encoder half of a released Whisper checkpoint -> AudioEncoder (the decoder half is skipped by name)."""
    from .audio import AudioEncoder
    cfg = audio_config_from_hf(read_config(path), os.path.join(path, "config.json"), exact)
    state = read_safetensors(path)
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in state)), "")
    model = AudioEncoder(cfg)
    load_mapped(model, state, audio_keymap(cfg, prefix), path, skip=lambda k: k.startswith(WHISPER_DECODER_PREFIXES))
    return model.to(dtype).eval()

