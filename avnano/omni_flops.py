"""Model FLOPs of a Qwen2.5-Omni thinker training step (the MFU numerator of train_sft.py), flops.py's formula on its towers.

Per weight matrix 6N / 4N / 2N per token (trained / gradients pass through / no gradient), attention 2 x 2 x d per
(query, key) pair a layer, x3 when gradients pass (flops.py). Token counts from host numbers only: the frame size
after smart_resize (omni_video.frame_size) gives the patch grid; vision attention pairs are windows of
window_size / 14 patches on a side (edge windows clipped) in the window blocks and a whole frame group in the
full-attention blocks; audio: ceil(T / 2) tokens after the stride-2 conv, attention within 2 s chunks (n_window
tokens); the decoder: causal over prompt + AV block + caption. Left out as in flops.py: biases, norms, activations.
"""
from .flops import _attn, _mm, _trains, _weights
from .omni_audio import audio_token_count
from .omni_video import frame_size


class OmniFlopCounter:
    def __init__(self, model):
        self.model, m = model, model
        self.vision_trains, self.audio_trains = _trains(m.visual), _trains(m.audio_tower)
        self.any_trains = _trains(m)
        self.patch, self.vblocks, self.merger = _weights([m.visual.patch_embed]), _weights(m.visual.blocks), _weights([m.visual.merger])
        self.conv1, self.conv2 = _weights([m.audio_tower.conv1]), _weights([m.audio_tower.conv2])
        self.ablocks, self.proj = _weights(m.audio_tower.blocks), _weights([m.audio_tower.proj])
        self.dblocks = _weights(m.decoder.blocks)
        head = m.decoder.embed.weight if m.decoder.lm_head is None else m.decoder.lm_head.weight
        self.head = (head.numel(), 0) if head.requires_grad else (0, head.numel())

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
            flops += _attn(pairs, v.hidden_size, self.vision_trains) + _mm(self.merger, P // v.spatial_merge_size ** 2, self.any_trains)
            n_av += P // v.spatial_merge_size ** 2
        if n_samples:
            T = -(-n_samples // 160)
            stem, n = -(-T // 2), audio_token_count(T)
            chunk = a.n_window  # tokens of a 2 s chunk after the stride-2 conv
            pairs = a.n_layers * sum(min(chunk, stem - s) ** 2 for s in range(0, stem, chunk))
            flops += _mm(self.conv1, T, False) + _mm(self.conv2, stem, self.audio_trains)
            flops += _mm(self.ablocks, stem, self.audio_trains) + _attn(pairs, a.dim, self.audio_trains)
            flops += _mm(self.proj, n, self.any_trains)
            n_av += n + 2
        d = c.decoder
        L = n_ids - 3 + n_av
        flops += _mm(self.dblocks, L, self.any_trains) + d.n_layers * _attn(L * (L + 1) // 2, d.n_heads * d.head_dim, self.any_trains)
        return flops + _mm(self.head, n_labels, self.any_trains)

    def batch(self, items, ids, loss_masks):
        """flops.FlopCounter.batch for the thinker: items = [(row, frames, times, audio)] as data.Loader yields them."""
        return sum(self.clip(frames, len(audio) if len(audio) and bool(audio.any()) else 0, len(i), sum(m))
                   for (_, frames, _, audio), i, m in zip(items, ids, loss_masks))

