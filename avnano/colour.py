"""Attribute-factored visual tokens (ours): a shape-blind colour stream next to a ViT that is trained colour-blind.

A ViT patch embedding sees a patch's colour and outline together, and what it learns is tied to the pairs it was
trained on: the toy world's training split never shows a red triangle, and a captioner with the ViT alone named
3 % of unseen-pair objects right (README). Here a frame's visual token is the sum of two parts that can each carry
only one attribute, each through its own aligner (model.encode_visual):
- the colour stream: a learned per-pixel feature max-pooled over each patch, a bag of the colours present, and of
  the colours that rose or fell in some quarter of the patch since the previous frame (the same vectors for any
  outline of the same colour: shape-blind by construction);
- the ViT, fed during training the frames of each clip through one random 3 x 3 colour mix (SimCLR's colour
  distortion, Chen et al. 2020), so its features of an outline cannot depend on the colour it comes in.
A pair never trained on is then the sum of two parts that each were. Tried and dropped (README): fusing the two per
patch before the frame's merge (it keeps which colour goes with which outline, and lets the colour read depend on the
outline again).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ColourStream(nn.Module):
    """Pixels (N, 3, S, S), normalised -> (N, grid * grid, width * 3) per patch: the max over the patch's pixels of one
    learned per-pixel feature layer f (a 1 x 1 convolution and GELU; the colours present), and with prev (each frame's
    predecessor index) the max of f's rise and of its fall since the previous frame, taken per quarter-patch cell before
    the patch's max (the colours of whatever appeared, left or moved: a change of the patch's own max would miss an
    object that moves inside the patch). Read at half resolution (2 x 2 means): colour needs no fine detail, and a
    full-resolution pass costs several times the whole tiny ViT (0.21 s against 0.05 s for a forward + backward of 256
    frames on one core); rises taken per pixel instead of per cell cost 4x the rest of the stream."""

    def __init__(self, patch_size, width, pool=2):
        super().__init__()
        self.patch_size, self.pool = patch_size, pool
        self.pixel = nn.Conv2d(3, width, 1)

    def forward(self, pixels, prev=None):
        f = F.gelu(self.pixel(F.avg_pool2d(pixels, self.pool)))
        cells = F.max_pool2d(f, self.patch_size // (2 * self.pool))  # 2 x 2 cells per patch
        out = F.max_pool2d(cells, 2)
        if prev is not None:
            d = cells - cells[prev]
            out = torch.cat([out, F.max_pool2d(d, 2).clamp(min=0), F.max_pool2d(-d, 2).clamp(min=0)], 1)
        return out.flatten(2).transpose(1, 2)


def colour_mixed(frames, counts, p=1.0):
    """uint8 frames (N, H, W, 3) of len(counts) clips -> float frames in [0, 255] where each clip, with probability p, is
    seen through its own random 3 x 3 channel mix (entries uniform in [0, 1]). Drawn on the frames' device (no sync)."""
    dev, n = frames.device, len(counts)
    mix = torch.rand(n, 3, 3, device=dev)
    keep = torch.rand(n, device=dev) >= p
    mix = torch.where(keep[:, None, None], torch.eye(3, device=dev), mix)
    clip = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(counts, device=dev), output_size=len(frames))
    return torch.einsum("nhwc,ndc->nhwd", frames.float(), mix[clip]).clamp(0, 255)
