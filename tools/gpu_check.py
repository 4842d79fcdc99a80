"""What a maintainer runs the first time a GPU is lent (under 8 minutes): one markdown table of CUDA facts.

    python tools/gpu_check.py             # one CUDA GPU
    python tools/gpu_check.py --dry-run   # the same plumbing on the CPU with tiny sizes (a few steps)

1. a 100-step SFT of the small preset through the real script (train_sft.py in a subprocess; its key=value
   step lines give step time, tokens/s and MFU, whose FLOPs come from avnano/flops.py's formula; peak memory is
   torch.cuda.max_memory_allocated of that process); then the same for the gpu preset (~180M, SmolLM2-135M-shaped);
2. the same for a released shape with random weights (SmolLM2-135M + SigLIP-B/16 + Whisper-base written in
   the released file layout, trained with --vit/--audio/--llm --stage sft --lora-r 16);
3. CPU fp32 vs CUDA bf16-autocast loss of the small checkpoint of (1) on the same 8 held-out clips (|delta|),
   and its greedy captions on those clips on both (how many are identical);
4. a --compile round trip: train_sft.py --compile saves a checkpoint, load_model reads it back (every key
   matched or it raises), and the compiled decoder's loss equals the eager one's;
5. the GPU-busy share of training steps of the small and gpu presets, in this process: torch.profiler's CUDA
   kernel (and copy) intervals, merged, over the wall time of 5 profiled steps; next to it the MFU (flops.py) of 5
   unprofiled steps. A share well under 1 means the host (Python, syncs, data) leaves the GPU waiting.
A failed check is reported in its row and the others still run; the exit status is 1 if any failed.
--dry-run: tiny preset (also in the gpu preset's rows) and a tiny released-format shape, 3 steps, CPU; CPU bf16 autocast
stands in for CUDA, 24-token captions, --compile is exercised without Inductor (TORCHDYNAMO_DISABLE=1 in the script, the
"eager" backend in-process), and the busy share is the CPU ops' (no GPU to profile; MFU is n/a on a CPU).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

PEAK = 989e12  # H100 / H200 SXM dense bf16 (DESIGN.md section 11): the MFU denominator per GPU

# runs train_sft.py as `python train_sft.py ...` would, then prints the process's peak memory
WRAPPER = """
import resource, runpy, sys, torch
sys.argv = ["train_sft.py"] + sys.argv[1:]
try:
    runpy.run_path("train_sft.py", run_name="__main__")
finally:
    cuda = "--device" in sys.argv and "cuda" in sys.argv[sys.argv.index("--device") + 1]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak_bytes={peak} peak_kind={'cuda_max_allocated' if cuda else 'cpu_maxrss'}", flush=True)
"""


def sft(args, flags, log_name, env=None):
    """Run train_sft.py with flags; returns (dict of medians over the step lines, first/last loss, peak) or raises."""
    cmd = [sys.executable, "-c", WRAPPER, *flags, "--device", args.device, "--data", args.data]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **(env or {})))
    with open(os.path.join(args.work, log_name), "w") as f:
        f.write(" ".join(cmd) + "\n" + res.stdout + "\n" + res.stderr)
    if res.returncode:
        tail = [line for line in (res.stderr or res.stdout).strip().splitlines() if line.strip()]
        raise RuntimeError(f"exit {res.returncode}: {tail[-1] if tail else '?'} (log {os.path.join(args.work, log_name)})")
    steps = [dict(kv.split("=", 1) for kv in line.split()) for line in res.stdout.splitlines() if line.startswith("step=")]
    warm = steps[len(steps) // 5:] or steps  # the first fifth warms up (allocator, kernels)
    med = lambda k: statistics.median(number(s[k]) for s in warm) if warm and k in warm[0] else float("nan")
    peak = re.search(r"peak_bytes=(\d+) peak_kind=(\w+)", res.stdout)
    return dict(steps=len(steps), step_s=med("step_s"), tok_s=med("tok/s"), mfu=med("mfu"), tflops=med("tflop/s"),
                loss0=float(steps[0]["loss"]), loss1=float(steps[-1]["loss"]), peak_gb=int(peak.group(1)) / 2 ** 30,
                peak_kind=peak.group(2), wall=time.perf_counter() - t0)


def number(text):
    """A logged value as a float; nan for a label such as mfu=n/a(cpu)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def sft_row(r):
    mfu = "n/a (CPU)" if r["mfu"] != r["mfu"] else f"{r['mfu']:.3f}"
    return (f"{r['steps']} steps in {r['wall']:.0f} s (with start-up and the final eval): step {r['step_s'] * 1000:.0f} ms, "
            f"{r['tok_s']:.0f} tok/s, MFU {mfu} (flops.py, {r['tflops']:.2f} TFLOP/s), peak {r['peak_gb']:.2f} GB ({r['peak_kind']}), "
            f"loss {r['loss0']:.3f} -> {r['loss1']:.3f}")


