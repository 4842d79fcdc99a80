"""Preference post-training of the AV captioner (video-SALMONN 2): DPO / cDPO / IPO, guided DPO,
multi-round DPO with a fresh LoRA proxy each round, and rebirth tuning.

    python train_dpo.py --init out/sft --rounds 1                          # DPO, one round
    python train_dpo.py --init out/sft --rounds 3 --guided --rebirth-clips 1000   # gDPO mrDPO + rebirth
    torchrun --nproc_per_node 2 train_dpo.py --init out/sft --rounds 3 --guided   # DDP: ranks share sampling and batches

Each round: sample --samples captions per clip (temperature T) from the current model, score every
sample with the exact metrics against the clip's events (Miss, Hall, Total, repetition), keep a
(best, worst) pair only when the best beats the worst on every metric by the round's thresholds
(video-SALMONN 2 Table 3), and train the LoRA on the pairs. The reference is the same model with the
adapter disabled (no second copy). After a round the LoRA is merged into the base weights and a
fresh zero-initialised proxy LoRA starts: the merged model is the next round's policy *and*
reference. Rebirth tuning: the final model captions many clips, unnatural outputs (any repeated
phrase, any sentence outside the grammar) are dropped, and the *pre-DPO* model is fine-tuned on
the rest. Every step logs loss, chosen/rejected implicit rewards, margin and pair accuracy.
"""
import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

from avnano import checkpoint, lora
from avnano.data import ClipStore, read_splits
from avnano.dpo import dpo_loss, guided_dpo_loss, select_pairs
from avnano.errors import run_main
from avnano.evaluate import caption_clips, eval_split
from avnano.grammar import parse
from avnano.metrics import evaluate, repetition_rate
from avnano.rewards import checklist_reward
from avnano.distributed import autocast, gather, mean_over_ranks, setup_distributed, sync_grads, teardown
from avnano.training import data_args, ensure_toy_world, make_optimizer, model_args, opt_args, policy_lora, run_args


def parse_thresholds(text):
    return {k: float(v) for k, v in (kv.split(":") for kv in text.split(","))}


def sample_metrics(text, row):
    """Lower is better for every entry. Exact event metrics where the clip has events, else checklist."""
    if "events" in row:
        m = evaluate([text], [row["events"]], parse)
        return {k: m[k] for k in ("miss", "hall", "total", "repetition")}
    return {"total": 1.0 - checklist_reward(text, row.get("checklist", [])), "repetition": repetition_rate(text)}


