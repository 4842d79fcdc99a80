"""The toy world's caption grammar: its vocabulary, one sentence per event, and the parser back to events.

A caption lists one sentence per event in time order, times at 0.5 s resolution:
  a red circle appears at 1.0 s.            a blue square moves left from 0.5 to 3.0 s.
  a high tone plays from 2.0 to 3.5 s.      the green triangle knocks at 4.0 s.
  speaker A says "tiger piano" at 5.5 s.
An event is a dict: type ("visual", "audio", "av", "speech"), start, end (equal for point events) and
the attributes its sentence names. `parse()` recovers the events from any text; a sentence outside the
grammar becomes an "unparsed" event (counted as a hallucination by the metrics, never a crash).
Metrics, rewards and the post-training scripts all read captions through this one grammar.
"""
import re

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up", "down")
POINT_MOTIONS = ("appears", "disappears")
SOUNDS = ("low tone", "high tone", "noise burst", "rising chirp", "falling chirp")
SPEAKERS = ("A", "B")
WORDS = ("apple", "river", "tiger", "piano", "rocket", "garden", "window", "coffee", "rabbit", "pencil", "island",
         "summer", "winter", "doctor", "basket", "candle", "forest", "silver", "thunder", "kitten", "ladder",
         "hello", "morning", "water")
TYPE_ORDER = {"visual": 0, "av": 1, "audio": 2, "speech": 3}  # sentences at the same time: in this order


def fmt(t):
    return f"{t:.1f}"


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


def public(e):
    """The event without its rendering details (keys starting with '_')."""
    return {k: v for k, v in e.items() if not k.startswith("_")}


def caption(events):
    ordered = sorted(events, key=lambda e: (e["start"], TYPE_ORDER[e["type"]], sentence(e)))
    return " ".join(sentence(e) for e in ordered)


_C, _S, _T = "|".join(COLOURS), "|".join(SHAPES), r"(\d+(?:\.\d+)?)"
PATTERNS = [  # (sentence pattern, match -> event), one per sentence form above
    (re.compile(rf"an? ({_C}) ({_S}) ({'|'.join(POINT_MOTIONS)}) at {_T} s\."),
     lambda m: dict(type="visual", colour=m[1], shape=m[2], motion=m[3], start=float(m[4]), end=float(m[4]))),
    (re.compile(rf"an? ({_C}) ({_S}) (moves (?:{'|'.join(DIRECTIONS)})) from {_T} to {_T} s\."),
     lambda m: dict(type="visual", colour=m[1], shape=m[2], motion=m[3], start=float(m[4]), end=float(m[5]))),
    (re.compile(rf"an? ({'|'.join(SOUNDS)}) plays from {_T} to {_T} s\."),
     lambda m: dict(type="audio", sound=m[1], start=float(m[2]), end=float(m[3]))),
    (re.compile(rf"the ({_C}) ({_S}) knocks at {_T} s\."),
     lambda m: dict(type="av", colour=m[1], shape=m[2], start=float(m[3]), end=float(m[3]))),
    (re.compile(rf"speaker ({'|'.join(SPEAKERS)}) says \"([^\"]*)\" at {_T} s\."),
     lambda m: dict(type="speech", speaker=m[1], text=m[2].strip(), start=float(m[3]), end=float(m[3]))),
]


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


def dialogue(text):
    """[(speaker, words)] of the caption's speech sentences, in the caption's order (the dialogue reward's
    input); a speech sentence outside the grammar (an unknown speaker, no time) is not dialogue."""
    return [(e["speaker"], e["text"]) for e in parse(text) if e["type"] == "speech"]
