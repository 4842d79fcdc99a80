"""Qwen2.5-Omni thinker checkpoints (Xu et al. 2025): config.json -> OmniConfig, explicit key maps, and loading shard by
shard into the target dtype, so a 7B thinker (17.9 GB in bf16) loads holding one copy of the weights plus one tensor.

Two layouts are read (both safetensors, one file or a sharded index):
  full     model_type "qwen2_5_omni", sizes under thinker_config, keys thinker.model.* / thinker.visual.* /
           thinker.audio_tower.* / thinker.lm_head.weight; talker.* and token2wav.* are skipped by name (never read);
  thinker  model_type "qwen2_5_omni_thinker" (what transformers 5's save_pretrained of the thinker writes, and what
           avnano saves), the same keys without "thinker.".
Rope settings come from text_config's rope_parameters (transformers 5) or rope_theta + rope_scaling (v4 files).
Loading (departure from weights.load_mapped, which takes a whole state dict): the module is built with its parameters
on the meta device (buffers, e.g. the audio tower's computed position table, stay real); every shard's header is
checked first, so every missing, unexpected and mis-shaped key is named in one error before any weight is read;
then each tensor is read, cast and placed on its own. An avnano-saved thinker also carries its LoRA (lora_A /
lora_B beside the wrapped layer's weight) and an "avnano" section of config.json (LoRA and captioning settings).
"""
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .decoder import DecoderConfig
from .errors import InputError
from .omni_audio import OMNI_AUDIO_UNUSED, OmniAudioConfig, omni_audio_keymap
from .omni_rope import OmniRopeConfig
from .omni_vision import OmniVisionConfig, vision_keymap
from .weights import CONVERT_HINT, _rope, check_keys, decoder_keymap, read_config, shard_files

FULL, THINKER = "qwen2_5_omni", "qwen2_5_omni_thinker"
SKIPPED = ("talker.", "token2wav.")  # speech output: not implemented, never read
# rope-config field -> the token text the tokenizer must give that id (checked when loading)
TOKEN_TEXT = {"image_id": "<|IMAGE|>", "video_id": "<|VIDEO|>", "audio_id": "<|AUDIO|>", "vision_bos_id": "<|vision_bos|>",
              "vision_eos_id": "<|vision_eos|>", "audio_bos_id": "<|audio_bos|>", "audio_eos_id": "<|audio_eos|>"}
# Qwen2.5-Omni's token ids (its added_tokens.json), for a config that leaves one out (load_omni checks them against
# tokenizer.json either way)
RELEASED_IDS = {"image_token_index": 151655, "video_token_index": 151656, "audio_token_index": 151646,
                "vision_start_token_id": 151652, "vision_end_token_id": 151653, "audio_start_token_id": 151647,
                "audio_end_token_id": 151648}
# the processor's video defaults (Qwen2_5OmniProcessor.videos_kwargs): frames resized to 128..768 merged 28 px cells
MIN_PIXELS, MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28


@dataclass
class Frames:
    """What the training scripts read as cfg.vit: clips are decoded at their own size (image_size None); the
    processor (omni_video.video_inputs) resizes them to multiples of 28 px within min/max pixels."""
    image_size: int = None
    grid: int = 0


@dataclass
class OmniConfig:
    decoder: DecoderConfig
    vision: OmniVisionConfig
    audio: OmniAudioConfig
    rope: OmniRopeConfig               # token ids, ids per second, seconds per chunk, merge (TMRoPE)
    thinker: dict                      # config.json's thinker section as read (saved again by avnano)
    fps: float = 2.0                   # the processor's default sampling rate (its second_per_grid = 2 / fps)
    max_frames: int = 128
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    prompt: str = "Describe this video in detail."
    system: str = None                 # None: the chat template's default system prompt
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = (r"attn\.(q|k|v|o)_proj", r"mlp\.(gate|up|down)_proj")
    label_smoothing: float = 0.0
    word_dropout: float = 0.0
    ot_weight: float = 0.0             # the avnano-model losses do not apply to the thinker: fixed at 0
    ground_weight: float = 0.0
    vit: Frames = field(default_factory=Frames)