# ----------------------------------------------------------------------------------- released-format random towers
def write_released(root, vit_cfg, audio_cfg, dec_cfg, tok):
    """SigLIP vision / Whisper / Llama directories in the released layouts (config.json + model.safetensors)."""
    from avnano.audio import AudioEncoder
    from avnano.decoder import Decoder
    from avnano.vit import ViT
    from avnano.weights import audio_keymap, save_decoder, save_file_atomic, vit_keymap, write_json_atomic
    dirs = {k: os.path.join(root, k) for k in ("vit", "audio", "llm")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    vit, audio = ViT(vit_cfg), AudioEncoder(audio_cfg)
    ours = vit.state_dict()
    save_file_atomic({hf: ours[us] for hf, us in vit_keymap(vit_cfg).items()}, os.path.join(dirs["vit"], "model.safetensors"))
    write_json_atomic(dict(model_type="siglip_vision_model", image_size=vit_cfg.image_size, patch_size=vit_cfg.patch_size,
                           hidden_size=vit_cfg.dim, num_hidden_layers=vit_cfg.n_layers, num_attention_heads=vit_cfg.n_heads,
                           intermediate_size=vit_cfg.hidden_dim, hidden_act="gelu_pytorch_tanh", vision_use_head=vit_cfg.map_head),
                      os.path.join(dirs["vit"], "config.json"))
    ours = audio.state_dict()
    save_file_atomic({hf: ours[us] for hf, us in audio_keymap(audio_cfg).items()}, os.path.join(dirs["audio"], "model.safetensors"))
    write_json_atomic(dict(model_type="whisper", num_mel_bins=audio_cfg.n_mels, d_model=audio_cfg.dim,
                           encoder_layers=audio_cfg.n_layers, encoder_attention_heads=audio_cfg.n_heads,
                           encoder_ffn_dim=audio_cfg.hidden_dim, max_source_positions=audio_cfg.max_positions),
                      os.path.join(dirs["audio"], "config.json"))
    save_decoder(Decoder(dec_cfg), dirs["llm"])
    tok.save(dirs["llm"])
    return dirs


def released_shape(args, tok):
    from avnano.audio import AudioConfig
    from avnano.decoder import DecoderConfig
    from avnano.vit import ViTConfig
    if args.dry_run:
        return (ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2, hidden_dim=64),
                AudioConfig(n_mels=80, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_positions=1500),
                DecoderConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128))
    from memory import LLM, SIGLIP_B16, WHISPER
    whisper = {k: v for k, v in WHISPER["base"].items() if k != "exact"}
    return ViTConfig(**SIGLIP_B16), AudioConfig(**whisper), DecoderConfig(**LLM["SmolLM2-135M"])


# ----------------------------------------------------------------------------------- library checks
def scored(model, store, n, new_tokens, cpu_bf16=False):
    """(held-out CE, greedy captions) of a store's first n clips through evaluate.py, under the autocast every
    script uses (bf16 on CUDA; the dry run's stand-in is CPU bf16: distributed.CPU_BF16)."""
    from avnano import distributed
    from avnano.evaluate import caption_clips, heldout_ce
    distributed.CPU_BF16 = cpu_bf16
    try:
        indices = list(range(n))
        return heldout_ce(model, store, indices), caption_clips(model, store, indices, progress=False, max_new_tokens=new_tokens)
    finally:
        distributed.CPU_BF16 = False


def parity(args, ckpt, test_rows):
    """CPU fp32 vs accelerator bf16: loss on the same 8 clips, and greedy captions."""
    from avnano.checkpoint import load_model
    from avnano.data import ClipStore
    new_tokens = 24 if args.dry_run else 160
    model = load_model(ckpt, "cpu")
    store = ClipStore(test_rows[:8], model.cfg.fps, model.cfg.max_frames, model.cfg.vit.image_size)
    n = min(8, len(test_rows))
    cpu_loss, cpu_caps = scored(model, store, n, new_tokens)
    dev_loss, dev_caps = scored(model.to("cpu" if args.dry_run else args.device), store, n, new_tokens, cpu_bf16=args.dry_run)
    same = sum(a == b for a, b in zip(cpu_caps, dev_caps))
    where = "CPU bf16 (dry run)" if args.dry_run else "CUDA bf16"
    diff = next((f"; first difference: CPU '{a[:60]}' vs '{b[:60]}'" for a, b in zip(cpu_caps, dev_caps) if a != b), "")
    return (f"CPU fp32 {cpu_loss:.4f}, {where} {dev_loss:.4f}, abs delta {abs(cpu_loss - dev_loss):.2e}",
            f"{same}/{len(cpu_caps)} identical{diff}")


