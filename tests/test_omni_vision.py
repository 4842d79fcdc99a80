"""Qwen2.5-Omni / Qwen2.5-VL vision tower and video processor against transformers (tiny random towers built here).
The processor references (Qwen2VLImageProcessorPil, its smart_resize) need Pillow (tests/requirements.txt)."""
import math

import numpy as np
import pytest
import torch

from avnano import omni_video as ov
from avnano.errors import InputError
from avnano.omni_vision import OmniVision, OmniVisionConfig, has_fused_qkv, load_vision, vision_keymap, window_order

TINY = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=24, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[2])


def smooth_frames(T, H, W, seed=0):
    """Frames with smooth colour ramps, a moving rectangle and a little noise (resizing a video behaves so)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    out = []
    for t in range(T):
        img = np.stack([128 + 100 * np.sin(x / 7 + y / 11 + t), 128 + 100 * np.cos(x / 5 - y / 9), (x * 255 // W + y) % 256], -1)
        img[H // 3:H // 2, (5 * t) % W:(5 * t) % W + W // 4] = (250, 20, 30)
        out.append(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def inputs_from_processor():
    """A 5-frame video (odd: the processor repeats the last frame -> 3 groups), an image, and a bare grid whose merged
    sizes exercise every window case at window 56 px = 2 x 2 merged tokens: partial edge windows and an evenly divided
    grid (the reference's padding adds a whole empty window there)."""
    pv1, g1, times = ov.video_inputs(smooth_frames(5, 90, 150), sample_fps=2.0, min_pixels=28 * 28, max_pixels=84 * 140)
    pv2, g2 = ov.image_inputs(smooth_frames(1, 145, 80, seed=1)[0], min_pixels=28 * 28, max_pixels=112 * 112)
    grid = [g1[0].tolist(), g2[0].tolist(), [1, 4, 8]]
    assert grid[0] == [3, 6, 10] and grid[1] == [1, 10, 6] and times.tolist() == [0.0, 1.0, 2.0]
    pv3 = torch.randn(32, pv1.shape[1], generator=torch.Generator().manual_seed(3))
    return torch.cat([pv1, pv2, pv3]), grid


def random_weights(module, std=0.3):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_omni_tower_matches_transformers(dtype, tol):
    from transformers import Qwen2_5OmniVisionEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder
    hf_cfg = Qwen2_5OmniVisionEncoderConfig(**TINY)
    hf_cfg._attn_implementation = "sdpa"  # the eager path upcasts softmax to float32 (a float64 floor)
    hf = random_weights(Qwen2_5OmniVisionEncoder._from_config(hf_cfg, dtype=dtype).eval())
    cfg = OmniVisionConfig.from_json(hf_cfg.to_dict())
    state = {"thinker.visual." + k: v for k, v in hf.state_dict().items()}  # the full Omni checkpoint's layout
    state["thinker.model.embed_tokens.weight"] = torch.zeros(2)  # another part of the file: skipped by name
    assert set(vision_keymap(cfg, "thinker.visual.")) == {k for k in state if k.startswith("thinker.visual.")}
    ours = load_vision(OmniVision(cfg).to(dtype), state, "tiny", prefix="thinker.visual.").eval()
    pixels, grid = inputs_from_processor()
    pixels = pixels.to(dtype)
    hidden = {}  # the last block's output (window order in both): the merger's float32 RMSNorm would hide float64 noise
    hf.blocks[-1].register_forward_hook(lambda m, a, o: hidden.__setitem__("ref", o))
    ours.blocks[-1].register_forward_hook(lambda m, a, o: hidden.__setitem__("ours", o))
    with torch.no_grad():
        ref = hf(pixels, torch.tensor(grid)).pooler_output
        out_t = ours(pixels, torch.tensor(grid))
        out = ours(pixels, grid)
    assert out.shape == ref.shape == (pixels.shape[0] // 4, 24)
    assert (out - ref).abs().max().item() <= tol
    assert (hidden["ours"] - hidden["ref"]).abs().max().item() <= tol * hidden["ref"].abs().max().item()
    assert torch.equal(out, out_t)


def test_fused_qkv_qwen25vl_matches_transformers():
    """Plain Qwen2.5-VL stores q/k/v as one `qkv` Linear; the key map finds it, the numbers agree."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    hf_cfg = Qwen2_5_VLVisionConfig(**TINY)
    hf_cfg._attn_implementation = "sdpa"
    results = []
    for dtype in (torch.float64, torch.float32):
        hf = random_weights(Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_cfg, dtype=dtype).eval())
        state = {"visual." + k: v for k, v in hf.state_dict().items()}
        cfg = OmniVisionConfig.from_json(hf_cfg.to_dict(), fused_qkv=has_fused_qkv(state))
        assert cfg.fused_qkv
        ours = load_vision(OmniVision(cfg).to(dtype), state, "tiny").eval()
        pixels = torch.randn(2 * 6 * 10 + 4 * 8, 1176, dtype=dtype, generator=torch.Generator().manual_seed(1))
        grid = [[2, 6, 10], [1, 4, 8]]
        with torch.no_grad():
            results.append((ours(pixels, grid) - hf(pixels, torch.tensor(grid)).pooler_output).abs().max().item())
    assert results[0] <= 1e-10 and results[1] <= 1e-5, results


def test_window_order_matches_reference_padding_quirk():
    """transformers pads each frame's merged grid by window - (n % window), a whole empty window when n already
    divides, then drops padding and empty windows: the same as tiling with clipped edge windows."""
    from transformers.vision_utils import get_vision_window_index
    grids = [[1, 8, 8], [2, 6, 10], [1, 16, 12], [3, 2, 14], [1, 10, 16]]
    for window_px in (56, 112):
        ref_index, ref_cu = get_vision_window_index(torch.tensor(grids), 2, window_px, 14)
        order, lens = window_order(grids, 2, window_px // 28)
        assert torch.equal(order, ref_index)
        assert torch.equal(torch.tensor([0] + lens).cumsum(0) * 4, ref_cu.long())
    # by hand: a 4 x 6 merged grid in 4 x 4 windows -> a 4 x 4 window, then a 4 x 2 one
    order, lens = window_order([[1, 8, 12]], 2, 4)
    assert lens == [16, 8] and order[:5].tolist() == [0, 1, 2, 3, 6] and order[16:18].tolist() == [4, 5]


def test_key_map_names_every_problem():
    cfg = OmniVisionConfig.from_json(TINY)
    good = {k: v for k, v in OmniVision(cfg).state_dict().items()}
    state = {"visual." + k: v for k, v in good.items()}
    assert len(vision_keymap(cfg)) == len(good) == 2 + 4 + 4 * (2 + 8 + 6)
    del state["visual.blocks.3.attn.k.bias"]
    state["visual.merger.mlp.2.weight"] = torch.zeros(5, 128)
    state["visual.blocks.4.norm1.weight"] = torch.zeros(32)  # a block more than the config says
    with pytest.raises(InputError) as e:
        load_vision(OmniVision(cfg), state, "ckpt")
    msg = str(e.value)
    assert msg.startswith("ckpt: cannot load weights")
    assert "missing key visual.blocks.3.attn.k.bias" in msg and "unexpected key visual.blocks.4.norm1.weight" in msg
    assert "wrong shape for visual.merger.mlp.2.weight: file has (5, 128), model expects (24, 128)" in msg


def test_config_from_json_reads_real_sizes():
    """Qwen2.5-Omni-7B's vision_config as released (sizes differ from transformers' config-class defaults)."""
    d = {"depth": 32, "embed_dim": 1280, "hidden_size": 1280, "hidden_act": "silu", "intermediate_size": 3420,
         "num_heads": 16, "in_channels": 3, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
         "spatial_patch_size": 14, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
         "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 25, "model_type": "qwen2_5_omni_vision_encoder"}
    cfg = OmniVisionConfig.from_json(d)
    assert (cfg.depth, cfg.hidden_size, cfg.out_hidden_size, cfg.window_merged, cfg.patch_dim) == (32, 1280, 3584, 4, 1176)
    assert cfg.fullatt_block_indexes == (7, 15, 23, 31) and cfg.rope_theta == 10000.0
    with pytest.raises(InputError, match="config.json: vision_config lacks out_hidden_size"):
        OmniVisionConfig.from_json({k: v for k, v in d.items() if k != "out_hidden_size"})


def test_frame_sampling_rule():
    # 10 s at 30 fps -> 20 frames at round(i * 299 / 19)
    idx, fps = ov.sample_indices(300, 30.0)
    assert idx == [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283, 299]
    assert fps == 2.0
    assert ov.sample_count(37, 25.0) == 4          # 1.48 s -> 2.96 frames, raised to min_frames 4
    assert ov.sample_count(75, 25.0) == 6          # 3 s -> 6
    assert ov.sample_count(3, 30.0) == 2           # only 3 frames: max_frames floors to the even 2
    assert ov.sample_count(77, 29.97) == 4         # 2.569 s -> 5.14 frames -> floored to even 4
    n = ov.sample_count(90000, 25.0)               # an hour: capped at 768 frames ...
    assert n == 768 and math.isclose(ov.sample_indices(90000, 25.0)[1], 768 / 90000 * 25)  # ... a slower sampled rate
    with pytest.raises(ValueError, match="at least 2"):
        ov.sample_count(1, 30.0)


def test_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    assert ov.frame_size(20, 480, 640) == (476, 644)     # within budget: nearest multiples of 28
    assert ov.frame_size(20, 1080, 1920) == (560, 1008)  # over 768*28*28: scaled down, floored
    assert ov.frame_size(20, 100, 100) == (336, 336)     # under 128*28*28: scaled up, ceiled
    assert ov.frame_size(768, 1080, 1920) == (336, 644)  # 768 frames share 90% of 128k tokens: 235200 px a frame
    for h, w in [(480, 640), (1080, 1920), (100, 100), (37, 1000), (719, 1281), (2000, 50)]:
        for lo, hi in [(128 * 784, 768 * 784), (3136, 12845056)]:
            assert ov.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


@pytest.mark.parametrize("size", [(50, 70), (120, 200), (56, 84)])
def test_pixels_match_transformers_pil_processor(size):
    """Same frames, Qwen2VLImageProcessorPil (transformers' Qwen2-VL video processor needs torchvision, absent here;
    an image is a video of one frame twice). PIL resize: identical; torch resize (torchvision's uint8 CPU kernel):
    within one grey level."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    lo, hi = 28 * 28 * 4, 28 * 28 * 30
    img = smooth_frames(1, *size)[0]
    ref = Qwen2VLImageProcessorPil(size={"shortest_edge": lo, "longest_edge": hi})(images=[img], return_tensors="pt")
    pv, grid = ov.image_inputs(img, lo, hi, backend="pil")
    pv2, grid2, _ = ov.video_inputs(np.stack([img, img]), 2.0, lo, hi, total_pixels=10**9, backend="pil")
    assert torch.equal(grid, ref["image_grid_thw"]) and torch.equal(grid2, grid)
    assert (pv - ref["pixel_values"]).abs().max() <= 1e-6 and torch.equal(pv2, pv)
    pv_t, _ = ov.image_inputs(img, lo, hi, backend="torch")
    level = (pv_t - ref["pixel_values"]).abs() * torch.tensor(ov.CLIP_STD).repeat_interleave(2 * 14 * 14) * 255
    assert level.max() <= (1e-3 if size == (56, 84) else 1.001)  # (56, 84) needs no resize: the same numbers


def test_patchify_flatten_order():
    """Values that encode (t, c, y, x) land where the tower's Conv3d expects them; an odd frame count repeats the last."""
    T, C, H, W, p, m = 3, 3, 56, 84, 14, 2
    t, c, y, x = torch.meshgrid(torch.arange(T), torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    video = (t * 1_000_000 + c * 100_000 + y * 100 + x).double()
    pixels, (gt, gh, gw) = ov.patchify(video)
    assert (gt, gh, gw) == (2, 4, 6) and pixels.shape == (2 * 4 * 6, C * 2 * p * p)
    row, col = torch.meshgrid(torch.arange(pixels.shape[0]), torch.arange(pixels.shape[1]), indexing="ij")
    # row = ((group * gh/m + block_y) * gw/m + block_x) * m*m + in_y * m + in_x
    in_x, in_y = row % m, row // m % m
    block_x, block_y, group = row // (m * m) % (gw // m), row // (m * m * (gw // m)) % (gh // m), row // (gh * gw)
    # col = ((channel * 2 + frame) * p + py) * p + px
    px, py, frame, ch = col % p, col // p % p, col // (p * p) % 2, col // (2 * p * p)
    tt = (2 * group + frame).clamp(max=T - 1)  # frame 3 does not exist: frame 2 repeated
    yy, xx = (block_y * m + in_y) * p + py, (block_x * m + in_x) * p + px
    assert torch.equal(pixels, (tt * 1_000_000 + ch * 100_000 + yy * 100 + xx).double())


def test_backward_with_gradient_checkpointing():
    """Training path: gradients flow through the padded window attention and agree with recomputed blocks."""
    torch.manual_seed(0)
    model = random_weights(OmniVision(OmniVisionConfig.from_json(TINY)), std=0.1).double().train()
    pixels, grid = inputs_from_processor()
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(pixels.double(), grid).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12)


def test_inputs_that_disagree_with_the_grid_are_refused():
    model = OmniVision(OmniVisionConfig.from_json(TINY))
    with pytest.raises(ValueError, match=r"pixel_values \(10, 1176\) do not match grid_thw: expected \(16, 1176\)"):
        model(torch.zeros(10, 1176), [[1, 4, 4]])
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        model(torch.zeros(12, 1176), [[1, 4, 3]])