AVNANO_FIELDS = ("fps", "max_frames", "min_pixels", "max_pixels", "prompt", "system", "lora_r", "lora_alpha", "lora_dropout",
                 "lora_targets", "label_smoothing", "word_dropout")


def released_ids(thinker):
    """The thinker config with RELEASED_IDS filled in where it names a token under neither spelling (v4 `_index`,
    v5 `_id`)."""
    missing = {k: v for k, v in RELEASED_IDS.items() if k not in thinker and k.replace("_index", "_id") not in thinker}
    return dict(thinker, **missing)


def is_omni(raw):
    return raw.get("model_type") in (FULL, THINKER)


def omni_config(path):
    """A checkpoint directory -> (OmniConfig, key prefix "thinker." or ""). Sizes come from the JSON itself."""
    file = os.path.join(path, "config.json")
    raw = read_config(path)
    kind = raw.get("model_type")
    if kind == FULL:
        thinker, prefix = raw.get("thinker_config"), "thinker."
        if not isinstance(thinker, dict):
            raise InputError(file, 'model_type "qwen2_5_omni" without a "thinker_config" object')
    elif kind == THINKER:
        thinker, prefix = raw, ""
    else:
        raise InputError(file, f"model_type {kind!r} is not a Qwen2.5-Omni checkpoint ({FULL!r} or {THINKER!r})")
    for part in ("text_config", "vision_config", "audio_config"):
        if not isinstance(thinker.get(part), dict):
            raise InputError(file, f"the thinker config has no {part} object")
    cfg = OmniConfig(decoder=text_config(thinker["text_config"], file),
                     vision=OmniVisionConfig.from_json(thinker["vision_config"], file),
                     audio=OmniAudioConfig.from_json(thinker["audio_config"], file),
                     rope=OmniRopeConfig.from_config(released_ids(thinker), file),
                     thinker={k: v for k, v in thinker.items() if k != "avnano"})
    video = os.path.join(path, "video_preprocessor_config.json")  # min/max pixels, when the directory says
    if os.path.exists(video):
        v = read_config(video)
        size = v.get("size") or {}
        cfg.min_pixels = int(v.get("min_pixels", size.get("shortest_edge", cfg.min_pixels)))
        cfg.max_pixels = int(v.get("max_pixels", size.get("longest_edge", cfg.max_pixels)))
    saved = raw.get("avnano", {})
    unknown = sorted(set(saved) - set(AVNANO_FIELDS))
    if unknown:
        raise InputError(file, f"unknown avnano fields {unknown}")
    for k, v in saved.items():
        setattr(cfg, k, tuple(v) if k == "lora_targets" else v)
    return cfg, prefix


def text_config(t, source):
    """text_config -> DecoderConfig (Qwen2: q/k/v bias, untied head in the 7B, multi-section rope)."""
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in t]
    if missing:
        raise InputError(source, f"text_config lacks {', '.join(missing)}")
    section = (t.get("rope_parameters") or {}).get("mrope_section") or (t.get("rope_scaling") or {}).get("mrope_section")
    if not section:
        raise InputError(source, "text_config has no mrope_section (in rope_parameters or rope_scaling)")
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    if sum(section) != head_dim // 2:
        raise InputError(source, f"mrope_section {list(section)} does not sum to head_dim / 2 = {head_dim // 2}")
    if (t.get("rope_scaling") or {}).get("type") == "mrope":  # Qwen2-VL-era spelling of the default rope + sections
        t = dict(t, rope_scaling=dict(t["rope_scaling"], type="default", rope_type="default"))
    theta, factor = _rope(t, source)
    cfg = DecoderConfig(vocab_size=t["vocab_size"], dim=t["hidden_size"], n_layers=t["num_hidden_layers"],
                        n_heads=t["num_attention_heads"], n_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
                        head_dim=t.get("head_dim") or 0, hidden_dim=t["intermediate_size"], norm_eps=t.get("rms_norm_eps", 1e-6),
                        rope_theta=theta, rope_linear_factor=factor, qkv_bias=True,
                        tie_embeddings=bool(t.get("tie_word_embeddings", False)),
                        max_seq_len=min(t.get("max_position_embeddings", 32768), 32768), mrope_section=tuple(section))
    return cfg


