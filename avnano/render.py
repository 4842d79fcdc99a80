"""The toy world's renderer: sprites to 64x64 RGB frames at 8 fps, sounds to a 16 kHz mono soundtrack.

The frame is a GRID x GRID board of CELL px cells; a sprite (a coloured circle, square or triangle of
RADIUS px around a cell centre) is drawn while visible, slides linearly during its move and dips
BOUNCE px at each bounce time. Sounds: a low or high tone, a noise burst, a rising or falling chirp
(10 ms fades against clicks), a knock (a damped KNOCK_HZ sine plus a noise transient), and speech: each
word's espeak-ng recording (assets/speech, made by tools/make_speech.sh) followed by WORD_GAP of silence.
The noise is drawn from its own generator, seeded seed + NOISE_SEED_OFFSET.
"""
import os
from dataclasses import dataclass

import numpy as np
import soundfile

from .audio import SAMPLE_RATE

SIZE, VIDEO_FPS = 64, 8          # frame side in px, frames per second
GRID = 4
CELL = SIZE // GRID              # 16 px
RADIUS = 3 * CELL // 8           # 6 px: a shape's half-width
BOUNCE = 5 * CELL // 8           # 10 px: how far a bounce dips
BACKGROUND = 24                  # dark grey
RGB = {"red": (230, 50, 50), "green": (50, 190, 70), "blue": (60, 100, 240), "yellow": (235, 215, 40)}
KNOCK_HZ = 180
TONE_HZ = {"low tone": 300, "high tone": 1200}
CHIRP_HZ = (300, 2000)           # a rising chirp sweeps up this range, a falling one down
FADE = SAMPLE_RATE // 100        # 10 ms ramps in and out
WORD_GAP = 0.1                   # seconds of silence after each spoken word
SPEECH_DIR = os.path.join(os.path.dirname(__file__), "assets", "speech")
NOISE_SEED_OFFSET = 7            # the soundtrack's noise: default_rng(seed + 7), apart from the sampler's


@dataclass(frozen=True)
class Sprite:
    """A shape on screen: visible for vis[0] <= t < vis[1], sliding from xy0 to xy1 during move (no
    motion when move[1] <= move[0]), dipping at each time in bounces."""
    shape: str
    colour: str
    xy0: tuple
    xy1: tuple
    vis: tuple
    move: tuple = (0.0, 0.0)
    bounces: tuple = ()


@dataclass(frozen=True)
class Sound:
    """kind: a SOUNDS name, "knock" or "speech" (its words set its length, `end` is ignored)."""
    kind: str
    start: float
    end: float
    speaker: str = ""
    words: tuple = ()


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]


def shape_mask(shape, cx, cy, r=RADIUS):
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy <= r) & (dy >= -r) & (np.abs(dx) * 2 <= dy + r)  # triangle, apex up


def render_frames(events, duration):
    """[n, SIZE, SIZE, 3] uint8 frames of the events' sprites, n = duration * VIDEO_FPS."""
    n = int(round(duration * VIDEO_FPS))
    frames = np.full((n, SIZE, SIZE, 3), BACKGROUND, dtype=np.uint8)
    sprites = [o for e in events for o in e["_objects"]]
    for i in range(n):
        t = i / VIDEO_FPS
        for o in sprites:
            if not (o.vis[0] <= t < o.vis[1]):
                continue
            t0, t1 = o.move
            a = 0.0 if t1 <= t0 else float(np.clip((t - t0) / (t1 - t0), 0, 1))
            x = o.xy0[0] + a * (o.xy1[0] - o.xy0[0])
            y = o.xy0[1] + a * (o.xy1[1] - o.xy0[1])
            for b in o.bounces:  # fully down for +-0.3 s around the bounce, eased back by +-0.5 s: any
                y += BOUNCE * min(1.0, max(0.0, (0.5 - abs(t - b)) / 0.2))  # frame sampled at >= 1.6 fps sees it
            frames[i][shape_mask(o.shape, x, y)] = RGB[o.colour]
    return frames


_SPEECH = {}


def word_audio(speaker, word):
    """One spoken word (float32, peak 0.5), read once from assets/speech/<speaker>/<word>.flac."""
    key = (speaker, word)
    if key not in _SPEECH:
        path = os.path.join(SPEECH_DIR, speaker, f"{word}.flac")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: speech asset missing (run tools/make_speech.sh once)")
        audio, rate = soundfile.read(path, dtype="float32")
        assert rate == SAMPLE_RATE, f"{path}: expected 16 kHz"
        _SPEECH[key] = 0.5 * audio / max(1e-6, np.abs(audio).max())
    return _SPEECH[key]


def waveform(kind, n, rng):
    """n samples of a non-speech sound."""
    t = np.arange(n) / SAMPLE_RATE
    if kind == "knock":
        return 0.7 * np.sin(2 * np.pi * KNOCK_HZ * t) * np.exp(-t * 40) + 0.3 * rng.standard_normal(n) * np.exp(-t * 120)
    if kind == "noise burst":
        return 0.15 * rng.standard_normal(n)
    if kind.endswith("chirp"):
        f0, f1 = CHIRP_HZ if kind.startswith("rising") else CHIRP_HZ[::-1]
        return 0.25 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * max(t[-1], 1e-3))))
    return 0.25 * np.sin(2 * np.pi * TONE_HZ[kind] * t)


def render_audio(events, duration, seed):
    """The events' sounds mixed into duration * SAMPLE_RATE float32 samples, clipped to [-1, 1]."""
    rng = np.random.default_rng(seed + NOISE_SEED_OFFSET)
    out = np.zeros(int(round(duration * SAMPLE_RATE)), dtype=np.float32)

    def add(start, wave):
        i = int(start * SAMPLE_RATE)
        wave = wave[:max(0, len(out) - i)]
        out[i:i + len(wave)] += wave

    for s in (s for e in events for s in e["_sounds"]):
        if s.kind == "speech":
            gap = np.zeros(int(WORD_GAP * SAMPLE_RATE), np.float32)
            add(s.start, np.concatenate([x for w in s.words for x in (word_audio(s.speaker, w), gap)]))
            continue
        n = int((s.end - s.start) * SAMPLE_RATE)
        fade = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / FADE)
        add(s.start, (waveform(s.kind, n, rng) * fade).astype(np.float32))
    return np.clip(out, -1, 1)
