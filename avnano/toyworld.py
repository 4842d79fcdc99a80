"""The toy AV world: procedural clips whose captions have exact ground truth; sampling events and writing the dataset.

Why: real AV caption data and LLM judges are not available offline, so every claim avnano makes
(SFT works, an interleaver helps, DPO lowers Miss + Hall) is measured here, exactly.
A clip is 4-10 s of 64x64 video at 8 fps (shapes on a 4x4 grid of 16 px cells) with a 16 kHz soundtrack,
written through PyAV as H.264 + AAC, so training decodes it like any real video. It holds 1-4 events
that overlap in time:
  visual  a coloured shape (3 shapes x 4 colours) appears / disappears / moves two cells left|right|up|down;
  audio   a low or high tone, a noise burst, a rising or falling chirp (intervals);
  av      two shapes each bounce once; only one bounce comes with a knock, and the caption names
          that shape: neither stream alone tells which;
  speech  speaker A or B (two espeak-ng voices) says 1-2 words from a 24-word vocabulary.
The captions are grammar.py's, the pictures and sounds render.py's. The held-out split draws from
colour-shape combinations that training never shows (HELD_OUT). Pseudo-untrimmed clips (AVicuna's
PU-VALOR) concatenate 2-3 short scenes, each temporally scaled and in shuffled order, with the
timestamps carried over; departure: the scaled events are re-rendered rather than resampled, so
sounds keep their pitch and words are never time-stretched.
"""
import json
import os
from dataclasses import replace
from multiprocessing import Pool

import numpy as np

from .audio import SAMPLE_RATE
from .grammar import COLOURS, DIRECTIONS, SHAPES, SOUNDS, SPEAKERS, WORDS, caption, public, sentence
from .render import CELL, GRID, SIZE, VIDEO_FPS, Sound, Sprite, render_audio, render_frames

VERSION = 2  # bump when rendering or grammar change: manifests record it, train_sft.py refuses old worlds
MIN_SECONDS, MAX_SECONDS = 4.0, 10.0  # clip length
KINDS = {"visual": 0.4, "audio": 0.2, "av": 0.15, "speech": 0.25}  # event kind -> probability
HELD_OUT = {("red", "triangle"), ("yellow", "circle"), ("green", "square")}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
MOVE = 2 * CELL           # 32 px: a move crosses two cells
KNOCK_SECONDS = 0.15
SCENES = (2, 3)           # a pseudo-untrimmed clip: 2-3 scenes of 2-3.5 s, 1-2 events each,
SCENE_SECONDS = (2.0, 3.5)
SCALES = (0.75, 1.0, 1.25, 1.5)  # each scaled in time by one of these


def _grid(rng, lo, hi):
    """A time on the 0.5 s grid in [lo, hi]."""
    return float(rng.integers(int(round(lo * 2)), int(round(hi * 2)) + 1)) / 2


def cell_xy(c):
    """Centre of cell c of the GRID x GRID board, in px."""
    return (CELL // 2 + CELL * (c % GRID), CELL // 2 + CELL * (c // GRID))


def on_frame(xy):
    return 0 < xy[0] < SIZE and 0 < xy[1] < SIZE


def moved(xy, direction):
    dx, dy = STEP[direction]
    return (xy[0] + MOVE * dx, xy[1] + MOVE * dy)


def sample_events(rng, duration, n_events, combos):
    """1-4 events with rendering details (_objects: Sprites, _sounds: Sounds); distinct objects, sounds, speakers' turns."""
    cells = list(rng.permutation(GRID * GRID))
    combos = [combos[i] for i in rng.permutation(len(combos))]
    sounds = list(rng.permutation(len(SOUNDS)))
    events, speech_free_at = [], 0.0
    for _ in range(n_events):
        kind = rng.choice(list(KINDS), p=list(KINDS.values()))
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
            if motion == "appears":
                t = _grid(rng, 0.5, duration - 1.0)
                sprite, e = Sprite(shape, colour, xy, xy, vis=(t, duration)), dict(motion="appears", start=t, end=t)
            elif motion == "disappears":
                t = _grid(rng, 1.0, duration - 0.5)
                sprite, e = Sprite(shape, colour, xy, xy, vis=(0.0, t)), dict(motion="disappears", start=t, end=t)
            else:
                direction = rng.choice(list(DIRECTIONS))
                t0 = _grid(rng, 0.0, duration - 1.5)
                t1 = min(duration, t0 + _grid(rng, 1.0, 3.0))
                if not on_frame(moved(xy, direction)):  # off the frame: go the other way
                    direction = OPPOSITE[direction]
                sprite = Sprite(shape, colour, xy, moved(xy, direction), vis=(0.0, duration), move=(t0, t1))
                e = dict(motion=f"moves {direction}", start=t0, end=t1)
            events.append(dict(type="visual", colour=colour, shape=shape, **e, _objects=[sprite], _sounds=[]))
        elif kind == "av":
            (colour, shape), (c2, s2) = combos.pop(), combos.pop()
            t = _grid(rng, 0.5, duration - 0.5)
            others = [x / 2 for x in range(1, int(duration * 2)) if abs(x / 2 - t) >= 1.0]
            t2 = float(rng.choice(others))
            xy, xy2 = cell_xy(cells.pop()), cell_xy(cells.pop())
            knocker = Sprite(shape, colour, xy, xy, vis=(0.0, duration), bounces=(t,))
            quiet = Sprite(s2, c2, xy2, xy2, vis=(0.0, duration), bounces=(t2,))
            events.append(dict(type="av", colour=colour, shape=shape, start=t, end=t, _objects=[knocker, quiet],
                               _sounds=[Sound("knock", t, t + KNOCK_SECONDS)]))
        elif kind == "audio":
            sound = SOUNDS[sounds.pop()]
            t0 = _grid(rng, 0.0, duration - 1.0)
            t1 = min(duration, t0 + _grid(rng, 0.5, 2.0))
            events.append(dict(type="audio", sound=sound, start=t0, end=t1, _objects=[], _sounds=[Sound(sound, t0, t1)]))
        else:
            t = _grid(rng, speech_free_at, duration - 1.5)
            words = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(1, 3)), replace=False)]
            speaker = SPEAKERS[int(rng.integers(2))]
            speech_free_at = t + 1.5 + 0.5 * len(words)
            events.append(dict(type="speech", speaker=speaker, text=" ".join(words), start=t, end=t, _objects=[],
                               _sounds=[Sound("speech", t, t, speaker, tuple(words))]))
    return events


