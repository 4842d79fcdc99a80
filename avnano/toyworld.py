"""The toy AV world: procedural clips whose captions have exact ground truth, their grammar and parser.

Why: real AV caption data and LLM judges are not available offline, so every claim avnano makes
(SFT works, an interleaver helps, DPO lowers Miss + Hall) is measured here, exactly.
A clip is 4-10 s of 64x64 video at 8 fps (shapes on a 4x4 grid of 16 px cells) with a 16 kHz soundtrack, written through PyAV as H.264 +
AAC, so training decodes it like any real video. It holds 1-4 events that overlap in time:
  visual  a coloured shape (3 shapes x 4 colours) appears / disappears / moves left|right|up|down;
  audio   a low or high tone, a noise burst, a rising or falling chirp (intervals);
  av      two shapes each bounce once; only one bounce comes with a knock, and the caption names
          that shape: neither stream alone tells which (the AV events of DESIGN.md §7);
  speech  speaker A or B (two espeak-ng voices) says 1-2 words from a 24-word vocabulary.
Captions list one sentence per event in time order, times at 0.5 s resolution:
  a red circle appears at 1.0 s.            a blue square moves left from 0.5 to 3.0 s.
  a high tone plays from 2.0 to 3.5 s.      the green triangle knocks at 4.0 s.
  speaker A says "tiger piano" at 5.5 s.
`parse()` recovers the events from any text; a sentence outside the grammar becomes an "unparsed"
event (counted as a hallucination by the metrics, never a crash). The held-out split draws from
colour-shape combinations that training never shows (HELD_OUT). Pseudo-untrimmed clips (AVicuna's
PU-VALOR) concatenate 2-3 short scenes, each temporally scaled and in shuffled order, with the
timestamps carried over; departure: the scaled events are re-rendered rather than resampled, so
sounds keep their pitch and words are never time-stretched.
"""
import json
import os
import re
from multiprocessing import Pool

import numpy as np
import soundfile

