"""Caption a split with the model and score it with the exact metrics (used by SFT, DPO and GRPO)."""
import torch
from tqdm import tqdm

from .grammar import parse
from .metrics import evaluate


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
            texts = model.generate([g[0] for _, g in good], [g[1] for _, g in good], [g[2] for _, g in good], **sampling)
            out.update({i: t for (i, _), t in zip(good, texts)})
    model.train(was_training)
    return [out.get(i) for i in indices]


@torch.no_grad()
def heldout_ce(model, store, indices, batch_size=16):
    """Teacher-forced caption cross-entropy per token: more sensitive than F1 early in training."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for s in range(0, len(indices), batch_size):
        good = [(i, g) for i in indices[s:s + batch_size] if (g := store.get(i)) is not None]
        if not good:
            continue
        ids, masks = zip(*(model.render(store.rows[i]["caption"]) for i, _ in good))
        out = model([g[0] for _, g in good], [g[1] for _, g in good], [g[2] for _, g in good], ids, masks)
        total, count = total + out["ce"].item() * out["n_tokens"], count + out["n_tokens"]
    model.train(was_training)
    return total / max(count, 1)


def eval_split(model, store, n=None, batch_size=16, max_new_tokens=160, progress=True):
    """(metrics dict, captions) on the first n clips of the store (all by default)."""
    indices = list(range(len(store.rows) if n is None else min(n, len(store.rows))))
    texts = caption_clips(model, store, indices, batch_size, progress, max_new_tokens=max_new_tokens)
    kept = [(t, store.rows[i]["events"]) for i, t in zip(indices, texts) if t is not None]
    metrics = evaluate([t for t, _ in kept], [e for _, e in kept], parse)
    metrics["heldout_ce"] = heldout_ce(model, store, indices, batch_size)
    return metrics, texts
