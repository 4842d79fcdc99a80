""""GRPO" on the AV captioner with AVoCaDO's rewards R = R_C + R_D + R_L, starting from an SFT checkpoint.

    python train_grpo.py --init out/sft --steps 100
    python train_grpo.py --init out/sft --weights 1,1,0 --out out/grpo_nolen   # without the length reward
    torchrun --nproc_per_node 2 train_grpo.py --init out/sft                     # DDP: gradients averaged

Each step: G = --samples captions per clip from the KV-cache sampler (temperature T), rewards from the clip's
checklist and dialogue, group-normalised advantages, then the clipped-surrogate loss plus beta * k3
KL to the reference (the same model with its LoRA disabled: no second copy) over the sampled tokens,
scored with the same temperature. --iterations mu (GRPO's inner loop, default 1) takes mu optimiser
steps on each batch of samples: the first sees ratio 1 (the loss starts near 0 by design, and the
logged loss and kl are that first step's), later ones see the moved policy, so the ratio and its
clip act (ratio_dev = max |ratio - 1| of the last of them). Watch reward, the zero-spread fraction
(groups that carry no signal) and caption length.
"""
import argparse
import time

import torch
from tqdm import tqdm

from avnano import checkpoint, lora
from avnano.data import ClipStore, Loader, read_splits
from avnano.errors import run_main
from avnano.evaluate import eval_split
from avnano.grammar import dialogue
from avnano.grpo import group_advantages, grpo_loss, kl_k3, up_to_eos
from avnano.rewards import total_reward
from avnano.distributed import autocast, setup_distributed, sync_grads, teardown
from avnano.training import (data_args, ensure_toy_world, make_optimizer, model_args, opt_args, policy_lora, run_args,
                             set_lr)


def policy_steps(model, optimizer, blocks, completions, adv, ref, args, world=1):
    """args.iterations (GRPO's mu) optimiser steps on one batch of samples; pi_old is the policy that
    sampled them. Returns the first step's loss and k3 KL, max |ratio - 1| seen by the last step (0
    when mu == 1), the completion mask and the last gradient norm; the numbers stay on the device (the caller
    reads them once)."""
    for it in range(args.iterations):
        with autocast(model.device):
            logp, cmask = model.completion_logprobs(blocks, completions, args.temperature)
        if it == 0:
            old = logp.detach()
            kl = (kl_k3(old, ref) * cmask).sum() / cmask.sum() if ref is not None else torch.zeros((), device=logp.device)
        loss = grpo_loss(logp, old, ref, adv, cmask, args.beta, args.clip_eps, args.clip_eps_high, args.norm)
        if it == 0:
            first_loss = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(model, world)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        optimizer.step()
    ratio_dev = ((logp.detach() - old).exp() - 1).abs().mul(cmask).max()
    return first_loss, kl, ratio_dev, cmask, grad_norm


def grpo_step(model, optimizer, items, args, gen, world=1):
    """Sample G captions per clip, reward them, and take policy_steps on them. Returns policy_steps' numbers plus
    the (clips, G) rewards and the per-sample reward parts."""
    G = args.samples
    with torch.no_grad(), autocast(model.device):  # only the LoRA trains: encode each clip once, share it across G
        blocks = [b for b in model.av_block(*([it[k] for it in items] for k in (1, 2, 3)))[0] for _ in range(G)]
        model.eval()
        texts, ids = model.generate(None, None, None, blocks=blocks, return_ids=True, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, generator=gen)
    completions = up_to_eos(ids.tolist(), model.tok.eos_ids)
    scored = rewards_for(texts, [it[0] for it in items for _ in range(G)], args)
    r = torch.tensor([s[0] for s in scored], device=model.device).view(-1, G)
    adv = group_advantages(r, args.scale).view(-1)
    model.train()
    ref = None
    if args.beta > 0:
        with torch.no_grad(), lora.disabled(model), autocast(model.device):
            ref, _ = model.completion_logprobs(blocks, completions, args.temperature)
    return *policy_steps(model, optimizer, blocks, completions, adv, ref, args, world), r, scored


def rewards_for(texts, rows, args):
    out = []
    for text, row in zip(texts, rows):
        gt = [(d["speaker"], d["text"]) for d in row.get("dialogue", [])]
        out.append(total_reward(text, row.get("checklist", []), dialogue(text), gt, args.max_words, args.weights))
    return out