VERSION = 2  # bump when rendering or grammar change: manifests record it, train_sft.py refuses old worlds
SIZE, VIDEO_FPS, SAMPLE_RATE = 64, 8, 16000
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 50, 50), "green": (50, 190, 70), "blue": (60, 100, 240), "yellow": (235, 215, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SOUNDS = ("low tone", "high tone", "noise burst", "rising chirp", "falling chirp")
SPEAKERS = ("A", "B")
WORDS = ("apple", "river", "tiger", "piano", "rocket", "garden", "window", "coffee", "rabbit", "pencil", "island",
         "summer", "winter", "doctor", "basket", "candle", "forest", "silver", "thunder", "kitten", "ladder",
         "hello", "morning", "water")
HELD_OUT = {("red", "triangle"), ("yellow", "circle"), ("green", "square")}
SPEECH_DIR = os.path.join(os.path.dirname(__file__), "assets", "speech")
WORD_GAP = 0.1  # seconds of silence after each spoken word
POINT_MOTIONS = ("appears", "disappears")


def fmt(t):
    return f"{t:.1f}"


# ------------------------------------------------------------------------------------- grammar
def sentence(e):
    if e["type"] == "visual":
        if e["motion"] in POINT_MOTIONS:
            return f"a {e['colour']} {e['shape']} {e['motion']} at {fmt(e['start'])} s."
        return f"a {e['colour']} {e['shape']} {e['motion']} from {fmt(e['start'])} to {fmt(e['end'])} s."
    if e["type"] == "audio":
        return f"a {e['sound']} plays from {fmt(e['start'])} to {fmt(e['end'])} s."
    if e["type"] == "av":
        return f"the {e['colour']} {e['shape']} knocks at {fmt(e['start'])} s."
    if e["type"] == "speech":
        return f"speaker {e['speaker']} says \"{e['text']}\" at {fmt(e['start'])} s."
    raise ValueError(f"unknown event type {e['type']!r}")


TYPE_ORDER = {"visual": 0, "av": 1, "audio": 2, "speech": 3}


def public(e):
    return {k: v for k, v in e.items() if not k.startswith("_")}


def caption(events):
    ordered = sorted(events, key=lambda e: (e["start"], TYPE_ORDER[e["type"]], sentence(e)))
    return " ".join(sentence(e) for e in ordered)


_C, _S, _T = "|".join(COLOURS), "|".join(SHAPES), r"(\d+(?:\.\d+)?)"
PATTERNS = [
    (re.compile(rf"an? ({_C}) ({_S}) (appears|disappears) at {_T} s\."),
     lambda m: dict(type="visual", colour=m[1], shape=m[2], motion=m[3], start=float(m[4]), end=float(m[4]))),
    (re.compile(rf"an? ({_C}) ({_S}) (moves (?:left|right|up|down)) from {_T} to {_T} s\."),
     lambda m: dict(type="visual", colour=m[1], shape=m[2], motion=m[3], start=float(m[4]), end=float(m[5]))),
    (re.compile(rf"an? ({'|'.join(SOUNDS)}) plays from {_T} to {_T} s\."),
     lambda m: dict(type="audio", sound=m[1], start=float(m[2]), end=float(m[3]))),
    (re.compile(rf"the ({_C}) ({_S}) knocks at {_T} s\."),
     lambda m: dict(type="av", colour=m[1], shape=m[2], start=float(m[3]), end=float(m[3]))),
    (re.compile(rf"speaker ({'|'.join(SPEAKERS)}) says \"([^\"]*)\" at {_T} s\."),
     lambda m: dict(type="speech", speaker=m[1], text=m[2].strip(), start=float(m[3]), end=float(m[3]))),
]


def grounding(events):
    """Per event: (t0, t1, modalities, text, words) for the grounding loss -- the AV tokens of these
    modalities ("v", "a") whose time is in [t0, t1] show or sound the event, and should name the
    `words` of its caption sentence `text` (timestamp removed)."""
    out = []
    for e in events:
        text = re.sub(r" (at|from) .*$", "", sentence(e))
        if e["type"] == "speech":  # the speaker over the utterance, each word over its own audio
            t = e["start"]
            for w in e["text"].split():
                try:
                    dur = len(word_audio(e["speaker"], w)) / SAMPLE_RATE
                except FileNotFoundError:  # a word with no asset: about the mean word's length
                    dur = 0.5
                out.append((t, t + dur, "a", text, [w]))
                t += dur + WORD_GAP
            span, mods, words = (e["start"], t), "a", [e["speaker"]]
        elif e["type"] == "audio":
            span, mods, words = (e["start"], e["end"]), "a", e["sound"].split()
        elif e["type"] == "av":
            span, mods, words = (e["start"] - 0.5, e["start"] + 0.5), "v", [e["colour"], e["shape"]]
        else:
            span = {"appears": (e["start"], e["start"] + 1.0), "disappears": (e["start"] - 1.0, e["start"])}.get(
                e["motion"], (e["start"], e["end"]))
            mods, words = "v", [e["colour"], e["shape"], *e["motion"].split()]
        out.append((*span, mods, text, words))
    return out


def split_sentences(text):
    """Sentences end with '.' followed by whitespace (decimals like 1.5 never are)."""
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text.strip()) if s.strip()]


def parse(text):
    """Caption text -> events; anything outside the grammar -> {"type": "unparsed", "text": ...}."""
    events = []
    for s in split_sentences(text):
        for pattern, build in PATTERNS:
            m = pattern.fullmatch(s)
            if m:
                events.append(build(m))
                break
        else:
            events.append({"type": "unparsed", "text": s, "start": -1.0, "end": -1.0})
    return events


# ------------------------------------------------------------------------------------- sampling
def _grid(rng, lo, hi):
    """A time on the 0.5 s grid in [lo, hi]."""
    return float(rng.integers(int(round(lo * 2)), int(round(hi * 2)) + 1)) / 2


