"""Model FLOPs of a training step from a written formula, and MFU = FLOPs / (seconds x peak per GPU x GPUs).

The formula (Kaplan et al. 2020, Sec. 2.1; PaLM, Chowdhery et al. 2022, App. B), counted per weight matrix: a
matrix of N entries applied to T tokens costs 2NT forward; the backward adds 2NT for its input's gradient when
gradients pass through it (something before it trains) and 2NT for its own gradient when it trains. Hence:
    6N per token  trained weights;
    4N per token  frozen weights that gradients pass through (a LoRA-frozen decoder: the aligners before it train),
                  and trained weights whose input is data (the ViT's patch embedding, Whisper's first conv, the
                  clock's linear map: no gradient for pixels, mel or times);
    2N per token  towers that run without gradients (a frozen encoder: nothing before it trains).
Gradients pass through a unit (a tower, an aligner) when it or anything before it trains (approximation: a trained
aligner's first layer after a frozen encoder is charged 6N, though its input needs no gradient).
Attention: Q K^T and P V cost 2 x 2 x d FLOPs per (query, key) pair a layer forward (d = heads x head dim), twice
that again backward when gradients pass through. Pairs are what the mask allows between real tokens: a ViT
frame's T^2, an audio segment's T^2 over its real tokens, the decoder's causal L(L+1)/2 plus, under the AVCap
prefix mask, k*n + n(n-1)/2 for n AV tokens after k prompt tokens (layout.attention_mask).
Token counts per tower, as the model computes them: ViT tokens per frame (grid^2, + the CLIP class token), the
aligners' after merging (tokens_per_frame) and windowing (Q-Former: n_queries per window), each audio segment's
mel frames and encoder tokens (after the stride-2 conv and pooling), the interleaver's AV block (per_frame and
AVTI resample the audio), the decoder's prompt + AV block + caption, and logits only where a label is.
Left out (each well under 1 % at the presets): biases, norms, activations, softmax, RoPE, position / segment /
time-embedding adds, merging and pooling, SigLIP's MAP head, the OT loss's Sinkhorn iterations, and the grounding
loss's logits on AV tokens inside event spans (at most n_av x 2 x dim x vocab forward). Gradient checkpointing
recomputes forwards: not counted (model FLOPs, not hardware FLOPs, as PaLM's MFU).
"""
import math

import torch.nn as nn

from .audio import segment_sizes
from .lora import LoRALinear

PEAK_FLOPS = {"H100/H200 SXM bf16 dense": 989e12}  # DESIGN.md section 11


def mfu(flops_per_rank, seconds, peak_per_gpu):
    """Model FLOPs utilisation of one rank: its FLOPs over one GPU's peak. Ranks run equal batches, so this equals all
    ranks' FLOPs over (peak per GPU x ranks); the old log line multiplied by the ranks and divided by one peak."""
    return flops_per_rank / (seconds * peak_per_gpu)


def _weights(modules):
    """(trainable, frozen) entries of the Linear / Conv weight matrices (LoRA adapters included) in modules."""
    t = f = 0
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                for p in [m.weight] + ([m.lora_A, m.lora_B] if isinstance(m, LoRALinear) else []):
                    t, f = (t + p.numel(), f) if p.requires_grad else (t, f + p.numel())
            elif isinstance(m, nn.MultiheadAttention):  # q, k, v packed in one parameter (out_proj is a Linear)
                p = m.in_proj_weight
                t, f = (t + p.numel(), f) if p.requires_grad else (t, f + p.numel())
    return t, f


def _mm(weights, tokens, grad_in):
    """Matmul FLOPs of (trainable, frozen) weights applied to `tokens` tokens: 6N / 4N / 2N per token."""
    t, f = weights
    return tokens * (2 * (t + f) + (2 * (t + f) if grad_in else 0) + 2 * t)


def _attn(pairs, d, grad_in):
    return 4 * d * pairs * (3 if grad_in else 1)


def _trains(module):
    return any(p.requires_grad for p in module.parameters())


