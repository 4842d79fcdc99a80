"""The Qwen2.5-Omni thinker (Xu et al. 2025) as an avnano captioner: released AV captioners (AVoCaDO, Qwen2.5-Omni-3B/7B
and their fine-tunes) sampled and post-trained through the same interface as model.AVCaptioner.

Data flow, as transformers' Qwen2_5OmniThinkerForConditionalGeneration with the processor's use_audio_in_video:
frames (2 fps) -> omni_video.video_inputs (smart_resize, normalise, 14 x 14 x 2 patches) -> omni_vision (window
ViT + 2x2 merger) ; 16 kHz audio -> omni_audio.audio_features (128-bin log-mel) -> omni_audio (25 tokens/s) ;
interleave.omni_chunked_order orders both in 2 s chunks; the block replaces <|VIDEO|> of the ChatML prompt
`<|vision_bos|><|VIDEO|><|vision_eos|>{prompt}` (the chat template's own layout), so the decoder reads
<|vision_bos|><|audio_bos|> [V chunk][A chunk] ... <|audio_eos|><|vision_eos|> with TMRoPE ids (omni_rope), plain
causal attention. A video without an audio stream gets video tokens only; an audio-only file <|audio_bos|>...<|audio_eos|>.
The pieces are avnano's own: captioner.Captioner (prompt, loss, log-probs, sampling, parameter groups: the
interface model.AVCaptioner has), decoder.Decoder (with mrope_section), lora.py, generate.py. Not implemented: the
talker / token2wav (speech output; captions are text), images as separate inputs.
Frames: media.load_clip(frame_indices=model.frame_indices) decodes qwen-omni-utils' frames (omni_frames).
Departure: a waveform of exact zeros (load_clip's fill for a video without audio) counts as no audio, as the reference
does for a missing audio stream.
"""
import functools
import os
from typing import NamedTuple

import numpy as np
import torch

from . import lora
from .captioner import Captioner
from .decoder import Decoder
from .errors import InputError
from .interleave import omni_chunked_order
from .layout import Layout
from .omni_audio import OmniAudio, audio_features, audio_token_count
from .omni_load import TOKEN_TEXT, keymap, load_weights, omni_config, param_fields, params_on_meta, read_headers
from .omni_rope import omni_position_ids
from .omni_video import sample_indices, video_inputs
from .omni_vision import OmniVision
from .plan import Plan, to_device
from .tokenizer import Tokenizer
from .weights import save_file_atomic, write_json_atomic

VIDEO_TAG = "<|vision_bos|><|VIDEO|><|vision_eos|>"  # what the chat template writes for a video


def omni_frames(total_frames, video_fps, fps, max_frames):
    """The decoded frames qwen-omni-utils keeps (omni_video.sample_indices: an even count of about fps per second,
    4..max_frames, at round(linspace(0, total_frames - 1, n))): media.load_clip's frame_indices for the thinker."""
    return sample_indices(total_frames, video_fps, fps, max_frames=max_frames)[0]


class OmniBlock(NamedTuple):
    ids: list              # the tokens replacing <|vision_bos|><|VIDEO|><|vision_eos|> (their bos / eos included)
    feats: torch.Tensor    # (n, D) encoder tokens, in the order of the placeholder ids among `ids`
    grid: list             # [(t, h, w)] of the video, [] for an audio-only clip
    second_per_grid: float  # seconds per temporal patch (temporal_patch_size / fps)