def sample_events(rng, duration, n_events, combos):
    """1-4 events with rendering details (keys starting with '_'); distinct objects, sounds, speakers' turns."""
    cells = list(rng.permutation(16))
    combos = [combos[i] for i in rng.permutation(len(combos))]
    sounds = list(rng.permutation(len(SOUNDS)))
    events, speech_free_at = [], 0.0
    cell_xy = lambda c: (8 + 16 * (c % 4), 8 + 16 * (c // 4))  # centres of a 4x4 grid of 16 px cells
    for _ in range(n_events):
        kind = rng.choice(["visual", "audio", "av", "speech"], p=[0.4, 0.2, 0.15, 0.25])
        if kind == "speech" and speech_free_at > duration - 1.5:
            kind = "visual"
        if kind == "av" and duration < 3.0:  # two bounces 1 s apart need room
            kind = "visual"
        if kind in ("visual", "av") and (len(combos) < 2 or len(cells) < 2):
            kind = "audio"
        if kind == "audio" and not sounds:
            continue
        if kind == "visual":
            colour, shape = combos.pop()
            xy = cell_xy(cells.pop())
            motion = rng.choice(["appears", "disappears", "moves"])
            obj = dict(shape=shape, colour=colour, xy0=xy, xy1=xy, move=(0.0, 0.0), vis=(0.0, duration), bounces=[])
            if motion == "appears":
                t = _grid(rng, 0.5, duration - 1.0)
                obj["vis"], e = (t, duration), dict(motion="appears", start=t, end=t)
            elif motion == "disappears":
                t = _grid(rng, 1.0, duration - 0.5)
                obj["vis"], e = (0.0, t), dict(motion="disappears", start=t, end=t)
            else:
                direction = rng.choice(list(DIRECTIONS))
                t0 = _grid(rng, 0.0, duration - 1.5)
                t1 = min(duration, t0 + _grid(rng, 1.0, 3.0))
                dx, dy = DIRECTIONS[direction]
                obj["xy1"] = (xy[0] + 32 * dx, xy[1] + 32 * dy)  # two cells
                if not (0 < obj["xy1"][0] < SIZE and 0 < obj["xy1"][1] < SIZE):  # off the frame: go the other way
                    direction = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
                    dx, dy = DIRECTIONS[direction]
                    obj["xy1"] = (xy[0] + 32 * dx, xy[1] + 32 * dy)
                obj["move"], e = (t0, t1), dict(motion=f"moves {direction}", start=t0, end=t1)
            events.append(dict(type="visual", colour=colour, shape=shape, **e, _objects=[obj], _sounds=[]))
        elif kind == "av":
            (colour, shape), (c2, s2) = combos.pop(), combos.pop()
            t = _grid(rng, 0.5, duration - 0.5)
            others = [x / 2 for x in range(1, int(duration * 2)) if abs(x / 2 - t) >= 1.0]
            t2 = float(rng.choice(others))
            knocker = dict(shape=shape, colour=colour, xy0=cell_xy(cells[-1]), xy1=cell_xy(cells.pop()), move=(0.0, 0.0),
                           vis=(0.0, duration), bounces=[t])
            quiet = dict(shape=s2, colour=c2, xy0=cell_xy(cells[-1]), xy1=cell_xy(cells.pop()), move=(0.0, 0.0),
                         vis=(0.0, duration), bounces=[t2])
            events.append(dict(type="av", colour=colour, shape=shape, start=t, end=t, _objects=[knocker, quiet],
                               _sounds=[dict(kind="knock", start=t, end=t + 0.15)]))
        elif kind == "audio":
            sound = SOUNDS[sounds.pop()]
            t0 = _grid(rng, 0.0, duration - 1.0)
            t1 = min(duration, t0 + _grid(rng, 0.5, 2.0))
            events.append(dict(type="audio", sound=sound, start=t0, end=t1, _objects=[],
                               _sounds=[dict(kind=sound, start=t0, end=t1)]))
        else:
            t = _grid(rng, speech_free_at, duration - 1.5)
            words = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(1, 3)), replace=False)]
            speaker = SPEAKERS[int(rng.integers(2))]
            speech_free_at = t + 1.5 + 0.5 * len(words)
            events.append(dict(type="speech", speaker=speaker, text=" ".join(words), start=t, end=t, _objects=[],
                               _sounds=[dict(kind="speech", speaker=speaker, words=words, start=t)]))
    return events


