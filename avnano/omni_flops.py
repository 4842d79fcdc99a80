"""Model FLOPs of a Qwen2.5-Omni thinker training step (the MFU numerator of train_sft.py), flops.py's formula on its towers.

Per weight matrix 6N / 4N / 2N per token (trained / gradients pass through / no gradient), attention 2 x 2 x d per
(query, key) pair a layer, x3 when gradients pass (flops.py). Token counts from host numbers only: the frame size
after smart_resize (omni_video.frame_size) gives the patch grid; vision attention pairs are windows of
window_size / 14 patches on a side (edge windows clipped) in the window blocks and a whole frame group in the
full-attention blocks; audio: ceil(T / 2) tokens after the stride-2 conv, attention within 2 s chunks (n_window
tokens); the decoder: causal over prompt + AV block + caption. Left out as in flops.py: biases, norms, activations.
"""
from .flops import _attn, _mm, _trains, _weights
from .omni_audio import MAX_FRAMES, audio_token_count
from .omni_video import frame_size


def _matrix(w):
    """(trainable, frozen) entries of one weight (the Conv3d patch embedding, the output head)."""
    return (w.numel(), 0) if w.requires_grad else (0, w.numel())


class OmniFlopCounter:
    def __init__(self, model):
        self.model, m, v, a = model, model, model.visual, model.audio_tower
        # gradients pass through a tower's blocks when they or its stem train; through its aligner (the merger; ln_post +
        # proj) when anything in the tower trains (flops.py's rule: a unit passes gradients when it or anything before does)
        self.vision_trains = _trains(v.patch_embed) or _trains(v.blocks)
        self.audio_trains = _trains(a.conv1) or _trains(a.conv2) or _trains(a.blocks)
        self.merger_grad, self.proj_grad, self.any_trains = _trains(v), _trains(a), _trains(m)
        self.patch, self.vblocks, self.merger = _matrix(v.patch_embed.proj.weight), _weights(v.blocks), _weights([v.merger])
        self.conv1, self.conv2 = _weights([a.conv1]), _weights([a.conv2])
        self.ablocks, self.proj = _weights(a.blocks), _weights([a.proj])
        self.dblocks = _weights(m.decoder.blocks)
        self.head = _matrix(m.decoder.embed.weight if m.decoder.lm_head is None else m.decoder.lm_head.weight)

    def clip(self, frames, n_samples, n_ids, n_labels):
        """FLOPs of one clip: frames (n, H, W, 3), n_samples of 16 kHz audio (0: none), n_ids rendered ids, n_labels."""
        c, v, a = self.model.cfg, self.model.cfg.vision, self.model.cfg.audio
        flops, n_av = 0, 2 if len(frames) else 0
        if len(frames):
            h, w = frame_size(len(frames), frames.shape[1], frames.shape[2], c.min_pixels, c.max_pixels)
            gh, gw, t = h // v.patch_size, w // v.patch_size, -(-len(frames) // v.temporal_patch_size)
            P, side = t * gh * gw, v.window_size // v.patch_size
            windows = sum((min(side, gh - i) * min(side, gw - j)) ** 2 for i in range(0, gh, side) for j in range(0, gw, side))
            full = len(v.fullatt_block_indexes)
            pairs = t * ((v.depth - full) * windows + full * (gh * gw) ** 2)
            flops += _mm(self.patch, P, False) + _mm(self.vblocks, P, self.vision_trains)
            flops += _attn(pairs, v.hidden_size, self.vision_trains)
            flops += _mm(self.merger, P // v.spatial_merge_size ** 2, self.merger_grad)
            n_av += P // v.spatial_merge_size ** 2
        if n_samples:
            T = min(-(-n_samples // 160), MAX_FRAMES)  # the features' cap (omni_audio.audio_features)
            stem, n = -(-T // 2), audio_token_count(T)
            chunk = a.n_window  # tokens of a 2 s chunk after the stride-2 conv
            pairs = a.n_layers * sum(min(chunk, stem - s) ** 2 for s in range(0, stem, chunk))
            flops += _mm(self.conv1, T, False) + _mm(self.conv2, stem, self.audio_trains)
            flops += _mm(self.ablocks, stem, self.audio_trains) + _attn(pairs, a.dim, self.audio_trains)
            flops += _mm(self.proj, n, self.proj_grad)
            n_av += n + 2
        d = c.decoder
        L = n_ids - 3 + n_av
        flops += _mm(self.dblocks, L, self.any_trains) + d.n_layers * _attn(L * (L + 1) // 2, d.n_heads * d.head_dim, self.any_trains)
        return flops + _mm(self.head, n_labels, self.any_trains)

    def batch(self, items, ids, loss_masks):
        """flops.FlopCounter.batch for the thinker: items = [(row, frames, times, audio)] as data.Loader yields them (on the
        host for the thinker, train_sft.py: reading the audio is no device read); all-zero audio counts as none."""
        return sum(self.clip(frames, len(audio) if len(audio) and bool(audio.any()) else 0, len(i), sum(m))
                   for (_, frames, _, audio), i, m in zip(items, ids, loss_masks))