class OmniThinker(Captioner):
    """The thinker; render, loss tail, log-probs, sampling and parameter groups are captioner.Captioner's."""
    omni = True  # checkpoint.save_model / load_model and training.build_model branch on this
    TOWERS, ALIGNERS = {"visual": "vit", "audio_tower": "audio"}, ("visual.merger.", "audio_tower.ln_post.", "audio_tower.proj.")
    media_tag, mask_kind = VIDEO_TAG, "causal"

    def __init__(self, cfg, tok: Tokenizer):
        super().__init__()
        self.cfg, self.tok = cfg, tok
        self.visual = OmniVision(cfg.vision)
        self.audio_tower = OmniAudio(cfg.audio)
        self.decoder = Decoder(cfg.decoder)
        if cfg.lora_r > 0:
            lora.inject(self.decoder, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        r = cfg.rope
        self.ids = dict(video=r.video_id, audio=r.audio_id, vbos=r.vision_bos_id, veos=r.vision_eos_id,
                        abos=r.audio_bos_id, aeos=r.audio_eos_id)

    # the towers under the names the training scripts use (gradient checkpointing, FLOP counts)
    vit = property(lambda self: self.visual)
    audio = property(lambda self: self.audio_tower)

    @property
    def frame_indices(self):
        """media.load_clip / data.ClipStore's frame_indices for this thinker (a partial: data workers unpickle it)."""
        return functools.partial(omni_frames, fps=self.cfg.fps, max_frames=self.cfg.max_frames)

    # ----------------------------------------------------------------------------------- encoders
    def preprocess(self, frames, wav):
        """One clip -> (pixel_values, grid (t, h, w), seconds per temporal patch) or None, and its log-mel (128, T) or
        None: what the Omni processor hands the towers. No frames: an audio-only file. Empty or all-zero audio: no audio
        tokens. A temporal patch spans temporal_patch_size / cfg.fps seconds whatever rate the frames were sampled at
        (n / total_frames * video_fps): transformers' Qwen2_5OmniProcessor takes second_per_grid from its own fps
        argument (2.0 when not given, as in AVoCaDO's inference script; qwen-omni-utils returns the sampled rate only
        with return_video_kwargs=True, as a list, and transformers 5.24 divides by a scalar fps).
        Host work, as the processor's: frames and waveform are read on the CPU (a loader keeps them there; one given
        on a device is copied back), so the resize is the same uint8 kernel in training and in sampling."""
        c, wav = self.cfg, torch.as_tensor(wav).cpu()
        video = None
        if len(frames):
            pixels, grid, _ = video_inputs(frames, c.fps, min_pixels=c.min_pixels, max_pixels=c.max_pixels)
            video = pixels, tuple(int(g) for g in grid[0]), c.vision.temporal_patch_size / c.fps
        mel = audio_features(wav) if len(wav) and bool(wav.any()) else None
        return video, mel

    def encode(self, inputs):
        """[(video, mel)] from preprocess -> [OmniBlock]: every clip's pixels through the vision tower in one call, every
        clip's audio through the audio tower in another, then each clip's block laid out (interleave.omni_chunked_order):
        the orders are built on the host as one index into [all video tokens; all audio tokens], copied once."""
        if not inputs:
            return []
        c, ids, merge = self.cfg, self.ids, self.cfg.vision.spatial_merge_size
        grids = [tuple(int(x) for x in v[1]) for v, _ in inputs if v is not None]
        mels = [m for _, m in inputs if m is not None]
        counts = [t * h * w // merge ** 2 for t, h, w in grids]
        parts = ([self.visual(torch.cat([v[0] for v, _ in inputs if v is not None]).to(self.device, self.dtype), grids)]
                 if grids else []) + ([self.audio_tower([m.to(self.device, self.dtype) for m in mels])] if mels else [])
        n_v, n_a = iter(counts), iter([audio_token_count(m.shape[-1]) for m in mels])
        index, heads, v0, a0 = [], [], 0, sum(counts)
        for v, m in inputs:
            nv, na = next(n_v) if v is not None else 0, next(n_a) if m is not None else 0
            grid, spg = ([tuple(int(x) for x in v[1])], v[2]) if v is not None else ([], 1.0)
            if v is not None and m is not None:
                idx = omni_chunked_order(grid[0], spg, na, c.rope)
                audio = idx >= nv
                src = np.where(audio, a0 + idx - nv, v0 + idx)
                body = np.where(audio, ids["audio"], ids["video"]).tolist()
                block = [ids["vbos"], ids["abos"]] + body + [ids["aeos"], ids["veos"]]
            elif v is not None:
                src, block = v0 + np.arange(nv), [ids["vbos"]] + [ids["video"]] * nv + [ids["veos"]]
            elif m is not None:
                src, block = a0 + np.arange(na), [ids["abos"]] + [ids["audio"]] * na + [ids["aeos"]]
            else:
                raise InputError("clip", "neither frames nor audio to caption")
            index.append(src)
            heads.append((block, grid, spg))
            v0, a0 = v0 + nv, a0 + na
        tokens = torch.cat(parts)[to_device({"index": np.concatenate(index)}, self.device)["index"]]
        return [OmniBlock(b, f, g, s) for (b, g, s), f in zip(heads, tokens.split([len(i) for i in index]))]

    def av_block(self, frames_list, frame_times_list, audio_list):
        """Per clip an OmniBlock; and a zero (no OT loss). TMRoPE times temporal patch k at k * second_per_grid (see
        preprocess), not by the frames' timestamps (frame_times_list is unused), as the processor does."""
        return self.encode([self.preprocess(f, a) for f, a in zip(frames_list, audio_list)]), torch.zeros((), device=self.device)

    # ----------------------------------------------------------------------------------- layout
    def plan_layout(self, blocks, ids_list, loss_masks=None, left_pad=False):
        """The host half of layout(): per row the ids with the block's in place of the video tag, where each slot reads
        (0 = a zero pad row, then the blocks' encoder tokens, then the text embeddings), TMRoPE ids (3, B, L), the AV
        flags and the shifted labels; a Plan (not yet copied) with layout.plan_rows' keys."""
        rows, n_feats = [], sum(len(b.feats) for b in blocks)
        for i, (block, ids) in enumerate(zip(blocks, ids_list)):
            ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
            k = ids.index(self.ids["video"])  # the prompt's placeholder; one sampled later stays a token
            if ids[k - 1] != self.ids["vbos"] or ids[k + 1] != self.ids["veos"]:
                raise ValueError("the rendered prompt does not hold <|vision_bos|><|VIDEO|><|vision_eos|>")
            full = np.array(ids[:k - 1] + block.ids + ids[k + 2:], dtype=np.int64)
            is_av = np.zeros(len(full), bool)
            is_av[k - 1:k - 1 + len(block.ids)] = True
            pos, _ = omni_position_ids(full.tolist(), self.cfg.rope, video_grid_thw=block.grid or None,
                                       second_per_grid=[block.second_per_grid] * len(block.grid) or None)
            labels = np.full(len(full), -100, dtype=np.int64)
            if loss_masks is not None:
                lm = np.array([0] * (k - 1 + len(block.ids)) + list(loss_masks[i][k + 2:]), dtype=bool)
                labels[:-1] = np.where(lm, full, -100)[1:]  # position t predicts token t+1
            rows.append((full, is_av & np.isin(full, [self.ids["video"], self.ids["audio"]]), is_av, pos.numpy(), labels))
        B, L = len(rows), max(len(r[0]) for r in rows)
        src, positions = np.zeros((B, L), np.int64), np.ones((3, B, L), np.int64)
        is_av, valid, labels = np.zeros((B, L), bool), np.zeros((B, L), bool), np.full((B, L), -100, dtype=np.int64)
        text, f0, t0 = [], 1, 1 + n_feats
        for b, ((full, slot, av, pos, lab), block) in enumerate(zip(rows, blocks)):
            n, n_text = len(full), int((~slot).sum())
            s = slice(L - n, L) if left_pad else slice(0, n)
            row = np.empty(n, np.int64)
            row[slot], row[~slot] = f0 + np.arange(n - n_text), t0 + np.arange(n_text)
            src[b, s], positions[:, b, s], is_av[b, s], valid[b, s], labels[b, s] = row, pos, av, True, lab
            text.append(full[~slot])
            f0, t0 = f0 + len(block.feats), t0 + n_text
        flat = labels.reshape(-1)
        label_index = np.flatnonzero(flat != -100)
        plan = Plan()
        plan.host.update({"rows.src": src, "rows.text": np.concatenate(text), "rows.positions": positions, "rows.is_av": is_av,
                          "rows.valid": valid, "rows.labels": labels, "rows.label_index": label_index,
                          "rows.label_targets": flat[label_index]})
        plan.meta.update(n_tokens=len(label_index), n_seq=int(valid.sum()),
                         right_padded=bool((np.diff(valid.astype(np.int64), axis=1) <= 0).all()))
        return plan

    def layout(self, blocks, ids_list, loss_masks=None, left_pad=False, plan=None) -> Layout:
        """A padded batch (right-padded, or left-padded for generation); positions are (3, B, L). plan: plan_layout's, on
        the device (made and copied here when None); the device does one gather."""
        plan = plan if plan is not None else self.plan_layout(blocks, ids_list, loss_masks, left_pad).to_device(self.device)
        d, emb = plan.dev, self.decoder.embed
        source = torch.cat([emb.weight.new_zeros(1, emb.weight.shape[1])] + [b.feats.to(emb.weight.dtype) for b in blocks] +
                           [emb(d["rows.text"])])
        return Layout(source[d["rows.src"]], d["rows.positions"], d["rows.is_av"], d["rows.valid"], d["rows.labels"],
                      d["rows.label_index"], d["rows.label_targets"], plan.meta["right_padded"])

    def forward(self, frames, frame_times, audio, ids, loss_mask, return_hidden=False, ground=None):
        """A batch of clips with tokenised (prompt + caption) -> dict(loss, ce, ot, ground, n_tokens, n_seq); the layout is
        planned on the host and copied once (the losses of the avnano model's heads are 0 here)."""
        blocks, _ = self.av_block(frames, frame_times, audio)
        plan = self.plan_layout(blocks, ids, loss_mask).to_device(self.device)
        h, x = self.hidden_states(blocks, ids, loss_mask, self.cfg.word_dropout if self.training else 0.0, plan)
        return self.caption_loss(h, x, plan, return_hidden=return_hidden)


# --------------------------------------------------------------------------------------------------- files
def load_omni(path, dtype=torch.float32, device="cpu"):
    """A released (or avnano-saved) Qwen2.5-Omni directory -> OmniThinker in eval mode, weights read shard by shard
    straight into `dtype` on `device` (peak: the model plus one tensor)."""
    cfg, prefix = omni_config(path)
    tok = Tokenizer.from_file(path)
    wrong = [f"{text} is id {tok.tok.token_to_id(text)} in tokenizer.json but {getattr(cfg.rope, name)} in config.json"
             for name, text in TOKEN_TEXT.items() if tok.tok.token_to_id(text) != getattr(cfg.rope, name)]
    if wrong:
        raise InputError(path, "tokenizer and config disagree: " + "; ".join(wrong))
    headers = read_headers(path)
    if any(prefix + "lm_head.weight" in index for index in headers.values()):
        cfg.decoder.tie_embeddings = False  # a stored head is the head, whatever tie_word_embeddings says
    with params_on_meta():
        model = OmniThinker(cfg, tok)
    return load_weights(model, path, headers, prefix, dtype, torch.device(device)).eval()


def save_omni(model, path):
    """The thinker-only layout (what transformers 5 writes; transformers reads it, the LoRA keys aside) + tokenizer;
    LoRA adapters are saved unmerged beside their layers, with the avnano settings in config.json."""
    os.makedirs(path, exist_ok=True)
    ours = model.state_dict()
    save_file_atomic({hf: ours[us] for hf, us in keymap(model, "").items()}, os.path.join(path, "model.safetensors"))
    thinker = dict(model.cfg.thinker, model_type="qwen2_5_omni_thinker",
                   architectures=["Qwen2_5OmniThinkerForConditionalGeneration"], avnano=param_fields(model.cfg))
    write_json_atomic(thinker, os.path.join(path, "config.json"))
    model.tok.save(path)
