"""Exact caption metrics on parsed events: event P/R/F1, Miss / Hall / Total, temporal IoU, dialogue word
accuracy, repetition rate, per-modality F1.

Matching: a predicted event matches a ground-truth one when the type and every attribute agree and
the times agree: temporal IoU >= 0.5 for intervals, |dt| <= 0.5 s for point events (start == end).
Within a clip, pairs are taken greedily by closeness in time, each event used once.
video-SALMONN 2 (Sec. 4.1): Miss = missed gt events / all gt events; Hall = hallucinated or wrong
predicted events / all gt events (an unparsable sentence counts as one); Total = Miss + Hall. All
corpus-level (sums over clips before dividing).
Repetition rate (video-SALMONN 2, App. B): split the caption into phrases at punctuation; words in the
*repeated* occurrences of a phrase (every occurrence after its first) / all words.
Named right (compositional generalisation): a gt visual / AV event is named right when the predicted event of
its type closest in time (within the matching window) has its colour and shape, whatever else it gets
wrong; reported apart for colour-shape pairs the training split never shows (`unseen`) and the others.
Dialogue word accuracy: for each gt utterance, the words of the time-closest predicted utterance of the
same speaker (|dt| <= 1 s) aligned by longest common subsequence; matched words / all gt words.
"""
import re

ATTRS = {"visual": ("colour", "shape", "motion"), "audio": ("sound",), "av": ("colour", "shape"),
         "speech": ("speaker", "text")}
MODALITIES = ("visual", "audio", "av", "speech")


def temporal_iou(a, b):
    inter = max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"]))
    union = max(a["end"], b["end"]) - min(a["start"], b["start"])
    return inter / union if union > 0 else float(a["start"] == b["start"])


def time_match(p, g):
    """(matches?, closeness score) for two events of the same kind."""
    if g["start"] == g["end"] or p["start"] == p["end"]:
        dt = abs(p["start"] - g["start"])
        return dt <= 0.5, -dt
    iou = temporal_iou(p, g)
    return iou >= 0.5, iou


def match(pred, gt):
    """Greedy one-to-one matching -> list of (pred index, gt index, tIoU or None for point events)."""
    candidates = []
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            if p["type"] != g["type"] or p["type"] not in ATTRS:
                continue
            if any(p.get(k) != g.get(k) for k in ATTRS[p["type"]]):
                continue
            ok, score = time_match(p, g)
            if ok:
                candidates.append((score, i, j))
    used_p, used_g, pairs = set(), set(), []
    for score, i, j in sorted(candidates, reverse=True):
        if i not in used_p and j not in used_g:
            used_p.add(i), used_g.add(j)
            point = gt[j]["start"] == gt[j]["end"]
            pairs.append((i, j, None if point else temporal_iou(pred[i], gt[j])))
    return pairs


def closest(pred, g):
    """The predicted event of g's type closest in time to g within the match window, or None."""
    near = [(score, p) for p in pred if p["type"] == g["type"] for ok, score in [time_match(p, g)] if ok]
    return max(near, key=lambda x: x[0])[1] if near else None


def named_right(pred, g):
    """Does the predicted event of g's type closest in time to g (within the match window) name g's colour and shape?"""
    p = closest(pred, g)
    return p is not None and all(p.get(k) == g[k] for k in ("colour", "shape"))


def lcs(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def dialogue_words(pred, gt):
    """(matched words, gt words) for one clip."""
    said = [p for p in pred if p["type"] == "speech"]
    hit = total = 0
    for g in (g for g in gt if g["type"] == "speech"):
        words = g["text"].split()
        total += len(words)
        near = [p for p in said if p["speaker"] == g["speaker"] and abs(p["start"] - g["start"]) <= 1.0]
        if near:
            best = min(near, key=lambda p: abs(p["start"] - g["start"]))
            hit += lcs(words, best["text"].split())
    return hit, total


def repetition_rate(text):
    phrases = [p.strip().lower() for p in re.split(r"[.,;:!?]+(?=\s|$)", text) if p.strip()]
    total = sum(len(p.split()) for p in phrases)
    seen, repeated = set(), 0
    for p in phrases:
        if p in seen:
            repeated += len(p.split())
        seen.add(p)
    return repeated / total if total else 0.0


def f1(tp, n_pred, n_gt):
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gt if n_gt else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(pred_texts, gt_events, parse, unseen=()):
    """Corpus metrics for predicted caption texts against ground-truth event lists; unseen: the (colour, shape)
    pairs the training split never shows (named_* figures per event class and seen / unseen)."""
    named = {(m, u): [0, 0] for m in ("visual", "av") for u in ("seen", "unseen")}  # named right, all
    tp = n_pred = n_gt = 0
    ious, words_hit, words_all, reps = [], 0, 0, []
    per = {m: [0, 0, 0] for m in MODALITIES}  # tp, pred, gt
    for text, gt in zip(pred_texts, gt_events):
        pred = parse(text)
        pairs = match(pred, gt)
        tp, n_pred, n_gt = tp + len(pairs), n_pred + len(pred), n_gt + len(gt)
        ious += [iou for _, _, iou in pairs if iou is not None]
        h, a = dialogue_words(pred, gt)
        words_hit, words_all = words_hit + h, words_all + a
        reps.append(repetition_rate(text))
        for g in (g for g in gt if g["type"] in ("visual", "av")):
            count = named[g["type"], "unseen" if (g["colour"], g["shape"]) in unseen else "seen"]
            count[0], count[1] = count[0] + named_right(pred, g), count[1] + 1
        for m in MODALITIES:
            per[m][0] += sum(1 for i, _, _ in pairs if pred[i]["type"] == m)
            per[m][1] += sum(1 for p in pred if p["type"] == m)
            per[m][2] += sum(1 for g in gt if g["type"] == m)
    precision, recall, event_f1 = f1(tp, n_pred, n_gt)
    miss = (n_gt - tp) / n_gt if n_gt else 0.0
    hall = (n_pred - tp) / n_gt if n_gt else 0.0
    out = dict(event_f1=event_f1, precision=precision, recall=recall, miss=miss, hall=hall, total=miss + hall,
               mean_tiou=sum(ious) / len(ious) if ious else 0.0,
               dialogue_acc=words_hit / words_all if words_all else 0.0,
               repetition=sum(reps) / len(reps) if reps else 0.0, n_gt=n_gt, n_pred=n_pred)
    for m in MODALITIES:
        out[f"f1_{m}"] = f1(*per[m])[2]
    for u in ("seen", "unseen"):
        hit, n = (sum(named[m, u][i] for m in ("visual", "av")) for i in (0, 1))
        out[f"named_{u}"] = hit / n if n else 0.0
        out.update({f"named_{m}_{u}": named[m, u][0] / named[m, u][1] if named[m, u][1] else 0.0 for m in ("visual", "av")})
    return out