def allowed_combos(split):
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return every if split == "test" else [x for x in every if x not in HELD_OUT]


def sample_clip(seed, split="train", pu=False):
    """(events, duration) for one clip; pu=True builds a pseudo-untrimmed clip from 2-3 short scenes."""
    rng = np.random.default_rng(seed)
    if not pu:
        duration = _grid(rng, 4.0, 10.0)
        return sample_events(rng, duration, int(rng.integers(1, 5)), allowed_combos(split)), duration
    scenes = []
    for _ in range(int(rng.integers(2, 4))):
        d = _grid(rng, 2.0, 3.5)
        scenes.append((sample_events(rng, d, int(rng.integers(1, 3)), allowed_combos(split)), d))
    order = rng.permutation(len(scenes))
    events, offset = [], 0.0
    for i in order:
        scale = float(rng.choice([0.75, 1.0, 1.25, 1.5]))
        evs, d = scenes[i]
        new_d = round(d * scale * 2) / 2
        if offset + new_d > 10.0:  # stay within the 10 s clip length
            break
        warp = lambda t: offset + round(t * scale * 2) / 2

        def span(a, b):  # an interval keeps at least 0.5 s after rounding, inside its scene
            if b <= a:
                return warp(a), warp(a)
            end = min(offset + new_d, warp(a) + max(0.5, round((b - a) * scale * 2) / 2))
            return min(warp(a), end - 0.5), end
        for e in evs:
            e = dict(e, start=span(e["start"], e["end"])[0], end=span(e["start"], e["end"])[1])
            e["_objects"] = [dict(o, vis=(warp(o["vis"][0]), min(warp(o["vis"][1]), offset + new_d)),
                                  move=span(*o["move"]), bounces=[warp(b) for b in o["bounces"]]) for o in e["_objects"]]
            e["_sounds"] = [dict(s, start=warp(s["start"]), end=warp(s["start"]) + 0.15 if s["kind"] == "knock"
                                 else span(s["start"], s.get("end", s["start"]))[1]) for s in e["_sounds"]]
            events.append(e)
        offset += new_d
    return events, max(offset, 4.0)


# ------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]


def _shape_mask(shape, cx, cy, r=6):
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy <= r) & (dy >= -r) & (np.abs(dx) * 2 <= dy + r)  # triangle, apex up


def render_frames(events, duration):
    n = int(round(duration * VIDEO_FPS))
    frames = np.full((n, SIZE, SIZE, 3), 24, dtype=np.uint8)
    objects = [o for e in events for o in e["_objects"]]
    for i in range(n):
        t = i / VIDEO_FPS
        for o in objects:
            if not (o["vis"][0] <= t < o["vis"][1]):
                continue
            t0, t1 = o["move"]
            a = 0.0 if t1 <= t0 else float(np.clip((t - t0) / (t1 - t0), 0, 1))
            x = o["xy0"][0] + a * (o["xy1"][0] - o["xy0"][0])
            y = o["xy0"][1] + a * (o["xy1"][1] - o["xy0"][1])
            for b in o["bounces"]:  # down 10 px for +-0.3 s around the bounce, eased back by +-0.5 s: any
                y += 10 * min(1.0, max(0.0, (0.5 - abs(t - b)) / 0.2))  # frame sampled at >= 1.6 fps sees it
            frames[i][_shape_mask(o["shape"], x, y)] = COLOURS[o["colour"]]
    return frames


