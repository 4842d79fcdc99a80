"""Memory of the two released shapes (random weights, released configs): parameters, tokens per clip, CPU peak, GPU estimate.

    python tools/memory.py              # prints the markdown tables of the README's "Memory of released shapes"

Shapes: (a) SmolLM2-135M + SigLIP-B/16 (224 px) + Whisper-base, (b) Qwen2.5-0.5B + SigLIP-B/16 + Whisper-small,
built from their configs with random weights (the decoder's vocabulary at the released size, so embedding
and head are real; the text comes from a small BPE), stage "sft": towers frozen, aligners + LoRA r 16 train,
fp32, Whisper in its released 30 s mode (train_sft.py --audio's). Each measurement is one forward + backward in
a fresh subprocess: its peak resident memory (VmHWM, reset through /proc/self/clear_refs once the model is
built and the batch made) minus the resident memory at that moment (weights, batch, runtime) is the
activation peak; next to it, the bytes autograd keeps for the backward (saved-tensor hooks, weights
excluded): the part gradient checkpointing cuts (the rest of the peak is transient, e.g. the frozen
Whisper encoder's 30 s forward). The frozen towers keep no activations for the backward, and CPU sdpa with a mask runs the
flash kernel (memory linear in the sequence), so the activation peak is linear in the batch's decoder tokens:
the script measures short clips (few frames, 8 s of audio) and fits a + b * tokens per shape and checkpointing
setting, then evaluates the fit at 16-frame clips. The GPU figure is an estimate: fp32 frozen weights
(train_sft.py keeps them fp32 under bf16 autocast), 16 bytes per trainable parameter (fp32 weight, grad,
AdamW m and v), half the fp32 activations (bf16), CUDA context not counted.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIGLIP_B16 = dict(family="siglip", image_size=224, patch_size=16, dim=768, n_layers=12, n_heads=12, hidden_dim=3072)
WHISPER = {"base": dict(n_mels=80, dim=512, n_layers=6, n_heads=8, hidden_dim=2048, max_positions=1500, exact=True),
           "small": dict(n_mels=80, dim=768, n_layers=12, n_heads=12, hidden_dim=3072, max_positions=1500, exact=True)}
LLM = {"SmolLM2-135M": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                            norm_eps=1e-5, rope_theta=1e5, tie_embeddings=True),
       "Qwen2.5-0.5B": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, hidden_dim=4864,
                            norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True)}
SHAPES = {"a": ("SmolLM2-135M", "base"), "b": ("Qwen2.5-0.5B", "small")}
LABEL = {k: f"{llm} + SigLIP-B/16 + Whisper-{w}" for k, (llm, w) in SHAPES.items()}
CAPTION = ('speaker B says "garden" at 1.0 s. a green triangle appears at 6.0 s. the red square knocks at 6.0 s. '
           'the yellow triangle knocks at 8.0 s.')  # a toy-world caption
CLIP_FRAMES, CLIP_SECONDS, LORA_R = 16, 8.0, 16


def rss_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def build(shape, merge):
    """The captioner of a shape at merge m, stage sft (aligners + LoRA r 16 trainable)."""
    import torch
    from avnano.audio import AudioConfig
    from avnano.decoder import DecoderConfig
    from avnano.model import AVCaptioner, AVConfig
    from avnano.tokenizer import Tokenizer
    from avnano.vit import ViTConfig
    llm, whisper = SHAPES[shape]
    torch.manual_seed(0)
    tok = Tokenizer.train([CAPTION, "Describe the clip."], vocab_size=300)
    cfg = AVConfig(vit=ViTConfig(**SIGLIP_B16, merge=merge), audio=AudioConfig(**WHISPER[whisper]),
                   decoder=DecoderConfig(**LLM[llm]), lora_r=LORA_R)
    model = AVCaptioner(cfg, tok)
    model.set_trainable({"aligners", "lora"})
    return model.train()


def params(model):
    """Millions of parameters per part (the decoder's without its LoRA)."""
    from avnano import lora
    groups = model.param_groups()
    out = {}
    for name, p in model.named_parameters():
        out[groups[name]] = out.get(groups[name], 0) + p.numel()
    out["trainable"] = lora.count_trainable(model)[0]
    return {k: v / 1e6 for k, v in out.items()}


def measure(shape, merge, batch, frames, ckpt):
    """Child process: one forward + backward; resident-memory figures in MB."""
    import torch
    base = rss_mb("VmRSS:")
    from avnano.training import set_grad_checkpointing
    model = build(shape, merge)
    set_grad_checkpointing(model, ckpt)
    g = torch.Generator().manual_seed(1)
    clips = [(torch.randint(0, 256, (frames, 224, 224, 3), dtype=torch.uint8, generator=g, device="cpu"),
              torch.arange(frames, device="cpu") / model.cfg.fps,
              0.1 * torch.randn(int(CLIP_SECONDS * 16000), generator=g, device="cpu"))
             for _ in range(batch)]
    ids, masks = zip(*(model.render(CAPTION) for _ in range(batch)))
    weights = rss_mb("VmRSS:") - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before, t0 = rss_mb("VmRSS:"), time.perf_counter()
    weight_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}  # storage -> bytes of every activation autograd keeps for the backward (weights excluded)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weight_storages:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*zip(*clips), ids, masks)
    out["loss"].backward()
    seconds = time.perf_counter() - t0
    text = len(ids[0]) - 1  # the <|av|> placeholder is replaced by the AV block
    n_audio = out["n_seq"] // batch - frames * model.cfg.vit.tokens_per_frame - text
    return dict(params=params(model), weights_mb=weights, act_mb=rss_mb("VmHWM:") - before, seconds=seconds,
                saved_mb=sum(kept.values()) / 2 ** 20,
                tokens=out["n_seq"], visual_per_frame=model.cfg.vit.tokens_per_frame, audio=n_audio,
                text=text)


