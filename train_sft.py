"""Supervised fine-tuning of the AV captioner: staged, resumable, DDP-ready. The main job.

    python train_sft.py                      # toy world (made if absent), tiny preset, CPU ok
    torchrun --nproc_per_node 2 train_sft.py --steps 20
    python train_sft.py --resume             # continue out/sft from its last checkpoint

With no arguments: builds the toy world under data/toyworld if absent, trains a byte-level BPE on its
training captions, trains the tiny preset from scratch, evaluates on the held-out split (Miss, Hall,
event F1, dialogue accuracy, ...), prints a few captions next to their ground truth and saves
out/sft. Stages (AVicuna / video-SALMONN 2 style): `align` trains the aligners only, `sft` the
aligners plus the LoRA (or the whole decoder without LoRA), `full` everything (the right choice when
every part starts from scratch, as in the toy world). Every step logs one line of key=value pairs.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from avnano import checkpoint, toyworld
from avnano.data import ClipStore, Loader, read_splits
from avnano.evaluate import eval_split
from avnano.model import AVCaptioner, preset
from avnano.tokenizer import Tokenizer

STAGES = {"align": {"aligners"}, "sft": {"aligners", "lora"}, "full": {"vit", "audio", "aligners", "decoder", "lora"}}


def model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="tiny (CPU) or small (one GPU)")
    g.add_argument("--init", default=None, help="start from this avnano checkpoint instead of a fresh preset")
    g.add_argument("--interleave", default="per_frame", choices=["concat", "per_frame", "avti", "chunked"], help="AV token order")
    g.add_argument("--air", type=float, default=0.25, help="AVTI audio-interleaving rate")
    g.add_argument("--time-positions", action="store_true", help="time-aligned position ids (Qwen2.5-Omni style)")
    g.add_argument("--mask", default="prefix", choices=["prefix", "causal"], help="AVCap prefix mask M or plain causal")
    g.add_argument("--modalities", default="av", choices=["av", "v", "a"], help="audio+video, video only, audio only")
    g.add_argument("--ot-weight", type=float, default=0.0, help="lambda of the LAVCap OT alignment loss (0 = off)")
    g.add_argument("--ot-fusion", action="store_true", help="LAVCap OT-attention fusion before interleaving")
    g.add_argument("--ground-weight", type=float, default=1.0, help="weight of the grounding loss (needs manifest events; 0 = off)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="AVCap used 0.1")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the decoder (0 = none)")
    g.add_argument("--fps", type=float, default=2.0, help="frames per second phi")
    g.add_argument("--max-frames", type=int, default=16, help="frame cap m")


def data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data/toyworld", help="directory with train.jsonl / test.jsonl (toy world made here if absent)")
    g.add_argument("--n-train", type=int, default=2000, help="toy world: training clips to generate")
    g.add_argument("--n-test", type=int, default=200, help="toy world: held-out clips to generate")
    g.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size for a new tokenizer")
    g.add_argument("--no-cache", action="store_true", help="decode clips every time instead of keeping them in memory")


def opt_args(p, steps=1500, lr=2e-3, batch=16, warmup=50):
    """steps=None: the script has no step schedule of its own (DPO trains per round on its pairs)."""
    g = p.add_argument_group("optimisation")
    if steps is not None:
        g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
        g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
        g.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps")
    g.add_argument("--batch-size", type=int, default=batch, help="clips per micro-batch per rank")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--seed", type=int, default=0, help="model init and data order")


LOOP_FLAGS = {
    "--save-every": dict(type=int, default=200, help="checkpoint every N steps"),
    "--eval-every": dict(type=int, default=0, help="evaluate every N steps (0 = only at the end)"),
    "--compile": dict(action="store_true", help="torch.compile the decoder"),
    "--peak-flops": dict(type=float, default=989e12, help="accelerator bf16 peak for MFU (H100: 989e12)"),
    "--stop-after": dict(type=int, default=0, help="exit right after this step (tests: simulate a kill)"),
}


def run_args(p, out="out/sft", loop_flags=tuple(LOOP_FLAGS)):
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out, help="checkpoint directory")
    g.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (model, optimizer, RNG, data position)")
    g.add_argument("--eval-n", type=int, default=200, help="held-out clips to evaluate")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    for flag in loop_flags:
        g.add_argument(flag, **LOOP_FLAGS[flag])


def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE: gloo on CPU, nccl on CUDA. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return rank, world, device


def ensure_toy_world(args, rank):
    manifest = os.path.join(args.data, "train.jsonl")
    if os.path.exists(manifest):
        with open(manifest) as f:
            first = json.loads(f.readline())
        if "events" in first and first.get("world") != toyworld.VERSION:  # a toy world made by other code
            sys.exit(f"{manifest}: toy world version {first.get('world', 1)}, this avnano makes version "
                     f"{toyworld.VERSION} (rendering or caption grammar changed); delete {args.data} to rebuild it")
        return
    if args.data != "data/toyworld":
        sys.exit(f"{args.data}: no train.jsonl (only the default --data directory is generated automatically)")
    if rank == 0:
        print(f"building the toy world in {args.data} ({args.n_train} train / {args.n_test} test clips)", flush=True)
        toyworld.build(args.data, args.n_train, args.n_test, seed=0)
    if dist.is_initialized():
        dist.barrier()


def lr_at(step, args):
    """Linear warm-up, then cosine from lr down to lr * min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def build_model(args, train_rows):
    torch.manual_seed(args.seed)
    if args.init:
        return AVCaptioner.load(args.init)
    tok = Tokenizer.train([r["caption"] for r in train_rows] + ["Describe the clip."], vocab_size=args.vocab)
    cfg = preset(args.preset, tok.vocab_size, interleave=args.interleave, air=args.air, time_positions=args.time_positions,
                 mask=args.mask, modalities=args.modalities, ot_weight=args.ot_weight, ot_fusion=args.ot_fusion,
                 label_smoothing=args.label_smoothing, ground_weight=args.ground_weight, lora_r=args.lora_r, fps=args.fps, max_frames=args.max_frames)
    return AVCaptioner(cfg, tok)


