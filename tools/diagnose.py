"""What a toy-world checkpoint has learned: held-out CE per word class, an AV-swap test, an audio probe.

    python tools/diagnose.py out/sft [--data data/toyworld] [--clips 96]

1. Teacher-forced held-out CE split by the class of the target word (colour, shape, sound, speaker,
   spoken word, time digits, other): which parts of a caption the model predicts, against chance.
2. Training CE with each clip's own AV block, with the next clip's, and with blank frames/audio:
   if swapping barely hurts, the decoder ignores the AV block.
3. A linear probe on the aligned audio tokens (time embedding not added) for the sound class and
   the speaker: do the encoders carry the identity the decoder has to read?
4. Colour-shape pairs training never shows (toyworld.HELD_OUT) against seen ones: the shape chosen among the
   three shape words teacher-forced after the true colour word and after each colour word in turn (probabilities
   averaged), and the colour and shape read off the visual tokens of the object's span by the output head.
5. How the held-out visual and AV events fail in free captions: for each, the predicted event of its type closest in
   time within the match window (metrics.closest, as named_right picks it): none, colour wrong, shape wrong, both, or right,
   counted apart for objects alone in their clip and objects with others.
"""
import argparse
import collections
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from avnano.data import ClipStore, read_splits  # noqa: E402
from avnano.checkpoint import load_model  # noqa: E402
from avnano.errors import run_main  # noqa: E402
from avnano.evaluate import eval_split  # noqa: E402
from avnano.metrics import closest  # noqa: E402
from avnano.grammar import COLOURS, SHAPES, SOUNDS, WORDS, parse  # noqa: E402
from avnano.grounding import spans  # noqa: E402
from avnano.interleave import VISUAL  # noqa: E402
from avnano.layout import assemble, attention_mask  # noqa: E402
from avnano.toyworld import HELD_OUT  # noqa: E402

CLASSES = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}, **{w: "spoken word" for w in WORDS},
           **{s.split()[0]: "sound" for s in SOUNDS}, "A": "speaker", "B": "speaker"}
CHANCE = {"colour": len(COLOURS), "shape": len(SHAPES), "sound": len(SOUNDS), "speaker": 2, "spoken word": len(WORDS)}


def batches(store, n, size=16):
    """(indices, clips) of the first n clips, bad clips (store.get -> None) left out."""
    for s in range(0, n, size):
        good = [(i, c) for i in range(s, min(n, s + size)) if (c := store.get(i)) is not None]
        if good:
            yield [i for i, _ in good], [c for _, c in good]


@torch.no_grad()
def ce_by_class(model, store, n):
    agg = collections.defaultdict(lambda: [0.0, 0])
    for idx, clips in batches(store, n):
        ids, masks = zip(*(model.render(store.rows[i]["caption"]) for i in idx))
        blocks, _ = model.av_block(*zip(*clips))
        h, x = model.hidden_states(blocks, ids, masks)
        labels, logits = x.labels, model.decoder.logits(h)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(labels.shape)
        for b, t in (labels != -100).nonzero().tolist():
            word = model.tok.decode([int(labels[b, t])]).strip()
            cls = "time digits" if re.fullmatch(r"[\d.]+", word) else CLASSES.get(word, "other")
            agg[cls][0] += ce[b, t].item()
            agg[cls][1] += 1
    for cls, (total, count) in sorted(agg.items()):
        chance = f" (chance ln {CHANCE[cls]} = {math.log(CHANCE[cls]):.2f})" if cls in CHANCE else ""
        print(f"  {cls:>12}: {total / count:.3f} nats over {count} tokens{chance}")


@torch.no_grad()
def swap_test(model, store, n):
    idx, clips = next(batches(store, n, size=n))
    ids, masks = zip(*(model.render(store.rows[i]["caption"]) for i in idx))
    frames, times, audio = map(list, zip(*clips))
    roll = lambda xs: xs[1:] + xs[:1]
    for name, f, t, a in (("own AV block", frames, times, audio), ("next clip's AV block", roll(frames), roll(times), roll(audio)),
                          ("blank frames and audio", [x * 0 for x in frames], times, [x * 0 for x in audio])):
        print(f"  {name:>24}: CE {model(f, t, a, ids, masks)['ce'].item():.3f}")


@torch.no_grad()
def audio_probe(model, store, n, seed=0):
    X, Y = [], []
    for i in range(n):
        clip = store.get(i)
        if clip is None:
            continue
        (tokens, times), = model.encode_audio([clip[2]])
        for e in store.rows[i]["events"]:
            if e["type"] in ("audio", "speech"):
                end = e["end"] if e["type"] == "audio" else e["start"] + 0.5
                sel = (times >= e["start"]) & (times < end)
                label = SOUNDS.index(e["sound"]) if e["type"] == "audio" else len(SOUNDS) + "AB".index(e["speaker"])
                X.append(tokens[sel])
                Y += [label] * int(sel.sum())
    X, Y = torch.cat(X), torch.tensor(Y)
    X = (X - X.mean(0)) / (X.std(0) + 1e-5)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, Y, cut = X[perm], Y[perm], int(0.8 * len(X))
    probe = torch.nn.Linear(X.shape[1], len(SOUNDS) + 2)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(300):
            opt.zero_grad()
            F.cross_entropy(probe(X[:cut]), Y[:cut]).backward()
            opt.step()
    acc = (probe(X[cut:]).argmax(-1) == Y[cut:]).float().mean().item()
    print(f"  held-out probe accuracy {acc:.3f} on {len(X) - cut} tokens (majority class {torch.bincount(Y).max().item() / len(Y):.3f})")


