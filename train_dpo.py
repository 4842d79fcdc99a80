"""Preference post-training of the AV captioner (video-SALMONN 2): DPO / cDPO / IPO, guided DPO,
multi-round DPO with a fresh LoRA proxy each round, and rebirth tuning.

    python train_dpo.py --init out/sft --rounds 1                          # DPO, one round
    python train_dpo.py --init out/sft --rounds 3 --guided --rebirth-clips 1000   # gDPO mrDPO + rebirth

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
from avnano.evaluate import caption_clips, eval_split
from avnano.metrics import evaluate, repetition_rate
from avnano.model import AVCaptioner
from avnano.rewards import checklist_reward
from avnano.toyworld import parse
from train_grpo import add_lora
from train_sft import data_args, ensure_toy_world, make_optimizer, opt_args, run_args


def parse_thresholds(text):
    return {k: float(v) for k, v in (kv.split(":") for kv in text.split(","))}


def sample_metrics(text, row):
    """Lower is better for every entry. Exact event metrics where the clip has events, else checklist."""
    if "events" in row:
        m = evaluate([text], [row["events"]], parse)
        return {k: m[k] for k in ("miss", "hall", "total", "repetition")}
    return {"total": 1.0 - checklist_reward(text, row.get("checklist", [])), "repetition": repetition_rate(text)}


def held_out(model, store, n, log, tag):
    metrics, _ = eval_split(model, store, n)
    log(f"{tag}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def logprob_sums(model, clips, completions):
    lp, mask = model.completion_logprobs(*clips, completions)
    return (lp * mask).sum(-1), mask.sum(-1)


def train_round(model, store, pairs, args, log, rnd):
    optimizer = make_optimizer(model, args)  # fresh state: the proxy LoRA is a new set of weights
    order = np.random.default_rng(args.seed + rnd).permutation(len(pairs))
    steps = 0
    for epoch in range(args.epochs):
        for s in range(0, len(order) - args.batch_size + 1, args.batch_size):
            t0 = time.perf_counter()
            batch = [pairs[i] for i in order[s:s + args.batch_size]]
            got = [store.get(i) for i, _, _ in batch]
            clips = tuple([g[k] for g in got] for k in range(3))
            chosen = [model.completion_ids(c) for _, c, _ in batch]
            rejected = [model.completion_ids(r) for _, _, r in batch]
            pi_c, n_c = logprob_sums(model, clips, chosen)
            pi_r, n_r = logprob_sums(model, clips, rejected)
            with torch.no_grad(), lora.disabled(model):
                ref_c, _ = logprob_sums(model, clips, chosen)
                ref_r, _ = logprob_sums(model, clips, rejected)
            loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, args.beta, args.loss, args.eps, n_c, n_r)
            total = loss.mean()
            if args.guided:  # gDPO: CE on the ground-truth caption, a third sequence
                gt_sum, gt_n = logprob_sums(model, clips, [model.completion_ids(store.rows[i]["caption"]) for i, _, _ in batch])
                total = guided_dpo_loss(loss, gt_sum, gt_n, args.lam)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
            optimizer.step()
            steps += 1
            log(f"round={rnd + 1} epoch={epoch + 1} step={steps} loss={total.item():.4f} chosen_reward={rc.mean().item():.4f} "
                f"rejected_reward={rr.mean().item():.4f} margin={(rc - rr).mean().item():.4f} "
                f"accuracy={(rc > rr).float().mean().item():.3f} step_s={time.perf_counter() - t0:.2f}")
    return optimizer


def build_pairs(model, store, clips, args, rnd, log):
    gen = torch.Generator(model.device).manual_seed(args.seed * 7919 + rnd)
    scored = [[] for _ in clips]
    for s in tqdm(range(0, len(clips), args.batch_size), desc=f"sampling round {rnd + 1}", leave=False):
        chunk = clips[s:s + args.batch_size]
        got = [(k, store.get(i)) for k, i in enumerate(chunk, start=s)]
        got = [(k, g) for k, g in got if g is not None]
        reps = [(k, g) for k, g in got for _ in range(args.samples)]
        texts = model.generate([g[0] for _, g in reps], [g[1] for _, g in reps], [g[2] for _, g in reps],
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, generator=gen)
        for (k, _), text in zip(reps, texts):
            scored[k].append((text, sample_metrics(text, store.rows[clips[k]])))
    thresholds = parse_thresholds(args.thresholds if rnd == 0 else args.later_thresholds)
    pairs = [(clips[k], c, r) for k, c, r in select_pairs(scored, thresholds)]
    log(f"round={rnd + 1} sampled {len(clips)} clips x {args.samples}; kept {len(pairs)} pairs with thresholds {thresholds}")
    return pairs


def rebirth(model, store, args, log, test_store):
    """Label clips with the final model, drop unnatural captions, fine-tune the pre-DPO model on the rest."""
    idx = np.random.default_rng(args.seed + 99).permutation(len(store.rows))[:args.rebirth_clips].tolist()
    texts = caption_clips(model, store, idx, args.batch_size, max_new_tokens=args.max_new_tokens)
    keep = [(i, t) for i, t in zip(idx, texts)
            if t and repetition_rate(t) == 0 and all(e["type"] != "unparsed" for e in parse(t))]
    log(f"rebirth: kept {len(keep)} of {len(idx)} self-labelled captions")
    base = AVCaptioner.load(args.init, device=model.device)
    base.set_trainable({"aligners", "decoder", "lora"})
    optimizer = make_optimizer(base, argparse.Namespace(**{**vars(args), "lr": args.rebirth_lr}))
    rng = np.random.default_rng(args.seed)
    for step in range(args.rebirth_steps):
        batch = [keep[j] for j in rng.choice(len(keep), size=min(args.batch_size, len(keep)), replace=False)]
        got = [store.get(i) for i, _ in batch]
        ids, masks = zip(*(base.render(t) for _, t in batch))
        out = base([g[0] for g in got], [g[1] for g in got], [g[2] for g in got], ids, masks)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        log(f"rebirth step={step + 1} loss={out['loss'].item():.4f}")
    held_out(base, test_store, args.eval_n, log, "after rebirth")
    base.save(args.out + "_rebirth")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_args(p)
    opt_args(p, steps=None, lr=5e-4, batch=8)
    run_args(p, out="out/dpo", loop_flags=())
    g = p.add_argument_group("DPO")
    g.add_argument("--init", default="out/sft", help="SFT checkpoint (the pre-DPO model)")
    g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "cdpo", "ipo"], help="DPO variant")
    g.add_argument("--guided", action="store_true", help="gDPO: add lambda * CE on the ground-truth caption")
    g.add_argument("--lam", type=float, default=0.1, help="gDPO weight lambda")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    g.add_argument("--eps", type=float, default=0.1, help="cDPO label smoothing")
    g.add_argument("--rounds", type=int, default=1, help="DPO rounds (>1: multi-round DPO with a fresh LoRA proxy)")
    g.add_argument("--clips-per-round", type=int, default=256, help="training clips sampled each round")
    g.add_argument("--samples", type=int, default=4, help="captions sampled per clip")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pairs")
    g.add_argument("--thresholds", default="total:0.2,repetition:0.0", help="round-1 margins metric:value,...")
    g.add_argument("--later-thresholds", default="total:0.2,repetition:-0.01", help="margins for rounds 2+")
    g.add_argument("--epochs", type=int, default=2, help="passes over each round's pairs")
    g.add_argument("--max-new-tokens", type=int, default=160, help="sampling length cap")
    g.add_argument("--lora-r", type=int, default=16, help="proxy LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="proxy LoRA alpha")
    g.add_argument("--rebirth-clips", type=int, default=0, help="clips to self-label for rebirth tuning (0 = skip)")
    g.add_argument("--rebirth-steps", type=int, default=200, help="SFT steps of rebirth tuning")
    g.add_argument("--rebirth-lr", type=float, default=5e-4, help="rebirth tuning learning rate")
    args = p.parse_args()
    log = lambda *a: print(*a, flush=True)
    ensure_toy_world(args, 0)
    rows, test_rows = read_splits(args.data)
    torch.manual_seed(args.seed)
    start = 0
    if args.resume:  # round-level resume: the checkpoint holds the merged model after its last round
        path = checkpoint.resume_path(args.out)
        model = AVCaptioner.load(path, device=args.device)
        start = checkpoint.load_state(path, make_optimizer(model, args))["round"]
        log(f"resumed after round {start}")
    else:
        model = AVCaptioner.load(args.init, device=args.device)
    add_lora(model, args)
    cfg = model.cfg
    store, test_store = (ClipStore(r, cfg.fps, cfg.max_frames, cfg.vit.image_size) for r in (rows, test_rows))
    held_out(model, test_store, args.eval_n, log, "before")
    order = np.random.default_rng(args.seed).permutation(len(rows)).tolist()
    for rnd in range(start, args.rounds):
        clips = order[(rnd * args.clips_per_round) % len(rows):][:args.clips_per_round]
        pairs = build_pairs(model, store, clips, args, rnd, log)
        optimizer = train_round(model, store, pairs, args, log, rnd) if len(pairs) >= args.batch_size else make_optimizer(model, args)
        lora.new_proxy(model)  # merge; the merged model is the next reference; a fresh proxy LoRA trains next
        held_out(model, test_store, args.eval_n, log, f"after round {rnd + 1}")
        checkpoint.save(args.out, model, optimizer, {"round": rnd + 1, "args": vars(args)})
    if args.rebirth_clips:
        rebirth(model, store, args, log, test_store)


if __name__ == "__main__":
    main()
