"""Qwen2.5-Omni's video processor written out: frame sampling, smart_resize, normalisation, temporal patching.

What the official pipeline does (qwen-omni-utils' `fetch_video`, then transformers' Qwen2-VL video processor):
1. Frames (`sample_indices`): n = total_frames / video_fps * fps (fps 2), clamped to [min_frames (4), max_frames
   (768, at most total_frames)], floored to an even count; frame i of n is `round(linspace(0, total - 1, n)[i])`;
   the sampled rate is n / total_frames * video_fps. (Rule of qwen-omni-utils `smart_nframes` + its readers;
   transformers' own `Qwen2VLVideoProcessor.sample_frames`, off by default, spaces frames as arange(0, T, T/n).)
2. Size (`frame_size`): `smart_resize` to multiples of 28 (patch 14 x merge 2) with min_pixels <= h*w <= max_pixels,
   where max_pixels = max(min(768*28*28, total_pixels / n * 2), 1.05 * min_pixels): a long video gets smaller frames.
3. Resize: bicubic with antialiasing, uint8 in and out. "torch" (default) does what torchvision's tensor resize does on
   the CPU (qwen-omni-utils, transformers' video processor): torch's uint8 antialiased-bicubic kernel, within one grey
   level of PIL's. Always on the CPU (frames given on a GPU are copied back first): torchvision on a GPU interpolates
   in float32 and rounds, a few levels off at sharp edges, and training must see what sampling sees. "pil" is PIL's
   bicubic (Pillow needed), as `Qwen2VLImageProcessorPil` and qwen-omni-utils' image path.
4. Rescale by 1/255, normalise with the OpenAI CLIP mean/std (float32).
5. Temporal patching (`patchify`): an odd frame count repeats the last frame; frames 2g, 2g+1 form group g, which
   spans 2 / sample_fps seconds (1 s at 2 fps): group_times[g] = g * 2 / sample_fps, the processor's
   `video_second_per_grid`. Flatten order: groups, then 2 x 2 merge blocks row-major, then the block's patches
   row-major; each patch's values as (channel, frame in group, y, x), i.e. what the tower's Conv3d reads.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from .vit import CLIP_MEAN, CLIP_STD

FPS, FRAME_FACTOR, MIN_FRAMES, MAX_FRAMES = 2.0, 2, 4, 768
IMAGE_FACTOR = 28                                        # patch 14 x spatial merge 2
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)         # qwen-omni-utils' default budget for a whole video
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28


def sample_count(total_frames, video_fps, fps=FPS, min_frames=MIN_FRAMES, max_frames=MAX_FRAMES):
    """How many frames to take from a clip of total_frames at video_fps (an even number, see the module doc)."""
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"a clip of {total_frames} frame(s) is too short: Qwen2.5-Omni needs at least {FRAME_FACTOR}")
    return n


def sample_indices(total_frames, video_fps, fps=FPS, min_frames=MIN_FRAMES, max_frames=MAX_FRAMES):
    """-> (frame indices to keep, the sampled frame rate)."""
    n = sample_count(total_frames, video_fps, fps, min_frames, max_frames)
    return torch.linspace(0, total_frames - 1, n).round().long().tolist(), n / total_frames * video_fps


def smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS):
    """The size nearest (height, width) with both sides multiples of factor and min_pixels <= h*w <= max_pixels,
    keeping the aspect ratio (qwen-omni-utils / transformers' smart_resize; a side never drops below factor)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def frame_size(n_frames, height, width, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
               total_pixels=VIDEO_TOTAL_PIXELS):
    """The frame size of a video of n_frames sampled frames: a per-frame share of the total budget."""
    cap = max(min(max_pixels, total_pixels / n_frames * FRAME_FACTOR), int(min_pixels * 1.05))
    return smart_resize(height, width, IMAGE_FACTOR, min_pixels, cap)


def resize(frames, size, backend="torch"):
    """uint8 (T, H, W, 3) -> uint8 (T, 3, h, w) on the CPU, bicubic with antialiasing (see the module doc, 3.)."""
    x = torch.as_tensor(frames).cpu()
    if tuple(x.shape[1:3]) == tuple(size):
        return x.permute(0, 3, 1, 2).contiguous()
    if backend == "pil":
        from PIL import Image
        out = [np.asarray(Image.fromarray(f).resize(size[::-1], Image.Resampling.BICUBIC)) for f in x.numpy()]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    if backend != "torch":
        raise ValueError(f"unknown resize backend {backend!r} (torch, pil)")
    return F.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=size, mode="bicubic", antialias=True, align_corners=False)


def normalise(x):
    """uint8 (T, 3, h, w) -> float32: rescale to [0, 1], then (x - mean) / std with the OpenAI CLIP constants."""
    mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x.float() / 255 - mean) / std


def patchify(x, patch=14, temporal=2, merge=2):
    """(T, C, H, W) -> pixel_values (P, C*temporal*patch*patch), (t, h, w) grid in patches (t in frame groups).
    An incomplete last group repeats the last frame. Order: see the module doc (5.)."""
    T, C, H, W = x.shape
    if pad := -T % temporal:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, h, w = x.shape[0] // temporal, H // patch, W // patch
    x = x.reshape(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # group, block row, block col, row in block, col in block | c, frame, y, x
    return x.reshape(t * h * w, C * temporal * patch * patch), (t, h, w)


def video_inputs(frames, sample_fps, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
                 total_pixels=VIDEO_TOTAL_PIXELS, backend="torch"):
    """Sampled frames uint8 (T, H, W, 3) at sample_fps -> (pixel_values float32 (P, 1176), grid_thw (1, 3) long,
    group_times (t,) float64 seconds)."""
    T, H, W, _ = frames.shape
    x = normalise(resize(frames, frame_size(T, H, W, min_pixels, max_pixels, total_pixels), backend))
    pixel_values, grid = patchify(x)
    group_times = torch.arange(grid[0], dtype=torch.float64) * FRAME_FACTOR / sample_fps
    return pixel_values, torch.tensor([grid]), group_times


def image_inputs(image, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, backend="torch"):
    """One uint8 image (H, W, 3) -> (pixel_values (P, 1176), grid_thw (1, 3)): a video of that frame twice."""
    x = normalise(resize(torch.as_tensor(image)[None], smart_resize(*image.shape[:2], IMAGE_FACTOR, min_pixels, max_pixels), backend))
    pixel_values, grid = patchify(x)
    return pixel_values, torch.tensor([grid])