@torch.no_grad()
def pairs_probe(model, store, n):
    one = lambda w: model.tok.encode(" " + w)[-1]
    shape_ids, colour_ids = [one(w) for w in SHAPES], [one(w) for w in COLOURS]
    hits = collections.defaultdict(lambda: [0, 0])
    def count(key, right):
        hits[key][0] += int(right)
        hits[key][1] += 1
    for i in range(n):
        clip = store.get(i)
        if clip is None:
            continue
        ids, mask = model.render(store.rows[i]["caption"])
        blocks, _ = model.av_block(*[[c] for c in clip])
        x = assemble(model, blocks, [ids], [mask])
        labels = x.labels[0].tolist()
        at = [t for t in range(1, len(labels)) if labels[t] in shape_ids and labels[t - 1] in colour_ids]
        probs = {}
        for c in (None, *COLOURS):  # None: the true colour word as written
            e = x.embeds.clone()
            if c is not None:
                e[0, at] = model.decoder.embed.weight[one(c)]
            h = model.decoder(inputs_embeds=e, positions=x.positions, mask=attention_mask(model.cfg.mask, x.is_av, x.valid),
                              return_hidden=True)
            probs[c] = torch.softmax(model.decoder.logits(h)[0, :, shape_ids].float(), -1)
        for t in at:
            pair = (COLOURS[colour_ids.index(labels[t - 1])], SHAPES[shape_ids.index(labels[t])])
            kind = "unseen" if pair in HELD_OUT else "seen"
            right = SHAPES.index(pair[1])
            count(("shape after the true colour", kind), probs[None][t].argmax() == right)
            count(("shape averaged over colours", kind), sum(probs[c][t] for c in COLOURS).argmax() == right)
        tokens, times, modality = blocks[0]
        lens = model.decoder.logits(model.decoder.norm(tokens)).float()
        for t0, t1, mods, _, words in spans(store.rows[i]["events"]):
            inside = (times >= t0 - 1e-3) & (times <= t1 + 1e-3) & (modality == VISUAL)
            if mods != "v" or words[0] not in COLOURS or not inside.any():
                continue
            kind, mean = "unseen" if (words[0], words[1]) in HELD_OUT else "seen", lens[inside].mean(0)
            count(("visual tokens' colour", kind), mean[colour_ids].argmax() == COLOURS.index(words[0]))
            count(("visual tokens' shape", kind), mean[shape_ids].argmax() == SHAPES.index(words[1]))
    for what in dict.fromkeys(k for k, _ in hits):
        print(f"  {what:>28}: seen {hits[what, 'seen'][0] / max(hits[what, 'seen'][1], 1):.3f} ({hits[what, 'seen'][1]}), "
              f"unseen {hits[what, 'unseen'][0] / max(hits[what, 'unseen'][1], 1):.3f} ({hits[what, 'unseen'][1]})")


def failure_kinds(model, store):
    """Section 5 over the whole held-out split (greedy captions, as the evaluation makes them)."""
    _, texts = eval_split(model, store, progress=False)
    kinds = collections.Counter()
    for row, text in zip(store.rows, texts):
        pred, objects = parse(text), [g for g in row["events"] if g["type"] in ("visual", "av")]
        for g in objects:
            p = closest(pred, g)
            wrong = p and [k for k in ("colour", "shape") if p.get(k) != g[k]]
            kinds["alone" if len(objects) == 1 else "with others", "none" if p is None else " and ".join(wrong) or "right"] += 1
    for (where, kind), n in sorted(kinds.items()):
        print(f"  {where:11s} {kind:17s} {n}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="an avnano checkpoint directory (train_sft.py --out)")
    p.add_argument("--data", default="data/toyworld", help="toy world with train.jsonl / test.jsonl")
    p.add_argument("--clips", type=int, default=96, help="clips per measurement")
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model(args.ckpt)
    cfg = model.cfg
    train, test = (ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size) for rows in read_splits(args.data))
    print("held-out CE by word class:")
    ce_by_class(model, test, args.clips)
    print("training CE, own vs swapped vs blank AV block:")
    swap_test(model, train, min(args.clips, 32))
    print("linear probe on aligned audio tokens (5 sounds + 2 speakers):")
    audio_probe(model, train, 4 * args.clips)
    print("held-out objects, colour-shape pairs seen vs never seen in training:")
    pairs_probe(model, test, args.clips)
    print("held-out visual and AV events in free captions (the closest predicted event of the type):")
    failure_kinds(model, test)


if __name__ == "__main__":
    run_main(main)