def held_out(model, store, n, log, tag, rank=0, world=1):
    """Every rank captions its share of the held-out clips; rank 0 prints."""
    metrics, _ = eval_split(model, store, n, rank=rank, world=world)
    log(f"{tag}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def logprob_sums(model, blocks, completions):
    with autocast(model.device):
        lp, mask = model.completion_logprobs(blocks, completions)
    return (lp * mask).sum(-1), mask.sum(-1)


def train_round(model, store, pairs, args, log, rnd, world, rank):
    """Epochs over the round's pairs; a global batch is batch_size pairs per rank, gradients averaged."""
    optimizer = make_optimizer(model, args.lr, args.weight_decay)  # fresh state: the proxy LoRA is a new set of weights
    order = np.random.default_rng(args.seed + rnd).permutation(len(pairs))
    B, steps = args.batch_size, 0
    for epoch in range(args.epochs):
        for s in range(0, len(order) - B * world + 1, B * world):
            t0 = time.perf_counter()
            batch = [pairs[i] for i in order[s + rank * B:s + (rank + 1) * B]]
            got = [store.get(i) for i, _, _ in batch]
            with torch.no_grad(), autocast(model.device):  # only the LoRA trains: each clip is encoded once
                blocks = model.av_block(*([g[k] for g in got] for k in range(3)))[0]
            pair_ids = [model.completion_ids(c) for _, c, _ in batch] + [model.completion_ids(r) for _, _, r in batch]
            pi, n = logprob_sums(model, blocks * 2, pair_ids)  # chosen rows, then rejected rows
            with torch.no_grad(), lora.disabled(model):
                ref, _ = logprob_sums(model, blocks * 2, pair_ids)
            loss, rc, rr = dpo_loss(pi[:B], pi[B:], ref[:B], ref[B:], args.beta, args.loss, args.cdpo_eps, n[:B], n[B:])
            total = loss.mean()
            if args.guided:  # gDPO: CE on the ground-truth caption, a third sequence
                gt_sum, gt_n = logprob_sums(model, blocks, [model.completion_ids(store.rows[i]["caption"]) for i, _, _ in batch])
                total = guided_dpo_loss(loss, gt_sum, gt_n, args.guided_weight)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            sync_grads(model, world)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
            optimizer.step()
            steps += 1
            stats = mean_over_ranks(torch.stack([total.detach(), rc.mean(), rr.mean(), (rc > rr).float().mean()]).tolist(), world,
                                    model.device)  # one device read per step
            log(f"round={rnd + 1} epoch={epoch + 1} step={steps} loss={stats[0]:.4f} chosen_reward={stats[1]:.4f} "
                f"rejected_reward={stats[2]:.4f} margin={stats[1] - stats[2]:.4f} accuracy={stats[3]:.3f} "
                f"step_s={time.perf_counter() - t0:.2f}")
    return optimizer


def build_pairs(model, store, clips, args, rnd, log, world, rank):
    """Each rank samples its share of the clips; the kept pairs are gathered so every rank trains on the same list."""
    gen = torch.Generator(model.device).manual_seed(args.seed * 7919 + rnd * 101 + rank)
    mine = clips[rank::world]
    scored = [[] for _ in mine]
    for s in tqdm(range(0, len(mine), args.batch_size), desc=f"sampling round {rnd + 1}", leave=False, disable=rank != 0):
        got = [(k, store.get(i)) for k, i in enumerate(mine[s:s + args.batch_size], start=s)]
        got = [(k, g) for k, g in got if g is not None]
        if not got:  # every clip of this batch is bad (no collective inside this loop: skipping is safe)
            continue
        with torch.no_grad(), autocast(model.device):
            blocks = model.av_block(*([g[j] for _, g in got] for j in range(3)))[0]
            texts = model.generate(None, None, None, blocks=[b for b in blocks for _ in range(args.samples)],
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, generator=gen)
        for (k, _), text in zip([x for x in got for _ in range(args.samples)], texts):
            scored[k].append((text, sample_metrics(text, store.rows[mine[k]])))
    thresholds = parse_thresholds(args.thresholds if rnd == 0 else args.later_thresholds)
    pairs = gather([(mine[k], c, r) for k, c, r in select_pairs(scored, thresholds)], world)
    log(f"round={rnd + 1} sampled {len(clips)} clips x {args.samples}; kept {len(pairs)} pairs with thresholds {thresholds}")
    return pairs


def rebirth(model, store, args, log, test_store, world, rank):
    """Label clips with the final model, drop unnatural captions, fine-tune the pre-DPO model on the rest."""
    idx = np.random.default_rng(args.seed + 99).permutation(len(store.rows))[:args.rebirth_clips].tolist()[rank::world]
    texts = caption_clips(model, store, idx, args.batch_size, max_new_tokens=args.max_new_tokens)
    keep = gather([(i, t) for i, t in zip(idx, texts)
                   if t and repetition_rate(t) == 0 and all(e["type"] != "unparsed" for e in parse(t))], world)
    log(f"rebirth: kept {len(keep)} of {min(args.rebirth_clips, len(store.rows))} self-labelled captions")
    if not keep:
        log("rebirth: skipped (no self-labelled caption passed the filter)")
        return model
    base = checkpoint.load_model(args.init, device=model.device)
    base.set_trainable({"aligners", "decoder", "lora"})
    optimizer = make_optimizer(base, args.rebirth_lr, args.weight_decay)
    rng = np.random.default_rng(args.seed + rank)  # each rank draws its own batch; gradients are averaged
    for step in range(args.rebirth_steps):
        batch = [keep[j] for j in rng.choice(len(keep), size=min(args.batch_size, len(keep)), replace=False)]
        got = [store.get(i) for i, _ in batch]
        ids, masks = zip(*(base.render(t) for _, t in batch))
        with autocast(base.device):
            out = base([g[0] for g in got], [g[1] for g in got], [g[2] for g in got], ids, masks)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        sync_grads(base, world)
        optimizer.step()
        log(f"rebirth step={step + 1} loss={mean_over_ranks([out['loss'].item()], world, base.device)[0]:.4f}")
    held_out(base, test_store, args.eval_n, log, "after rebirth", rank, world)
    if rank == 0:
        checkpoint.save_model(base, args.out + "_rebirth")
    return base


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p, init="out/sft", lora_r=16, lora_alpha=32.0)
    data_args(p)
    opt_args(p, steps=None, lr=5e-4, batch=8)
    run_args(p, out="out/dpo")
    g = p.add_argument_group("DPO")
    g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "cdpo", "ipo"], help="DPO variant")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    g.add_argument("--cdpo-eps", type=float, default=0.1, help="cDPO label smoothing epsilon (--loss cdpo)")
    g.add_argument("--guided", action="store_true", help="gDPO: add lambda * CE on the ground-truth caption")
    g.add_argument("--guided-weight", type=float, default=0.1, help="gDPO weight lambda of the ground-truth CE")
    g.add_argument("--rounds", type=int, default=1, help="DPO rounds (>1: multi-round DPO with a fresh LoRA proxy)")
    g.add_argument("--clips-per-round", type=int, default=256, help="training clips sampled each round")
    g.add_argument("--samples", type=int, default=4, help="captions sampled per clip")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pairs")
    g.add_argument("--thresholds", default="total:0.2,repetition:0.0", help="round-1 margins metric:value,...")
    g.add_argument("--later-thresholds", default="total:0.2,repetition:-0.01", help="margins for rounds 2+")
    g.add_argument("--epochs", type=int, default=2, help="passes over each round's pairs")
    g.add_argument("--max-new-tokens", type=int, default=160, help="sampling length cap")
    g.add_argument("--rebirth-clips", type=int, default=0, help="clips to self-label for rebirth tuning (0 = skip)")
    g.add_argument("--rebirth-steps", type=int, default=200, help="SFT steps of rebirth tuning")
    g.add_argument("--rebirth-lr", type=float, default=5e-4, help="rebirth tuning learning rate")
    args = p.parse_args()
    rank, world, device, log = setup_distributed(args.device)
    ensure_toy_world(args, rank)
    rows, test_rows = read_splits(args.data)
    torch.manual_seed(args.seed)
    # round-level resume: the checkpoint holds the merged model (and a fresh proxy LoRA) after its last round
    path = checkpoint.resume_path(args.out) if args.resume else args.init
    model = checkpoint.load_model(path, device=device)
    policy_lora(model, args.lora_r, args.lora_alpha, args.resume)
    start = 0
    if args.resume:  # rounds restart their optimizer: only the RNG and the round count carry over
        start = checkpoint.load_state(path)["round"]
        log(f"resumed after round {start}")
    cfg, pick = model.cfg, getattr(model, "frame_indices", None)  # pick: a Qwen2.5-Omni thinker's own frame rule
    store, test_store = (ClipStore(r, cfg.fps, cfg.max_frames, cfg.vit.image_size, frame_indices=pick) for r in (rows, test_rows))
    held_out(model, test_store, args.eval_n, log, "before", rank, world)
    order = np.random.default_rng(args.seed).permutation(len(rows)).tolist()
    for rnd in range(start, args.rounds):
        clips = order[(rnd * args.clips_per_round) % len(rows):][:args.clips_per_round]
        pairs = build_pairs(model, store, clips, args, rnd, log, world, rank)
        optimizer = train_round(model, store, pairs, args, log, rnd, world, rank) \
            if len(pairs) >= args.batch_size * world else make_optimizer(model, args.lr, args.weight_decay)
        lora.new_proxy(model)  # merge; the merged model is the next reference; a fresh proxy LoRA trains next
        held_out(model, test_store, args.eval_n, log, f"after round {rnd + 1}", rank, world)
        if rank == 0:
            checkpoint.save(args.out, model, optimizer, {"round": rnd + 1, "args": vars(args)})
    if args.rebirth_clips:
        model = rebirth(model, store, args, log, test_store, world, rank)
    teardown(model, log)


if __name__ == "__main__":
    run_main(main)
