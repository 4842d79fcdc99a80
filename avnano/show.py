"""Look inside one clip: the interleaved token layout and the decoder's attention mask, as one HTML page.

    python -m avnano.show --video clip.mp4 --out layout.html [--interleave avti --air 0.25 --mask causal]

Each slot of the decoder sequence is a coloured cell (prompt text, frame i, audio window at t s,
caption) with its position id; the boolean mask is drawn as a PNG (white = may attend), written with
zlib alone so no imaging library is needed. Runs on a fresh tiny model: the layout and mask depend on
the config, not on trained weights.
"""
import argparse
import base64
import html
import struct
import zlib

import numpy as np
import torch

from .interleave import AUDIO
from .layout import assemble
from .masks import av_prefix, causal

COLOURS = {"text": (220, 220, 220), "visual": (90, 150, 230), "audio": (240, 150, 60), "caption": (120, 200, 120)}


def png_bytes(rgb):
    """uint8 (H, W, 3) -> PNG file bytes (8-bit RGB, no filtering)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def layout(model, clip, caption="a caption goes here."):
    """Per slot: (kind, label, position) and the (L, L) bool mask for one clip."""
    frames, times, audio = [clip.frames], [clip.frame_times], [clip.audio]
    with torch.no_grad():
        blocks, _ = model.av_block(frames, times, audio)
        ids, loss_mask = model.render(caption)
        x = assemble(model, blocks, [ids], [loss_mask])
    tokens, tok_times, modality = blocks[0]
    k = ids.index(model.av_id)
    slots = [("text", model.tok.decode([i], skip_special=False), 0) for i in ids[:k]]
    per_frame = model.cfg.tokens_per_frame
    frame_of = {float(t): i for i, t in enumerate(clip.frame_times.tolist())}
    for t, m in zip(tok_times.tolist(), modality.tolist()):
        if m == AUDIO:
            slots.append(("audio", f"audio window @ {t:.2f} s", 0))
        else:
            slots.append(("visual", f"frame {frame_of.get(t, '?')} @ {t:.2f} s ({per_frame} tokens/frame)", 0))
    for i, m in zip(ids[k + 1:], loss_mask[k + 1:]):
        slots.append(("caption" if m else "text", model.tok.decode([i], skip_special=False), 0))
    slots = [(kind, label, int(p)) for (kind, label, _), p in zip(slots, x.positions[0].tolist())]
    mask = av_prefix(x.is_av)[0] if model.cfg.mask == "prefix" else causal(x.is_av.shape[1])
    return slots, mask


def render_html(slots, mask, title):
    L = len(slots)
    scale = max(1, 600 // L)
    img = np.where(mask.numpy()[..., None], 255, 30).astype(np.uint8).repeat(3, -1)
    bar = np.array([COLOURS[k] for k, _, _ in slots], dtype=np.uint8)
    img = np.concatenate([np.concatenate([np.full((1, 1, 3), 255, np.uint8), bar[None]], 1),
                          np.concatenate([bar[:, None], img], 1)], 0)  # colour key along both axes
    img = img.repeat(scale, 0).repeat(scale, 1)
    png = base64.b64encode(png_bytes(img)).decode()
    cells = "".join(f'<span class="c" style="background:rgb{COLOURS[k]}" title="{i}: {html.escape(lab)} (pos {p})">'
                    f"{p}</span>" for i, (k, lab, p) in enumerate(slots))
    legend = " ".join(f'<span class="c" style="background:rgb{c}">{k}</span>' for k, c in COLOURS.items())
    return f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px sans-serif;margin:2em}} .c{{display:inline-block;min-width:1.6em;margin:1px;padding:2px;
text-align:center;font-size:10px;border-radius:3px}} img{{image-rendering:pixelated;border:1px solid #888}}</style>
<h2>{html.escape(title)}</h2><p>{legend}</p>
<h3>Token layout ({L} slots; number = position id, hover for what the slot holds)</h3><div>{cells}</div>
<h3>Attention mask (row = query, column = key; white = may attend)</h3><img src="data:image/png;base64,{png}">
"""


def main():
    from .checkpoint import load_model
    from .media import load_clip
    from .model import AVCaptioner, preset
    from .tokenizer import Tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="any media file")
    p.add_argument("--out", default="layout.html", help="HTML file to write")
    p.add_argument("--ckpt", default=None, help="an avnano checkpoint (default: a fresh tiny model)")
    p.add_argument("--interleave", default="per_frame", help="concat | per_frame | avti | chunked")
    p.add_argument("--air", type=float, default=0.25, help="AVTI audio-interleaving rate")
    p.add_argument("--mask", default="prefix", help="prefix | causal")
    p.add_argument("--time-positions", action="store_true", help="time-aligned position ids for the AV block")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second")
    p.add_argument("--max-frames", type=int, default=8, help="frame cap m")
    args = p.parse_args()
    if args.ckpt:
        model = load_model(args.ckpt)
    else:
        tok = Tokenizer.train(["a caption goes here. Describe the clip."], vocab_size=300)
        model = AVCaptioner(preset("tiny", tok.vocab_size), tok)
    for k in ("interleave", "air", "mask", "time_positions", "fps", "max_frames"):
        setattr(model.cfg, k, getattr(args, k))
    clip = load_clip(args.video, fps=args.fps, max_frames=args.max_frames, size=(model.cfg.vit.image_size,) * 2)
    slots, mask = layout(model.eval(), clip)
    title = f"{args.video}: {args.interleave}" + (f" (AIR {args.air})" if args.interleave == "avti" else "") + f", {args.mask} mask"
    with open(args.out, "w") as f:
        f.write(render_html(slots, mask, title))
    print(f"wrote {args.out}: {len(slots)} slots")


if __name__ == "__main__":
    main()
