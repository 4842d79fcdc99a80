"""Caption a split with the model and score it with the exact metrics (used by SFT, DPO and GRPO)."""
import torch
from tqdm import tqdm

from .distributed import autocast, gather, sum_over_ranks
from .grammar import parse
from .metrics import evaluate
from .toyworld import HELD_OUT


@torch.no_grad()
def caption_clips(model, store, indices, batch_size=16, progress=True, **sampling):
    """Greedy (or sampled) captions for store clips `indices`; bad clips give None."""
    was_training = model.training
    model.eval()
    out = {}
    for s in tqdm(range(0, len(indices), batch_size), desc="captioning", disable=not progress, leave=False):
        idx = indices[s:s + batch_size]
        got = [(i, store.get(i)) for i in idx]
        good = [(i, g) for i, g in got if g is not None]
        if good:
            with autocast(model.device):
                texts = model.generate([g[0] for _, g in good], [g[1] for _, g in good], [g[2] for _, g in good], **sampling)
            out.update({i: t for (i, _), t in zip(good, texts)})
    model.train(was_training)
    return [out.get(i) for i in indices]


@torch.no_grad()
def ce_sums(model, store, indices, batch_size=16):
    """(summed caption cross-entropy, caption tokens) of clips `indices`, teacher-forced."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for s in range(0, len(indices), batch_size):
        good = [(i, g) for i in indices[s:s + batch_size] if (g := store.get(i)) is not None]
        if not good:
            continue
        ids, masks = zip(*(model.render(store.rows[i]["caption"]) for i, _ in good))
        with autocast(model.device):
            out = model([g[0] for _, g in good], [g[1] for _, g in good], [g[2] for _, g in good], ids, masks)
        total, count = total + out["ce"].float().item() * out["n_tokens"], count + out["n_tokens"]
    model.train(was_training)
    return total, count


def heldout_ce(model, store, indices, batch_size=16):
    """Teacher-forced caption cross-entropy per token: more sensitive than F1 early in training."""
    total, count = ce_sums(model, store, indices, batch_size)
    return total / max(count, 1)


def eval_split(model, store, n=None, batch_size=16, max_new_tokens=160, progress=True, rank=0, world=1):
    """(metrics dict, captions) on the first n clips of the store (all by default). Under DDP every rank calls it:
    each captions every world-th clip, and all ranks get the whole split's captions and metrics."""
    indices = list(range(len(store.rows) if n is None else min(n, len(store.rows))))
    mine = indices[rank::world]
    texts = caption_clips(model, store, mine, batch_size, progress and rank == 0, max_new_tokens=max_new_tokens)
    by_index = dict(gather(list(zip(mine, texts)), world))
    texts = [by_index[i] for i in indices]
    kept = [(t, store.rows[i]["events"]) for i, t in zip(indices, texts) if t is not None and "events" in store.rows[i]]
    # the event metrics need ground-truth events (the toy world's); a manifest of real videos gets the CE alone
    metrics = evaluate([t for t, _ in kept], [e for _, e in kept], parse, HELD_OUT) if kept else {}
    total, count = sum_over_ranks(list(ce_sums(model, store, mine, batch_size)), world, model.device)
    metrics["heldout_ce"] = total / max(count, 1)
    return metrics, texts
