"""Supervised fine-tuning of the AV captioner: staged, resumable, DDP-ready. The main job.

    python train_sft.py                      # toy world (made if absent), tiny preset, CPU ok
    torchrun --nproc_per_node 2 train_sft.py --steps 20
    python train_sft.py --resume             # continue out/sft from its last checkpoint
    python train_sft.py --stage align --out out/align && python train_sft.py --init out/align --stage sft --lora-r 16
    python train_sft.py --vit SIGLIP --audio WHISPER --llm QWEN2 --stage align --out out/align --grad-checkpointing
                                             # released towers, then --init out/align --stage sft --lora-r 16

With no arguments: builds the toy world under data/toyworld if absent, trains a byte-level BPE on its
training captions, trains the tiny preset from scratch, evaluates on the held-out split (Miss, Hall,
event F1, dialogue accuracy, ...), prints a few captions next to their ground truth and saves
out/sft. Stages (AVicuna / video-SALMONN 2 style): `align` trains the aligners only, `sft` the
aligners plus the LoRA (or the whole decoder without LoRA), `full` everything (the right choice when
every part starts from scratch, as in the toy world). `--init` starts from a checkpoint: its architecture
is kept (a model flag it cannot apply stops the run with a message), --lora-r adds a LoRA if it has
none, and --stage picks what trains. Every step logs one line of key=value pairs.
"""
import argparse
import contextlib
import json
import os
import random
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from avnano import checkpoint, lora, toyworld
from avnano.data import ClipStore, Loader, mel_config, read_splits
from avnano.errors import InputError, run_main
from avnano.evaluate import eval_split
from avnano.flops import FlopCounter, mfu
from avnano.omni_flops import OmniFlopCounter
from avnano.grounding import spans
from avnano.recolour import recoloured
from avnano.distributed import autocast, every_rank, setup_distributed, teardown
from avnano.training import (build_model, data_args, ensure_toy_world, make_optimizer, model_args, opt_args, run_args,
                             set_grad_checkpointing, set_lr)

STAGES = {"align": {"aligners"}, "sft": {"aligners", "lora"}, "full": {"vit", "audio", "aligners", "decoder", "lora"}}