def flops_per_step(model, n_seq, n_frames, n_audio_tokens):
    """~6 N per token for each tower (attention FLOPs left out): the MFU numerator."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    vit_tokens = n_frames * (model.cfg.vit.grid ** 2)
    return 6 * (count(model.decoder) * n_seq + count(model.vit) * vit_tokens + count(model.audio) * n_audio_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    data_args(p)
    opt_args(p)
    run_args(p)
    p.add_argument("--stage", default="full", choices=sorted(STAGES), help="which parameter groups train")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    args = p.parse_args()
    rank, world, device = setup_distributed(args.device)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    ensure_toy_world(args, rank)
    train_rows, test_rows = read_splits(args.data)

    state = {"step": 0, "epoch": 0, "batch": 0, "history": []}
    if args.resume:
        path = checkpoint.resume_path(args.out)
        model = AVCaptioner.load(path)
    else:
        model = build_model(args, train_rows)
    model.set_trainable(STAGES[args.stage] if args.stage != "sft" or model.cfg.lora_r else {"aligners", "decoder"})
    model.to(device).train()
    optimizer = make_optimizer(model, args)
    if args.resume:
        state = checkpoint.load_state(path, optimizer)
        log(f"resumed from {path} at step {state['step']}")
    if args.compile:
        model.decoder = torch.compile(model.decoder)
    ddp = DDP(model, find_unused_parameters=True) if world > 1 else model
    trainable, total = sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())
    log(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable (stage {args.stage}); "
        f"{len(train_rows)} train clips; device {device}, world {world}")

    cfg = model.cfg
    store = ClipStore(train_rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, cache=not args.no_cache)
    loader = Loader(store, args.batch_size, args.seed, rank, world)
    stream = loader.iterate(state["epoch"], state["batch"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in device else torch.autocast("cpu", enabled=False)
    t_start, step_time = time.perf_counter(), 0.0
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=state["step"], desc="sft", disable=rank != 0, leave=False)
    while state["step"] < args.steps:
        t0, wait0 = time.perf_counter(), loader.wait_seconds
        lr = lr_at(state["step"], args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "ce": 0.0, "ot": 0.0, "ground": 0.0}
        n_seq = n_frames = n_audio = 0
        for _ in range(args.grad_accum):
            epoch, batch, items = next(stream)
            state["epoch"], state["batch"] = (epoch, batch + 1) if batch + 1 < loader.batches_per_epoch else (epoch + 1, 0)
            if not items:
                continue
            ids, masks = zip(*(model.render(r["caption"]) for r, *_ in items))
            with autocast:
                ground = [toyworld.grounding(r.get("events", [])) for r, *_ in items] if cfg.ground_weight else None
                out = ddp([it[1] for it in items], [it[2] for it in items], [it[3] for it in items], ids, masks, ground=ground)
            if not torch.isfinite(out["loss"]):
                raise SystemExit(f"step {state['step']}: loss is {out['loss'].item()} (not finite); stopping. "
                                 f"Lower --lr or check the data; the last checkpoint in {args.out} is intact.")
            (out["loss"] / args.grad_accum).backward()
            for k in sums:
                sums[k] += out[k].item() / args.grad_accum
            n_seq += out["n_seq"]
            n_frames += sum(len(it[1]) for it in items)
            n_audio += sum(len(it[3]) // 320 for it in items)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        optimizer.step()
        state["step"] += 1
        dt = time.perf_counter() - t0
        step_time += dt
        line = (f"step={state['step']} loss={sums['loss']:.4f} ce={sums['ce']:.4f} ot={sums['ot']:.4f} ground={sums['ground']:.4f} lr={lr:.2e} "
                f"grad_norm={float(grad_norm):.3f} tok/s={n_seq * world / dt:.0f} step_s={dt:.3f} "
                f"data_wait={(loader.wait_seconds - wait0) / dt:.3f} skipped={len(store.bad)}")
        if "cuda" in device:
            line += f" mfu={flops_per_step(model, n_seq, n_frames, n_audio) * world / dt / args.peak_flops:.4f}"
        log(line)
        bar.update(1)
        state["history"].append([state["step"], round(sums["loss"], 4)])
        if rank == 0 and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            checkpoint.save(args.out, model, optimizer, dict(state, args=vars(args)))
        if args.eval_every and state["step"] % args.eval_every == 0 and rank == 0:
            metrics, _ = eval_split(model, ClipStore(test_rows, cfg.fps, cfg.max_frames, cfg.vit.image_size), args.eval_n)
            log("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)) + f" step={state['step']}")
        if args.stop_after and state["step"] >= args.stop_after:
            break
    bar.close()
    total_time = time.perf_counter() - t_start
    log(f"trained {state['step']} steps in {total_time:.1f} s; waiting on data {loader.wait_seconds / max(step_time, 1e-9):.1%} "
        f"of step time; {len(store.bad)} bad clips skipped")
    if rank == 0 and not (args.stop_after and state["step"] < args.steps):
        final_eval(model, test_rows, args, log)
    if dist.is_initialized():
        log(f"rank_weight_max_diff={rank_weight_diff(model):.3e}")
        dist.barrier()  # both ranks idle before the gloo pairs close (else a rank can abort at exit)
        dist.destroy_process_group()


def rank_weight_diff(model):
    """Largest |w_rank - w_rank0| over every parameter and rank: 0 when DDP kept the replicas in step."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def final_eval(model, test_rows, args, log):
    cfg = model.cfg
    store = ClipStore(test_rows, cfg.fps, cfg.max_frames, cfg.vit.image_size)
    metrics, texts = eval_split(model, store, args.eval_n)
    log("held-out: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    for row, text in list(zip(store.rows, texts))[:3]:
        log(f"\n  clip  {row['video']}\n  truth {row['caption']}\n  model {text}")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log(f"\nsaved {args.out}; caption any video with: python sample.py --ckpt {args.out} --video FILE")


if __name__ == "__main__":
    main()