def held_out(model, store, args, rank=0, world=1):
    """Greedy captions on the held-out split (each rank captions its share): the exact metrics plus the mean of
    each reward."""
    metrics, texts = eval_split(model, store, args.eval_n, rank=rank, world=world)
    scored = rewards_for([t or "" for t in texts], store.rows[:len(texts)], args)
    metrics.update(reward=sum(s[0] for s in scored) / len(scored), words=sum(len((t or "").split()) for t in texts) / len(texts),
                   **{k: sum(s[1][k] for s in scored) / len(scored) for k in ("r_c", "r_d", "r_l")})
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p, init="out/sft", lora_r=16, lora_alpha=32.0)
    data_args(p)
    opt_args(p, steps=100, lr=5e-4, batch=4, warmup=10)
    run_args(p, out="out/grpo", save_every=200)
    g = p.add_argument_group("GRPO")
    g.add_argument("--samples", type=int, default=8, help="captions sampled per clip (the group size G)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature")
    g.add_argument("--beta", type=float, default=0.04, help="k3 KL weight (0 skips the reference pass)")
    g.add_argument("--iterations", type=int, default=1,
                   help="optimisation steps on each batch of samples (GRPO's mu; > 1 makes the ratio and its clip active)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="ratio clip range epsilon (low side)")
    g.add_argument("--clip-eps-high", type=float, default=None, help="separate high clip (DAPO); default = --clip-eps")
    g.add_argument("--norm", default="grpo", choices=["grpo", "bnpo", "dapo", "dr_grpo"], help="loss normalisation")
    g.add_argument("--scale", default="std", choices=["std", "none"], help="advantage scaling (none = Dr. GRPO)")
    g.add_argument("--weights", type=lambda s: tuple(float(x) for x in s.split(",")), default=(1.0, 1.0, 1.0),
                   help="weights of R_C,R_D,R_L")
    g.add_argument("--max-words", type=int, default=0, help="R_L budget L_max (0 = 95th percentile of training captions)")
    g.add_argument("--max-new-tokens", type=int, default=160, help="sampling length cap")
    args = p.parse_args()
    rank, world, device, log = setup_distributed(args.device)
    ensure_toy_world(args, rank)
    rows, test_rows = read_splits(args.data)
    if not args.max_words:
        lengths = sorted(len(r["caption"].split()) for r in rows)
        args.max_words = lengths[int(0.95 * (len(lengths) - 1))]
    torch.manual_seed(args.seed)  # the same LoRA init on every rank; sampling draws from each rank's own generator
    path = checkpoint.resume_path(args.out) if args.resume else args.init
    model = checkpoint.load_model(path, device=device)
    policy_lora(model, args.lora_r, args.lora_alpha, args.resume)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if args.resume:
        state = checkpoint.load_state(path, optimizer)
    cfg, pick = model.cfg, getattr(model, "frame_indices", None)  # pick: a Qwen2.5-Omni thinker's own frame rule
    store = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, frame_indices=pick)
    test_store = ClipStore(test_rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, frame_indices=pick)
    loader = Loader(store, args.batch_size, args.seed, rank, world)
    stream = loader.iterate(state["epoch"], state["batch"])
    gen = torch.Generator(device).manual_seed(args.seed * 1000 + rank + state["step"])
    log(f"GRPO from {args.init}: G={args.samples}, T={args.temperature}, beta={args.beta}, norm={args.norm}, "
        f"weights={args.weights}, L_max={args.max_words} words; trainable {lora.count_trainable(model)[0]}")
    log("before: " + held_out(model, test_store, args, rank, world))
    bar = tqdm(total=args.steps, initial=state["step"], desc="grpo", disable=rank != 0, leave=False)
    while state["step"] < args.steps:
        t0 = time.perf_counter()
        epoch, batch, items = next(stream)
        state["epoch"], state["batch"] = loader.next_position(epoch, batch)
        if not items:  # all clips bad: safe to skip locally (every collective is in policy_steps, once per counted step)
            continue
        lr = set_lr(optimizer, state["step"], args)
        first_loss, kl, ratio_dev, cmask, grad_norm, r, scored = grpo_step(model, optimizer, items, args, gen, world)
        state["step"] += 1
        parts = {k: sum(s[1][k] for s in scored) / len(scored) for k in ("r_c", "r_d", "r_l")}
        first_loss, kl, ratio_dev, grad_norm, reward, zero_spread, length = torch.stack(  # one device read per step
            [first_loss, kl, ratio_dev, grad_norm, r.mean(), (r.std(-1) == 0).float().mean(), cmask.sum(-1).mean()]).tolist()
        log(f"step={state['step']} loss={first_loss:.4f} reward={reward:.4f} r_c={parts['r_c']:.4f} "
            f"r_d={parts['r_d']:.4f} r_l={parts['r_l']:.4f} zero_spread={zero_spread:.3f} "
            f"kl={kl:.4f} ratio_dev={ratio_dev:.4f} len={length:.1f} lr={lr:.2e} grad_norm={grad_norm:.3f} "
            f"step_s={time.perf_counter() - t0:.2f}")
        bar.update(1)
        if rank == 0 and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            checkpoint.save(args.out, model, optimizer, dict(state, args=vars(args)))
        if args.stop_after and state["step"] >= args.stop_after:
            break
    bar.close()
    if state["step"] == args.steps:
        log("after: " + held_out(model, test_store, args, rank, world))
    teardown(model, log)


if __name__ == "__main__":
    run_main(main)