def compile_round_trip(args, ckpt, test_rows):
    """load_model of a checkpoint saved by train_sft.py --compile, then eager vs compiled loss on 4 clips (the dry run
    compiles with the "eager" backend: dynamo's tracing without Inductor's minutes of CPU code generation)."""
    from avnano.checkpoint import load_model
    from avnano.data import ClipStore
    from avnano.evaluate import heldout_ce
    model = load_model(ckpt, args.device)  # raises naming any key that does not match (e.g. decoder._orig_mod.*)
    store = ClipStore(test_rows[:4], model.cfg.fps, model.cfg.max_frames, model.cfg.vit.image_size)
    indices = list(range(min(4, len(test_rows))))
    eager = heldout_ce(model, store, indices)
    model.decoder.compile(**({"backend": "eager"} if args.dry_run else {}))
    compiled = heldout_ce(model, store, indices)
    return f"checkpoint keys all matched; loss eager {eager:.4f}, compiled {compiled:.4f}, abs delta {abs(eager - compiled):.2e}"


def busy_intervals(events):
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(events):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def busy_share(args, preset_name, batch_size, steps=5):
    """(busy share of 5 profiled training steps, MFU of 5 unprofiled ones, FLOPs per step) of a preset, in-process,
    the step as train_sft.py's (forward under autocast, backward, clipping, AdamW). Busy: the merged intervals of
    the CUDA kernels and copies over the wall time (on the CPU: of the aten ops, a stand-in)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from avnano.data import ClipStore, Loader, mel_config, read_splits
    from avnano.distributed import autocast
    from avnano.flops import FlopCounter, mfu
    from avnano.model import AVCaptioner, preset
    from avnano.tokenizer import Tokenizer
    rows, _ = read_splits(args.data)
    tok = Tokenizer.train([r["caption"] for r in rows] + ["Describe the clip."], vocab_size=512)
    torch.manual_seed(0)
    model = AVCaptioner(preset(preset_name, tok.vocab_size), tok).to(args.device).train()
    cfg, params = model.cfg, [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda")
    store = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, audio=mel_config(model))
    loader = Loader(store, batch_size, seed=0, workers=0 if args.dry_run else 8, device=args.device)
    counter, stream = FlopCounter(model), loader.iterate()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step():
        _, _, items = next(stream)
        ids, masks = zip(*(model.render(r["caption"]) for r, *_ in items))
        with autocast(args.device):
            out = model([it[1] for it in items], [it[2] for it in items], [it[3] for it in items], ids, masks)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return counter.batch(items, ids, masks)

    try:
        for _ in range(3):  # warm-up: allocator, kernels, the clip cache
            step()
        sync()
        t0 = time.perf_counter()
        flops = sum(step() for _ in range(steps))
        sync()
        util = mfu(flops, time.perf_counter() - t0, PEAK) if args.device == "cuda" else float("nan")
        kind = DeviceType.CUDA if args.device == "cuda" else DeviceType.CPU
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            wall = time.perf_counter() - t0
    finally:
        loader.close()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == kind]
    return busy_intervals(spans) / (wall * 1e6), util, flops / steps


def busy_row(args, preset_name, batch_size):
    share, util, flops = busy_share(args, preset_name, batch_size)
    what = "GPU busy" if args.device == "cuda" else "CPU ops busy (dry run stand-in)"
    mfu = "n/a (CPU)" if util != util else f"{util:.3f}"
    return f"{what} {share:.1%} of 5 profiled steps; MFU {mfu} over 5 unprofiled steps ({flops / 1e9:.1f} GFLOP per step, flops.py)"


# ----------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, a few steps, on the CPU (checks the plumbing)")
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default 100; 3 with --dry-run)")
    p.add_argument("--data", default=None, help="a toy-world or manifest directory (default: a small toy world built "
                   "in the work directory)")
    p.add_argument("--work", default=None, help="directory for checkpoints and logs (default: a temporary one)")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script measures a GPU (python tools/gpu_check.py --dry-run checks its "
                         "plumbing on the CPU)")
    args.device = "cpu" if args.dry_run else "cuda"
    args.steps = args.steps or (3 if args.dry_run else 100)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    t_start = time.perf_counter()
    from avnano import toyworld
    from avnano.data import read_splits
    from avnano.tokenizer import Tokenizer
    if args.data is None:
        args.data = os.path.join(args.work, "toyworld")
        n_train, n_test = (8, 8) if args.dry_run else (192, 16)
        print(f"building a toy world of {n_train} + {n_test} clips in {args.data}", flush=True)
        toyworld.build(args.data, n_train, n_test, seed=0, workers=2 if args.dry_run else min(16, os.cpu_count() or 2),
                       progress=False)
    train_rows, test_rows = read_splits(args.data)
    rows, failed = [], []

    def check(name, fn):
        print(f"running: {name}", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # a failed check is reported in the table; the others still run
            failed.append(name)
            out = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        print(f"  {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return out

    preset, batch_size = ("tiny", 4) if args.dry_run else ("small", 16)
    common = ["--steps", str(args.steps), "--warmup", str(max(1, args.steps // 10)), "--eval-n", "2" if args.dry_run else "8",
              "--save-every",
              str(10 ** 6)]
    small_out = os.path.join(args.work, "small")
    small = check(f"SFT {preset} preset", lambda: sft_row(sft(args, ["--preset", preset, "--batch-size", str(batch_size),
                                                                      "--out", small_out] + common, "sft_small.log")))
    rows.append((f"SFT, {preset} preset, {args.steps} steps, batch {batch_size} (train_sft.py)", small))
    big, big_batch = ("tiny", 4) if args.dry_run else ("gpu", 16)
    rows.append((f"SFT, gpu preset{' (tiny in the dry run)' if args.dry_run else ''}, {args.steps} steps, batch {big_batch}",
                 check("SFT gpu preset", lambda: sft_row(sft(args, ["--preset", big, "--batch-size", str(big_batch), "--workers",
                                                                      "0" if args.dry_run else "8", "--out",
                                                                      os.path.join(args.work, "gpu")] + common,
                                                                "sft_gpu.log")))))

    tok = Tokenizer.train([r["caption"] for r in train_rows] + ["Describe the clip."], vocab_size=512)
    shapes = released_shape(args, tok)
    label = "tiny released-format shape" if args.dry_run else "SmolLM2-135M + SigLIP-B/16 + Whisper-base"

    def released():
        dirs = write_released(os.path.join(args.work, "released"), *shapes, tok)
        return sft_row(sft(args, ["--vit", dirs["vit"], "--audio", dirs["audio"], "--llm", dirs["llm"], "--stage", "sft",
                                  "--lora-r", "16", "--batch-size", "8", "--lr", "1e-4", "--out",
                                  os.path.join(args.work, "released_sft")] + common, "sft_released.log"))
    rows.append((f"SFT, {label}, random weights, stage sft + LoRA r 16, {args.steps} steps, batch 8", check("SFT released shape",
                                                                                                          released)))

    if small.startswith("FAILED"):
        loss_row = caption_row = "skipped: the small SFT failed"
    else:
        got = check("CPU vs accelerator", lambda: parity(args, small_out, test_rows))
        loss_row, caption_row = (got, got) if isinstance(got, str) else got
    rows.append(("loss, CPU fp32 vs " + ("CPU bf16 (dry run)" if args.dry_run else "CUDA bf16") + ", same weights and 8 clips",
                 loss_row))
    rows.append(("greedy captions on 8 held-out clips, CPU vs " + ("CPU bf16" if args.dry_run else "CUDA"), caption_row))

    compiled_out = os.path.join(args.work, "compiled")

    def round_trip():  # the dry run's train_sft.py runs with TORCHDYNAMO_DISABLE=1: the flag's plumbing, not Inductor
        sft(args, ["--preset", preset, "--batch-size", str(batch_size), "--compile", "--out", compiled_out, "--steps",
                   str(min(args.steps, 10)), "--warmup", "1", "--eval-n", "2", "--save-every", str(10 ** 6)], "sft_compile.log",
            env={"TORCHDYNAMO_DISABLE": "1"} if args.dry_run else None)
        return compile_round_trip(args, compiled_out, test_rows)
    rows.append(("train_sft.py --compile, save, load_model, eager vs compiled loss", check("--compile round trip",
                                                                                           round_trip)))

    for name, (p_name, b) in {"small": (preset, batch_size), "gpu": (big, big_batch)}.items():
        rows.append((f"profile: {name} preset{' (tiny in the dry run)' if args.dry_run else ''}, batch {b}, in-process steps",
                     check(f"profile {name} preset", lambda p_name=p_name, b=b: busy_row(args, p_name, b))))

    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    rows.append(("machine", f"{name}; torch {torch.__version__}; wall {time.perf_counter() - t_start:.0f} s; logs in {args.work}"))
    print("\n| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v.replace('|', '/')} |")
    if failed:
        raise SystemExit(f"\n{len(failed)} check(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
