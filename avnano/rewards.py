"""AVoCaDO's caption rewards (Chen et al. 2025): checklist R_C, dialogue R_D, length R_L, and their sum.

R_C  fraction of ground-truth checklist items the caption gets right. Default judge: lexical, an item
     counts when its normalised text occurs in the caption (for the toy world, whose items are the
     canonical event sentences, this is exact); pass `judge(caption, item) -> float in [0, 1]` to
     score free-form captions with anything else (an LLM judge, an event parser, ...).
R_D  dialogue F1 over ordered utterance lists [(speaker, text)]. Two utterances may pair when their
     character edit similarity is >= 0.6; a pair scores (speaker agreement + content similarity) / 2;
     an LCS-style DP picks the order-preserving pairing with the largest total s; precision =
     s / |pred|, recall = s / |gt|, R_D = their F1. No-dialogue cases: both empty -> 1 (nothing to
     say, nothing said); exactly one empty -> 0 (dialogue missed or invented).
R_L  1 for captions of at most L_max words, falling linearly to 0 at 2 L_max (AVoCaDO's guard
     against repetition collapse).
"""
import re


def normalise(text):
    return re.sub(r"\s+", " ", text.lower()).strip()


def lexical_judge(caption, item):
    return float(normalise(item) in normalise(caption))


def checklist_reward(caption, checklist, judge=lexical_judge):
    if not checklist:
        return 1.0
    return sum(judge(caption, item) for item in checklist) / len(checklist)


def edit_similarity(a, b):
    """1 - Levenshtein(a, b) / max(|a|, |b|) over characters."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def dialogue_reward(pred, gt, threshold=0.6):
    """pred, gt: ordered lists of (speaker, text)."""
    if not pred and not gt:
        return 1.0
    if not pred or not gt:
        return 0.0
    dp = [[0.0] * (len(gt) + 1) for _ in range(len(pred) + 1)]
    for i, (ps, pt) in enumerate(pred, 1):
        for j, (gs, gt_text) in enumerate(gt, 1):
            sim = edit_similarity(normalise(pt), normalise(gt_text))
            pair = dp[i - 1][j - 1] + ((ps == gs) + sim) / 2 if sim >= threshold else float("-inf")
            dp[i][j] = max(dp[i - 1][j], dp[i][j - 1], pair)
    s = dp[-1][-1]
    precision, recall = s / len(pred), s / len(gt)
    return 2 * precision * recall / (precision + recall) if s > 0 else 0.0


def length_reward(caption, max_words):
    n = len(caption.split())
    return 1.0 if n <= max_words else max(0.0, 1.0 - (n - max_words) / max_words)


def total_reward(caption, checklist, pred_dialogue, gt_dialogue, max_words, weights=(1.0, 1.0, 1.0), judge=lexical_judge):
    """R = w_C R_C + w_D R_D + w_L R_L; returns (R, dict of the parts). A weight of 0 drops a term."""
    parts = {"r_c": checklist_reward(caption, checklist, judge), "r_d": dialogue_reward(pred_dialogue, gt_dialogue),
             "r_l": length_reward(caption, max_words)}
    return sum(w * v for w, v in zip(weights, parts.values())), parts
