"""The Qwen2.5-Omni thinker (Xu et al. 2025) as an avnano captioner: released AV captioners (AVoCaDO, Qwen2.5-Omni-3B/7B
and their fine-tunes) sampled and post-trained through the same interface as model.AVCaptioner.

Data flow, as transformers' Qwen2_5OmniThinkerForConditionalGeneration with the processor's use_audio_in_video:
frames (2 fps) -> omni_video.video_inputs (smart_resize, normalise, 14 x 14 x 2 patches) -> omni_vision (window
ViT + 2x2 merger) ; 16 kHz audio -> omni_audio.audio_features (128-bin log-mel) -> omni_audio (25 tokens/s) ;
interleave.omni_chunked_order orders both in 2 s chunks; the block replaces <|VIDEO|> of the ChatML prompt
`<|vision_bos|><|VIDEO|><|vision_eos|>{prompt}` (the chat template's own layout), so the decoder reads
<|vision_bos|><|audio_bos|> [V chunk][A chunk] ... <|audio_eos|><|vision_eos|> with TMRoPE ids (omni_rope), plain
causal attention. A video without an audio stream gets video tokens only; an audio-only file <|audio_bos|>...<|audio_eos|>.
The pieces are avnano's own: decoder.Decoder (with mrope_section), lora.py, generate.py. Not implemented: the
talker / token2wav (speech output; captions are text), images as separate inputs.
Frames: media.load_clip(frame_indices=model.frame_indices) decodes qwen-omni-utils' frames (omni_frames).
Departure: a waveform of exact zeros (load_clip's fill for a video without audio) counts as no audio, as the reference
does for a missing audio stream.
"""
import functools
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora
from .decoder import Decoder
from .errors import InputError
from .generate import generate
from .interleave import omni_chunked_order
from .layout import Layout, attention_mask
from .omni_audio import OmniAudio, audio_features, audio_token_count
from .omni_load import TOKEN_TEXT, keymap, load_weights, omni_config, param_fields, params_on_meta, read_headers
from .omni_rope import omni_position_ids
from .omni_video import sample_indices, video_inputs
from .omni_vision import OmniVision
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