def allowed_combos(split):
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return every if split == "test" else [x for x in every if x not in HELD_OUT]


# ------------------------------------------------------------------------------------- pseudo-untrimmed
def _scaled(t, scale):
    """t * scale rounded to the 0.5 s grid."""
    return round(t * scale * 2) / 2


def _span(a, b, offset, scale, stop):
    """[a, b] scaled and shifted by offset; a point stays a point, an interval keeps at least 0.5 s
    and ends by stop (its scene's end)."""
    start = offset + _scaled(a, scale)
    if b <= a:
        return start, start
    end = min(stop, start + max(0.5, _scaled(b - a, scale)))
    return min(start, end - 0.5), end


def place(events, offset, scale, length):
    """One scene's events, scaled in time by `scale` and starting at `offset`, all over by offset + length."""
    stop, out = offset + length, []
    for e in events:
        sprites = [replace(o, vis=(offset + _scaled(o.vis[0], scale), min(offset + _scaled(o.vis[1], scale), stop)),
                           move=_span(*o.move, offset, scale, stop),
                           bounces=tuple(offset + _scaled(b, scale) for b in o.bounces)) for o in e["_objects"]]
        sounds = []
        for s in e["_sounds"]:
            start = offset + _scaled(s.start, scale)
            end = start + KNOCK_SECONDS if s.kind == "knock" else _span(s.start, s.end, offset, scale, stop)[1]
            sounds.append(replace(s, start=start, end=end))
        start, end = _span(e["start"], e["end"], offset, scale, stop)
        out.append(dict(e, start=start, end=end, _objects=sprites, _sounds=sounds))
    return out


def pseudo_untrimmed(scenes, rng):
    """(events, duration) scenes -> one clip: the scenes in shuffled order, each scaled in time by a
    factor from SCALES (its length rounded to the 0.5 s grid), as many as fit in MAX_SECONDS; at least
    MIN_SECONDS long. All times stay on the 0.5 s grid (a knock keeps its KNOCK_SECONDS)."""
    events, offset = [], 0.0
    for i in rng.permutation(len(scenes)):
        scale = float(rng.choice(SCALES))
        scene, length = scenes[i]
        length = _scaled(length, scale)
        if offset + length > MAX_SECONDS:
            break
        events += place(scene, offset, scale, length)
        offset += length
    return events, max(offset, MIN_SECONDS)


def sample_clip(seed, split="train", pu=False):
    """(events, duration) for one clip; pu=True builds a pseudo-untrimmed clip from 2-3 short scenes."""
    rng = np.random.default_rng(seed)
    if not pu:
        duration = _grid(rng, MIN_SECONDS, MAX_SECONDS)
        return sample_events(rng, duration, int(rng.integers(1, 5)), allowed_combos(split)), duration
    scenes = []
    for _ in range(int(rng.integers(SCENES[0], SCENES[1] + 1))):
        d = _grid(rng, *SCENE_SECONDS)
        scenes.append((sample_events(rng, d, int(rng.integers(1, 3)), allowed_combos(split)), d))
    return pseudo_untrimmed(scenes, rng)


# ------------------------------------------------------------------------------------- the dataset
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