_SPEECH = {}


def word_audio(speaker, word):
    key = (speaker, word)
    if key not in _SPEECH:
        path = os.path.join(SPEECH_DIR, speaker, f"{word}.flac")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: speech asset missing (run tools/make_speech.sh once)")
        audio, rate = soundfile.read(path, dtype="float32")
        assert rate == SAMPLE_RATE, f"{path}: expected 16 kHz"
        _SPEECH[key] = 0.5 * audio / max(1e-6, np.abs(audio).max())
    return _SPEECH[key]


def render_audio(events, duration, seed):
    rng = np.random.default_rng(seed + 7)
    out = np.zeros(int(round(duration * SAMPLE_RATE)), dtype=np.float32)

    def add(start, wave):
        i = int(start * SAMPLE_RATE)
        wave = wave[:max(0, len(out) - i)]
        out[i:i + len(wave)] += wave

    for s in (s for e in events for s in e["_sounds"]):
        if s["kind"] == "speech":
            words = [word_audio(s["speaker"], w) for w in s["words"]]
            gap = np.zeros(int(WORD_GAP * SAMPLE_RATE), np.float32)
            add(s["start"], np.concatenate([x for w in words for x in (w, gap)]))
            continue
        n = int((s["end"] - s["start"]) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        if s["kind"] == "knock":
            wave = 0.7 * np.sin(2 * np.pi * 180 * t) * np.exp(-t * 40) + 0.3 * rng.standard_normal(n) * np.exp(-t * 120)
        elif s["kind"] == "noise burst":
            wave = 0.15 * rng.standard_normal(n)
        elif s["kind"].endswith("chirp"):
            f0, f1 = (300, 2000) if s["kind"].startswith("rising") else (2000, 300)
            wave = 0.25 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * max(t[-1], 1e-3))))
        else:
            wave = 0.25 * np.sin(2 * np.pi * (300 if s["kind"] == "low tone" else 1200) * t)
        fade = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / 160)  # 10 ms ramps, no clicks
        add(s["start"], (wave * fade).astype(np.float32))
    return np.clip(out, -1, 1)


def write_one(args):
    """Render and write one clip; returns its manifest row."""
    from .media import write_clip
    root, index, seed, split, pu = args
    events, duration = sample_clip(seed, split, pu)
    rel = os.path.join("clips", f"{split}_{index:06d}.mp4")
    write_clip(os.path.join(root, rel), render_frames(events, duration), fps=VIDEO_FPS,
               audio=render_audio(events, duration, seed), sample_rate=SAMPLE_RATE)
    pub = [public(e) for e in events]
    return dict(video=rel, world=VERSION, split=split, duration=duration, caption=caption(events), events=pub, pseudo_untrimmed=pu,
                checklist=[sentence(e) for e in pub],
                dialogue=[dict(speaker=e["speaker"], text=e["text"]) for e in sorted(pub, key=lambda e: e["start"])
                          if e["type"] == "speech"])


def build(root, n_train=2000, n_test=200, seed=0, pu_fraction=0.1, workers=2, progress=True):
    """Write clips/ and train.jsonl / test.jsonl under root (atomically per manifest). Deterministic in seed."""
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    jobs = {"train": [(root, i, seed * 1_000_003 + i, "train", i < int(n_train * pu_fraction)) for i in range(n_train)],
            "test": [(root, i, seed * 1_000_003 + 10_000_000 + i, "test", False) for i in range(n_test)]}
    from tqdm import tqdm
    with Pool(workers) as pool:
        for split, js in jobs.items():
            rows = list(tqdm(pool.imap(write_one, js, chunksize=8), total=len(js), desc=f"toy world {split}",
                             disable=not progress))
            tmp = os.path.join(root, f"{split}.jsonl.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, os.path.join(root, f"{split}.jsonl"))
    return root