class OmniThinker(nn.Module):
    omni = True  # checkpoint.save_model / load_model and training.build_model branch on this

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
        with return_video_kwargs=True, as a list, and transformers 5.24 divides by a scalar fps)."""
        c = self.cfg
        video = None
        if len(frames):
            pixels, grid, _ = video_inputs(frames, c.fps, min_pixels=c.min_pixels, max_pixels=c.max_pixels)
            video = pixels, tuple(int(g) for g in grid[0]), c.vision.temporal_patch_size / c.fps
        mel = audio_features(wav) if len(wav) and bool(wav.any()) else None
        return video, mel

    def encode(self, inputs):
        """[(video, mel)] from preprocess -> [OmniBlock]: every clip's pixels through the vision tower in one call, every
        clip's audio through the audio tower in another, then each clip's block laid out (interleave.omni_chunked_order)."""
        c, ids, merge = self.cfg, self.ids, self.cfg.vision.spatial_merge_size
        videos = [v for v, _ in inputs if v is not None]
        grids = [tuple(int(x) for x in v[1]) for v in videos]
        visual = iter(self.visual(torch.cat([v[0] for v in videos]).to(self.device, self.dtype), grids).split(
            [t * h * w // merge ** 2 for t, h, w in grids])) if videos else iter(())
        mels = [m for _, m in inputs if m is not None]
        audio = iter(self.audio_tower([m.to(self.device, self.dtype) for m in mels]).split(
            [audio_token_count(m.shape[-1]) for m in mels])) if mels else iter(())
        blocks = []
        for v, m in inputs:
            vt, at = next(visual) if v is not None else None, next(audio) if m is not None else None
            grid, spg = ([tuple(int(x) for x in v[1])], v[2]) if v is not None else ([], 1.0)
            if vt is not None and at is not None:
                idx = omni_chunked_order(grid[0], spg, len(at), c.rope)
                tokens = torch.cat([vt, at])[torch.as_tensor(idx, device=vt.device)]
                body = [ids["audio"] if i >= len(vt) else ids["video"] for i in idx.tolist()]
                block = [ids["vbos"], ids["abos"]] + body + [ids["aeos"], ids["veos"]]
            elif vt is not None:
                tokens, block = vt, [ids["vbos"]] + [ids["video"]] * len(vt) + [ids["veos"]]
            elif at is not None:
                tokens, block = at, [ids["abos"]] + [ids["audio"]] * len(at) + [ids["aeos"]]
            else:
                raise InputError("clip", "neither frames nor audio to caption")
            blocks.append(OmniBlock(block, tokens, grid, spg))
        return blocks

    def av_block(self, frames_list, frame_times_list, audio_list):
        """Per clip an OmniBlock; and a zero (no OT loss). TMRoPE times temporal patch k at k * second_per_grid (see
        preprocess), not by the frames' timestamps (frame_times_list is unused), as the processor does."""
        return self.encode([self.preprocess(f, a) for f, a in zip(frames_list, audio_list)]), torch.zeros((), device=self.device)

    # ----------------------------------------------------------------------------------- prompt and layout
    def render(self, caption=None, prompt=None):
        """ChatML ids + loss mask: (system,) user = the video tag + the instruction, (caption)."""
        msgs = ([{"role": "system", "content": self.cfg.system}] if self.cfg.system else []) + \
               [{"role": "user", "content": VIDEO_TAG + (prompt or self.cfg.prompt)}]
        return self.tok.render(msgs, completion=caption)

    def completion_ids(self, caption):
        ids, mask = self.render(caption)
        return [i for i, m in zip(ids, mask) if m]

    def _row(self, block, ids, loss_mask):
        """One sample: (input ids, embeddings, 3-D positions, AV flags, shifted labels) before padding."""
        k = ids.index(self.ids["video"])  # the prompt's placeholder; one sampled later stays a token
        if ids[k - 1] != self.ids["vbos"] or ids[k + 1] != self.ids["veos"]:
            raise ValueError("the rendered prompt does not hold <|vision_bos|><|VIDEO|><|vision_eos|>")
        full = ids[:k - 1] + block.ids + ids[k + 2:]
        ids_t = torch.tensor(full, device=self.device)
        x = self.decoder.embed(ids_t)
        is_av = torch.zeros(len(full), dtype=torch.bool, device=self.device)
        is_av[k - 1:k - 1 + len(block.ids)] = True
        slots = is_av & ((ids_t == self.ids["video"]) | (ids_t == self.ids["audio"]))
        x = x.masked_scatter(slots[:, None], block.feats.to(x.dtype))
        pos, _ = omni_position_ids(full, self.cfg.rope, video_grid_thw=block.grid or None,
                                   second_per_grid=[block.second_per_grid] * len(block.grid) or None)
        labels = torch.full((len(full),), -100, dtype=torch.long, device=self.device)
        if loss_mask is not None:
            lm = [0] * (k - 1) + [0] * len(block.ids) + list(loss_mask[k + 2:])
            tgt = torch.where(torch.tensor(lm, device=self.device).bool(), ids_t, -100)
            labels[:-1] = tgt[1:]  # position t predicts token t+1
        return x, pos.to(self.device), is_av, labels

    def layout(self, blocks, ids_list, loss_masks=None, left_pad=False) -> Layout:
        """A padded batch (right-padded, or left-padded for generation); positions are (3, B, L)."""
        rows = [self._row(b, list(ids), None if loss_masks is None else loss_masks[i]) for i, (b, ids) in enumerate(zip(blocks, ids_list))]
        L, B, D = max(len(r[0]) for r in rows), len(rows), rows[0][0].shape[-1]
        dev = self.device
        out = Layout(torch.zeros(B, L, D, device=dev, dtype=rows[0][0].dtype), torch.ones(3, B, L, dtype=torch.long, device=dev),
                     torch.zeros(B, L, dtype=torch.bool, device=dev), torch.zeros(B, L, dtype=torch.bool, device=dev),
                     torch.full((B, L), -100, dtype=torch.long, device=dev))
        for b, (x, pos, is_av, labels) in enumerate(rows):
            s = slice(L - len(x), L) if left_pad else slice(0, len(x))
            out.embeds[b, s], out.positions[:, b, s], out.is_av[b, s], out.valid[b, s], out.labels[b, s] = x, pos, is_av, True, labels
        return out

    # ----------------------------------------------------------------------------------- training / scoring / sampling
    def hidden_states(self, blocks, ids, loss_masks=None, word_dropout=0.0):
        """Decoder hidden states and the layout (model.AVCaptioner.hidden_states, with Omni's layout and causal mask)."""
        x = self.layout(blocks, ids, loss_masks)
        if word_dropout > 0:
            caption = torch.zeros_like(x.valid)
            caption[:, 1:] = x.labels[:, :-1] != -100
            drop = caption & (torch.rand(caption.shape, device=caption.device) < word_dropout)
            x = x._replace(embeds=x.embeds.masked_fill(drop[..., None], 0.0))
        h = self.decoder(inputs_embeds=x.embeds, positions=x.positions, mask=attention_mask("causal", x.is_av, x.valid),
                         return_hidden=True)
        return h, x

    def forward(self, frames, frame_times, audio, ids, loss_mask, return_hidden=False, ground=None):
        """A batch of clips with tokenised (prompt + caption) -> dict(loss, ce, ot, ground, n_tokens, n_seq)."""
        blocks, zero = self.av_block(frames, frame_times, audio)
        h, x = self.hidden_states(blocks, ids, loss_mask, self.cfg.word_dropout if self.training else 0.0)
        sel = x.labels != -100
        ce = F.cross_entropy(self.decoder.logits(h[sel]).float(), x.labels[sel], label_smoothing=self.cfg.label_smoothing)
        out = dict(loss=ce, ce=ce, ot=zero, ground=zero, n_tokens=int(sel.sum()), n_seq=int(x.valid.sum()))
        if return_hidden:
            out.update(hidden=h, is_av=x.is_av)
        return out

    def completion_logprobs(self, blocks, completions, temperature=1.0, prompt=None):
        """(B, T) log-probs of given completion ids after the prompt (logits / temperature) and their float mask."""
        prompt_ids = self.render(prompt=prompt)[0]
        ids = [prompt_ids + list(c) for c in completions]
        h, x = self.hidden_states(blocks, ids, [[0] * len(prompt_ids) + [1] * len(c) for c in completions])
        sel = x.labels != -100
        logp = torch.log_softmax(self.decoder.logits(h[sel]).float() / temperature, -1).gather(-1, x.labels[sel][:, None])[:, 0]
        lengths = torch.tensor([len(c) for c in completions], device=self.device)
        mask = torch.arange(int(lengths.max()), device=self.device)[None] < lengths[:, None]
        out = torch.zeros(mask.shape, device=self.device)
        out[mask] = logp
        return out, mask.float()

    @torch.no_grad()
    def generate(self, frames, frame_times, audio, prompt=None, return_ids=False, blocks=None, **sampling):
        """Captions (list of str) for a batch of clips (or encoded `blocks`); sampling kwargs as generate.generate."""
        blocks = blocks if blocks is not None else self.av_block(frames, frame_times, audio)[0]
        x = self.layout(blocks, [self.render(prompt=prompt)[0] for _ in blocks], left_pad=True)
        out = generate(self.decoder, inputs_embeds=x.embeds, attention_mask=x.valid, positions=x.positions,
                       eos_ids=self.tok.eos_ids, pad_id=self.tok.pad_id, **sampling)
        stop = set(self.tok.eos_ids) | {self.tok.pad_id}
        texts = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(self.tok.decode(row[:cut]))
        return (texts, out) if return_ids else texts

    # ----------------------------------------------------------------------------------- parameter groups
    def param_groups(self):
        """name -> vit | audio | aligners (the vision merger, the audio tower's ln_post + proj) | decoder | lora."""
        groups = {}
        for name, _ in self.named_parameters():
            if "lora_" in name:
                groups[name] = "lora"
            elif name.startswith(("visual.merger.", "audio_tower.ln_post.", "audio_tower.proj.")):
                groups[name] = "aligners"
            else:
                groups[name] = {"visual": "vit", "audio_tower": "audio"}.get(name.split(".")[0], "decoder")
        return groups

    def set_trainable(self, groups):
        unknown = set(groups) - {"vit", "audio", "aligners", "decoder", "lora"}
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}")
        owner = self.param_groups()
        for name, p in self.named_parameters():
            p.requires_grad_(owner[name] in groups)

    @property
    def device(self):
        return self.decoder.embed.weight.device

    @property
    def dtype(self):
        return self.decoder.embed.weight.dtype


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