class FlopCounter:
    """FLOPs of forward + backward of model(...) on a micro-batch. Built after set_trainable (it reads which weights
    train once); batch() needs only host numbers (shapes, ids), so counting never waits on the device."""

    def __init__(self, model):
        self.cfg, m, self.av_id = model.cfg, model, model.av_id
        self.vit_trains, self.audio_trains = _trains(m.vit), _trains(m.audio)
        self.va_grad = self.vit_trains or _trains(m.visual_aligner)  # gradients pass through the visual aligner
        self.aa_grad = self.audio_trains or _trains(m.audio_aligner)
        self.any_trains = _trains(m)  # gradients pass through the decoder whenever anything trains
        self.vit_stem, self.vit_blocks = _weights([m.vit.patch_embed]), _weights(m.vit.blocks)
        self.conv1, self.conv2, self.audio_blocks = _weights([m.audio.conv1]), _weights([m.audio.conv2]), _weights(m.audio.blocks)
        self.visual_aligner = _weights([m.visual_aligner])
        cs = m.colour_stream  # colour.py: a per-pixel layer at 1 / pool resolution, and its own aligner
        self.colour = (_weights([cs]), cs.pool, _weights([m.colour_aligner]), _trains(m.colour_aligner)) if cs else None
        self.qformer = hasattr(m.audio_aligner, "queries")
        if self.qformer:
            q = m.audio_aligner
            D, trains = q.queries.shape[1], q.attn.in_proj_weight.requires_grad
            kv = 2 * D * D  # the k and v thirds of in_proj apply to every frame, the q third only to the queries
            self.kv = (kv, 0) if trains else (0, kv)
            t, f = _weights([q])
            self.per_query = (t - self.kv[0], f - self.kv[1])
            self.frames_per_window, self.n_queries = q.frames_per_window, q.n_queries
        else:
            self.audio_aligner = _weights([m.audio_aligner])
        self.time_embed = _weights([m.time_embed]) if m.time_embed is not None else (0, 0)
        self.decoder_blocks = _weights(m.decoder.blocks)
        head = m.decoder.embed.weight if m.decoder.lm_head is None else m.decoder.lm_head.weight
        self.head = (head.numel(), 0) if head.requires_grad else (0, head.numel())

    # ------------------------------------------------------------------------------- token counts (host numbers)
    def audio_segments(self, audio):
        """[(mel frames, encoder tokens of real audio)] per segment of a waveform or of MelSegments."""
        return segment_sizes(audio, self.cfg.audio)

    def av_tokens(self, n_visual, n_frames, n_audio):
        """Tokens of the AV block the interleaver makes from n_visual visual and n_audio audio tokens."""
        kind = self.cfg.interleave
        if kind == "per_frame" and n_frames:
            return n_visual + n_frames * math.ceil(n_audio / n_frames)
        if kind == "avti" and n_visual:
            return round(n_visual / (1.0 - self.cfg.air)) if n_audio else n_visual
        return n_visual + n_audio

    # ------------------------------------------------------------------------------- FLOPs
    def clip(self, n_frames, audio, n_ids, placeholder, n_labels):
        """FLOPs of one clip: n_frames frames, its audio (waveform or MelSegments), n_ids prompt + caption ids with
        the AV placeholder at index `placeholder`, and n_labels label positions (caption tokens trained on)."""
        cfg, flops = self.cfg, 0
        n_visual = n_audio = 0
        if "v" in cfg.modalities and n_frames:
            v = cfg.vit
            per_image = v.grid ** 2 + (1 if v.family == "clip" else 0)
            flops += _mm(self.vit_stem, n_frames * v.grid ** 2, False)
            flops += _mm(self.vit_blocks, n_frames * per_image, self.vit_trains)
            flops += v.n_layers * _attn(n_frames * per_image ** 2, v.dim, self.vit_trains)
            n_visual = n_frames * cfg.tokens_per_frame
            flops += _mm(self.visual_aligner, n_visual, self.va_grad)
            if self.colour:
                pixel, pool, aligner, grad = self.colour
                flops += _mm(pixel, n_frames * (v.image_size // pool) ** 2, False) + _mm(aligner, n_visual, grad)
        if "a" in cfg.modalities:
            a = cfg.audio
            for mel_frames, real in self.audio_segments(audio):
                stem, tokens = -(-mel_frames // 2), a.n_tokens(mel_frames)
                flops += _mm(self.conv1, mel_frames, False) + _mm(self.conv2, stem, self.audio_trains)
                flops += _mm(self.audio_blocks, tokens, self.audio_trains)
                flops += a.n_layers * _attn(tokens ** 2, a.dim, self.audio_trains)
                if self.qformer:
                    queries = math.ceil(real / self.frames_per_window) * self.n_queries
                    flops += _mm(self.kv, real, self.aa_grad) + _mm(self.per_query, queries, self.aa_grad)
                    flops += _attn(self.n_queries * real, a.dim, self.aa_grad)
                    n_audio += queries
                else:
                    flops += _mm(self.audio_aligner, real, self.aa_grad)
                    n_audio += real
        n_av = self.av_tokens(n_visual, n_frames if "v" in cfg.modalities else 0, n_audio)
        flops += _mm(self.time_embed, n_av, False)
        d = cfg.decoder
        L = n_ids - 1 + n_av
        pairs = L * (L + 1) // 2 + (placeholder * n_av + n_av * (n_av - 1) // 2 if cfg.mask == "prefix" else 0)
        flops += _mm(self.decoder_blocks, L, self.any_trains) + d.n_layers * _attn(pairs, d.n_heads * d.head_dim, self.any_trains)
        return flops + _mm(self.head, n_labels, self.any_trains)

    def batch(self, items, ids, loss_masks):
        """FLOPs of model(frames, times, audio, ids, loss_masks) forward + backward; items = [(row, frames, times,
        audio)] as data.Loader yields them, ids / loss_masks as model.render gives them."""
        total = 0
        for (_, frames, _, audio), row_ids, mask in zip(items, ids, loss_masks):
            k = list(row_ids).index(self.av_id)
            total += self.clip(len(frames), audio, len(row_ids), k, sum(mask[k + 1:]))
        return total