def wrap(model, world, compile=False):
    """The module the step calls: the decoder compiled in place (lazily, at the first forward; the state_dict
    keys stay the same, so checkpoints load anywhere), inside DDP when there are several ranks."""
    if compile:
        model.decoder.compile()
    return DDP(model, find_unused_parameters=True) if world > 1 else model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p, architecture=True)
    g = data_args(p)
    g.add_argument("--no-cache", action="store_true", help="decode clips every time instead of keeping them in memory")
    g.add_argument("--cache-gb", type=float, default=8.0, help="bound of the in-memory clip cache (least recently used "
                   "clips are dropped beyond it)")
    g.add_argument("--workers", type=int, default=0, help="data worker processes that decode clips and compute log-mel "
                   "(0: one background thread of this process; a GPU box: 4-8)")
    g = opt_args(p)
    g.add_argument("--stage", default="full", choices=sorted(STAGES), help="which parameter groups train (sft without "
                   "--lora-r: aligners + the whole decoder)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--recolour", type=float, default=None, help="share of training clips seen with the toy palette's colours "
                   "permuted in frames, caption and events alike (avnano/recolour.py: the model is shown the held-out "
                   "colour-shape pairs; default 0.5 on a toy world, refused on other data)")
    g = run_args(p, out="out/sft", save_every=200)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--log-every", type=int, default=1, help="one step line every N steps, with the means over them (the "
                   "logged numbers stay on the device in between: one read per line; a non-finite gradient is found at the next "
                   "line, before any checkpoint is written)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    g.add_argument("--peak-flops", type=float, default=989e12, help="bf16 dense peak of one GPU for MFU (H100 / H200 SXM: "
                   "989e12); the log's mfu = step FLOPs of all ranks / (step seconds x peak x ranks), n/a on a CPU")
    args = p.parse_args()
    rank, world, device, log = setup_distributed(args.device)
    ensure_toy_world(args, rank)
    train_rows, test_rows = read_splits(args.data)
    toy = train_rows[0].get("world") == toyworld.VERSION
    if args.recolour and not toy:
        raise InputError(args.data, "--recolour permutes the toy world's palette; these clips are not a toy world")
    args.recolour = (0.5 if toy else 0.0) if args.recolour is None else args.recolour

    state = {"step": 0, "epoch": 0, "batch": 0}
    if args.resume:
        path = checkpoint.resume_path(args.out)
        model = checkpoint.load_model(path)
    else:
        model = build_model(args, train_rows, p)
    model.set_trainable(STAGES[args.stage] if args.stage != "sft" or model.cfg.lora_r else {"aligners", "decoder"})
    set_grad_checkpointing(model, args.grad_checkpointing)
    model.to(device).train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    if args.resume:
        state = checkpoint.load_state(path, optimizer)
        log(f"resumed from {path} at step {state['step']}")
    ddp = wrap(model, world, args.compile)
    trainable, total = lora.count_trainable(model)
    log(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable (stage {args.stage}); "
        f"{len(train_rows)} train clips; device {device}, world {world}")

    cfg, pick = model.cfg, getattr(model, "frame_indices", None)  # pick: a Qwen2.5-Omni thinker's own frame rule
    store = ClipStore(train_rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, cache=not args.no_cache,
                      cache_bytes=int(args.cache_gb * 2 ** 30), audio=mel_config(model),  # log-mel made by the loader
                      frame_indices=pick)
    test_store = ClipStore(test_rows, cfg.fps, cfg.max_frames, cfg.vit.image_size,  # decoded once, evaluated many times
                           frame_indices=pick)
    host = getattr(model, "omni", False)  # the thinker preprocesses frames and audio on the host (omni.OmniThinker.preprocess)
    swaps = (lambda items, e, b: recoloured(items, args.recolour, random.Random(f"{args.seed}/{rank}/{e}/{b}"))) \
        if args.recolour else None  # the colour swaps of each batch: a function of (seed, rank, position), so resumable
    loader = Loader(store, args.batch_size, args.seed, rank, world, workers=args.workers, device="cpu" if host else device,
                    transform=swaps)
    stream = loader.iterate(state["epoch"], state["batch"])
    flop_counter = (OmniFlopCounter if getattr(model, "omni", False) else FlopCounter)(model)  # after set_trainable
    t_start, step_time = time.perf_counter(), 0.0
    keys = ("loss", "ce", "ot", "ground", "grad_norm", "not_finite")
    sums = torch.zeros(len(keys), device=device)  # logged numbers summed on the device, read once per log line
    t0, wait0, n_seq, step_flops, n_steps = time.perf_counter(), loader.wait_seconds, 0, 0, 0
    bar = tqdm(total=args.steps, initial=state["step"], desc="sft", disable=rank != 0, leave=False)
    while state["step"] < args.steps:
        lr = set_lr(optimizer, state["step"], args)
        optimizer.zero_grad(set_to_none=True)
        micro = []
        for _ in range(args.grad_accum):
            epoch, batch, items = next(stream)
            state["epoch"], state["batch"] = loader.next_position(epoch, batch)
            micro.append(items)
        # DDP all-reduces in every backward: a micro-batch empty on any rank (all its clips bad) is skipped on all ranks
        micro = [items for items, ok in zip(micro, every_rank([bool(m) for m in micro], world, device)) if ok]
        for j, items in enumerate(micro):
            ids, masks = zip(*(model.render(r["caption"]) for r, *_ in items))
            # gradients are all-reduced once per optimizer step: in the final micro-batch's backward
            with ddp.no_sync() if world > 1 and j < len(micro) - 1 else contextlib.nullcontext():
                with autocast(device):
                    ground = [spans(r.get("events", [])) for r, *_ in items] if cfg.ground_weight else None
                    out = ddp([it[1] for it in items], [it[2] for it in items], [it[3] for it in items], ids, masks, ground=ground)
                (out["loss"] / len(micro)).backward()  # the mean over the micro-batches that ran
            sums[:4] += torch.stack([out[k].detach().float() for k in keys[:4]]) / len(micro)
            n_seq += out["n_seq"]  # a host int: the layout is planned on the host
            step_flops += flop_counter.batch(items, ids, masks)  # host numbers only (flops.py's formula)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        sums[4:] += torch.stack([grad_norm.float(), (~torch.isfinite(grad_norm)).float()])
        n_steps += 1
        step = state["step"] + 1
        # the one device read: at each log line, before a checkpoint or an evaluation, and at the end
        flush = step % args.log_every == 0 or step == args.steps or step % args.save_every == 0 or \
            (args.eval_every and step % args.eval_every == 0) or (args.stop_after and step >= args.stop_after)
        if flush:
            mean = dict(zip(keys, (v / n_steps for v in sums.tolist())))
            if mean["not_finite"] > 0:  # the same all-reduced gradients on every rank: every rank stops here together
                raise SystemExit(f"step {step}: loss {mean['loss']}, gradient norm {mean['grad_norm']} (not finite); "
                                 f"stopping. Lower --lr or check the data; the last checkpoint in {args.out} is intact.")
        optimizer.step()
        state["step"] = step
        bar.update(1)
        if not flush:
            continue
        dt = time.perf_counter() - t0
        step_time += dt
        line = (f"step={state['step']} loss={mean['loss']:.4f} ce={mean['ce']:.4f} ot={mean['ot']:.4f} ground={mean['ground']:.4f} "
                f"lr={lr:.2e} grad_norm={mean['grad_norm']:.3f} tok/s={n_seq * world / dt:.0f} step_s={dt / n_steps:.3f} "
                f"data_wait={(loader.wait_seconds - wait0) / dt:.3f} skipped={len(store.bad)}")
        # MFU against the GPU's bf16 peak; a CPU has no agreed peak, so its line gives the achieved rate alone
        line += f" mfu={mfu(step_flops, dt, args.peak_flops):.4f}" if "cuda" in device else " mfu=n/a(cpu)"
        line += f" tflop/s={step_flops * world / dt / 1e12:.4f}"
        log(line)
        sums.zero_()
        n_seq = step_flops = n_steps = 0
        if rank == 0 and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            checkpoint.save(args.out, model, optimizer, dict(state, args=vars(args)))
        if args.eval_every and state["step"] % args.eval_every == 0:  # every rank captions its share
            metrics, _ = eval_split(model, test_store, args.eval_n, rank=rank, world=world)
            log("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)) + f" step={state['step']}")
        if args.stop_after and state["step"] >= args.stop_after:
            break
        t0, wait0 = time.perf_counter(), loader.wait_seconds  # the next interval starts after the log, save and evaluation
    bar.close()
    total_time = time.perf_counter() - t_start
    log(f"trained {state['step']} steps in {total_time:.1f} s; waiting on data {loader.wait_seconds / max(step_time, 1e-9):.1%} "
        f"of step time; {len(store.bad)} bad clips skipped")
    if not (args.stop_after and state["step"] < args.steps):
        final_eval(model, test_store, args, log, rank, world)
    teardown(model, log)


def final_eval(model, store, args, log, rank=0, world=1):
    """Held-out metrics (the ranks caption shares of the split), printed and saved by rank 0."""
    metrics, texts = eval_split(model, store, args.eval_n, rank=rank, world=world)
    if rank != 0:
        return
    log("held-out: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    for row, text in list(zip(store.rows, texts))[:3]:
        log(f"\n  clip  {row['video']}\n  truth {row['caption']}\n  model {text}")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log(f"\nsaved {args.out}; caption any video with: python sample.py --ckpt {args.out} --video FILE")


if __name__ == "__main__":
    run_main(main)