def run_child(**kw):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(kw)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"measurement {kw} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit(points):
    """Least squares act = a + b * tokens over (tokens, act) points -> (a, b)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merge", type=int, default=2, help="the merged setting next to merge 1 (train_sft.py --vit default: 2)")
    p.add_argument("--frames", default="a=4,b=2", help="frames of the measured clips per shape (8 s of audio each)")
    p.add_argument("--batches", default="1,2,4", help="batch sizes of the table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    frames = dict(kv.split("=") for kv in args.frames.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()
    # measured points per shape: checkpointing off at (B1, m1), (B2, m1), (B1, m); on at (B1, m1), (B1, m)
    plan = [(1, 1, False), (2, 1, False), (1, args.merge, False), (1, 1, True), (1, args.merge, True)]
    raw, info = [], {}
    for shape in SHAPES:
        for batch, merge, ckpt in plan:
            r = run_child(shape=shape, merge=merge, batch=batch, frames=int(frames[shape]), ckpt=ckpt)
            print(f"# {shape} merge={merge} batch={batch} ckpt={ckpt}: {r}", file=sys.stderr, flush=True)
            raw.append(dict(r, shape=shape, merge=merge, batch=batch, frames=int(frames[shape]), ckpt=ckpt))
            info.setdefault(shape, {})[merge] = r
    wall = time.perf_counter() - t_start

    print("Parameters (millions) and tokens per 16-frame, 8 s clip:\n")
    print("| shape | ViT | audio enc. | decoder | aligners | LoRA r 16 | trainable (sft) | visual tok/frame m=1 / m="
          f"{args.merge} | audio tok (Q-Former) | text tok | decoder tok/clip m=1 / m={args.merge} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    per_clip = {}
    for shape, by_merge in info.items():
        r1, rm = by_merge[1], by_merge[args.merge]
        pr = r1["params"]
        per_clip[shape] = {m: CLIP_FRAMES * by_merge[m]["visual_per_frame"] + r1["audio"] + r1["text"] for m in by_merge}
        print(f"| {LABEL[shape]} | {pr['vit']:.1f} | {pr['audio']:.1f} | {pr['decoder']:.1f} | {pr['aligners']:.2f} | "
              f"{pr['lora']:.2f} | {pr['trainable']:.2f} | {r1['visual_per_frame']} / {rm['visual_per_frame']} | {r1['audio']} | "
              f"{r1['text']} | {per_clip[shape][1]} / {per_clip[shape][args.merge]} |")

    print("\nPeak memory of one forward + backward, stage sft (GB; CPU fp32 from the fit below, GPU bf16 an estimate):\n")
    print("| shape | merge | grad ckpt | batch | decoder tokens | CPU fp32 activations | CPU fp32 total | GPU bf16 estimate |")
    print("|---|---|---|---|---|---|---|---|")
    fits = {}
    for shape in info:
        for ckpt in (False, True):
            pts = [(r["tokens"], r["act_mb"]) for r in raw if r["shape"] == shape and r["ckpt"] == ckpt]
            if len(pts) < 2:
                continue
            fits[shape, ckpt] = a, b = fit(pts)
            pr = info[shape][1]["params"]
            frozen = sum(pr[k] for k in ("vit", "audio", "decoder", "aligners", "lora")) - pr["trainable"]
            weights_mb = info[shape][1]["weights_mb"]
            for merge in (1, args.merge):
                for batch in batches:
                    tokens = batch * per_clip[shape][merge]
                    act = a + b * tokens
                    gpu = (4 * frozen + 16 * pr["trainable"]) * 1e6 / 2 ** 30 + 0.5 * act / 1024
                    print(f"| {LABEL[shape]} | {merge} | {'on' if ckpt else 'off'} | {batch} | {tokens} | {act / 1024:.2f} | "
                          f"{(weights_mb + act) / 1024:.2f} | {gpu:.1f} |")

    print("\nMeasured points (fresh process each; activations = VmHWM after forward + backward minus VmRSS before):\n")
    print("| shape | frames | merge | grad ckpt | batch | decoder tokens | weights + runtime (MB) | activations (MB) | "
          "fit (MB) | kept for backward (MB) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in raw:
        a, b = fits.get((r["shape"], r["ckpt"]), (float("nan"), float("nan")))
        print(f"| {r['shape']} | {r['frames']} | {r['merge']} | {'on' if r['ckpt'] else 'off'} | {r['batch']} | {r['tokens']} | "
              f"{r['weights_mb']:.0f} | {r['act_mb']:.0f} | {a + b * r['tokens']:.0f} | {r['saved_mb']:.0f} | {r['seconds']:.1f} |")
    for (shape, ckpt), (a, b) in fits.items():
        ka, kb = fit([(r["tokens"], r["saved_mb"]) for r in raw if r["shape"] == shape and r["ckpt"] == ckpt])
        print(f"\nfit {shape} ckpt={'on' if ckpt else 'off'}: activations = {a:.0f} MB + {b:.3f} MB per decoder token; "
              f"kept for backward = {ka:.0f} MB + {kb:.3f} MB per token", end="")
    print(f"\n\nwall time {wall:.0f} s")


if __name__ == "__main__":
    main()