# ----------------------------------------------------------------------------------------------- key maps
def keymap(model, prefix):
    """{file key: our key} for every weight of an OmniThinker (and its LoRA, if it has one)."""
    cfg = model.cfg
    m = {prefix + hf: "decoder." + ours for hf, ours in decoder_keymap(cfg.decoder).items()}
    m.update({hf: "visual." + ours for hf, ours in vision_keymap(cfg.vision, prefix + "visual.").items()})
    m.update(omni_audio_keymap(cfg.audio, prefix + "audio_tower.", "audio_tower."))
    ours = dict(model.named_parameters())
    for hf, us in list(m.items()):  # an adapter lives beside the layer it wraps: ...q_proj.lora_A next to ...q_proj.weight
        base = us.removesuffix(".weight")
        if base + ".lora_A" in ours:
            m[hf.removesuffix(".weight") + ".lora_A"], m[hf.removesuffix(".weight") + ".lora_B"] = base + ".lora_A", base + ".lora_B"
    if model.decoder.cfg.tie_embeddings:
        m.pop(prefix + "lm_head.weight", None)
    return m


def skipped(key, prefix):
    """Released keys read by no part of the thinker: the speech half and the audio tower's unused bos/eos table."""
    return key.startswith(SKIPPED) or key in {prefix + "audio_tower." + k for k in OMNI_AUDIO_UNUSED}


# ----------------------------------------------------------------------------------------------- files
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(file):
    """A safetensors file's index: {key: (dtype, shape, byte offset, byte length)}. The format is an 8-byte
    little-endian header length, a JSON header, then the raw tensors. Read with plain file reads, not a memory map,
    so no page of the file is ever counted in the process (the loading peak is the model plus one tensor)."""
    if not os.path.isfile(file):
        raise InputError(file, "no such file")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip or a bare pickle
            raise InputError(file, f"a pickle file, not safetensors. {CONVERT_HINT}")
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise InputError(file, f"truncated or corrupt safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(file, f"truncated or corrupt safetensors file (header is not JSON: {e})") from None
    index = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        start, end = v["data_offsets"]
        if v["dtype"] not in DTYPES or not 0 <= start <= end <= size - 8 - n:
            raise InputError(file, f"truncated or corrupt safetensors file ({key}: dtype {v['dtype']}, bytes "
                             f"{start}..{end} of {size - 8 - n})")
        index[key] = (DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + start, end - start)
    return index


def read_tensor(f, entry):
    """One tensor of an open file, read straight into its own CPU buffer."""
    dtype, shape, offset, length = entry
    buf = torch.empty(length, dtype=torch.uint8)
    f.seek(offset)
    if f.readinto(buf.numpy()) != length:
        raise InputError(f.name, "truncated safetensors file")
    return buf.view(dtype).reshape(shape)


@contextmanager
def params_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init cost); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_headers(path):
    """{file: read_header(file)} for every safetensors file of a checkpoint directory (only the headers are read)."""
    return {file: read_header(file) for file in shard_files(path)}


def load_weights(model, path, headers, prefix, dtype, device):
    """Fill a meta-built OmniThinker from its checkpoint's files (`headers` from read_headers), tensor by tensor;
    every missing, unexpected and mis-shaped key is named first, in one error, before any weight is read."""
    m, ours = keymap(model, prefix), dict(model.named_parameters())
    check_keys(m, {k: p.shape for k, p in ours.items()}, {k: e[1] for index in headers.values() for k, e in index.items()},
               path, skip=lambda k: skipped(k, prefix))
    for file, index in headers.items():
        with open(file, "rb") as f:
            for key in sorted((k for k in index if k in m), key=lambda k: index[k][2]):  # file order
                owner, _, name = m[key].rpartition(".")
                keep = torch.float32 if name.startswith("lora_") else dtype  # adapters stay float32 (lora.py)
                tensor = read_tensor(f, index[key]).to(device=device, dtype=keep)
                model.get_submodule(owner)._parameters[name] = nn.Parameter(tensor, requires_grad=ours[m[key]].requires_grad)
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = b.to(device)
    return model


def param_fields(cfg):
    """The avnano section written beside the thinker config when saving."""
    return {k: getattr(cfg, k) for k in AVNANO_FIELDS}

