"""Toy world: deterministic, decodable, unchanged by refactors; grammar round trip and dialogue; held-out
split; pseudo-untrimmed scaling and grounding spans by hand; metrics on hand-made cases."""
import json
import os
from pathlib import Path

import pytest
import soundfile as sf
import torch

from avnano import grammar as g
from avnano import toyworld as tw
from avnano.grounding import spans
from avnano.media import load_clip
from avnano.metrics import evaluate, repetition_rate
from avnano.render import Sound, Sprite

SPEECH = os.path.join(os.path.dirname(__file__), "..", "avnano", "assets", "speech")
HELD_OUT = {("red", "triangle"), ("yellow", "circle"), ("green", "square")}


def test_generator_deterministic_and_decodable(tmp_path):
    a, b = tw.build(str(tmp_path / "a"), 4, 2, seed=3, workers=1, progress=False), tw.build(str(tmp_path / "b"), 4, 2, seed=3, workers=1, progress=False)
    for split in ("train", "test"):
        rows_a = [json.loads(x) for x in open(f"{a}/{split}.jsonl")]
        rows_b = [json.loads(x) for x in open(f"{b}/{split}.jsonl")]
        assert rows_a == rows_b
        for ra in rows_a:
            ca, cb = load_clip(f"{a}/{ra['video']}", fps=2, max_frames=16, size=(64, 64)), load_clip(f"{b}/{ra['video']}", fps=2, max_frames=16, size=(64, 64))
            assert ca.has_video and ca.has_audio and abs(ca.duration - ra["duration"]) < 0.2
            assert torch.equal(ca.frames, cb.frames) and torch.allclose(ca.audio, cb.audio)
            assert len(ca.frames) == min(16, round(2 * ca.duration))
    other = tw.build(str(tmp_path / "c"), 4, 2, seed=4, workers=1, progress=False)
    assert open(f"{other}/train.jsonl").read() != open(f"{a}/train.jsonl").read()


def test_captions_round_trip_through_parser():
    for seed in range(300):
        for split, pu in (("train", False), ("test", False), ("train", True)):
            events, _ = tw.sample_clip(seed, split, pu)
            ordered = sorted((g.public(e) for e in events), key=lambda e: (e["start"], g.TYPE_ORDER[e["type"]], g.sentence(e)))
            parsed = g.parse(g.caption(events))
            strip = lambda e: {k: v for k, v in e.items() if k in ("type", "start", "end", "colour", "shape", "motion", "sound", "speaker", "text")}
            assert [strip(e) for e in parsed] == [strip(e) for e in ordered]


def test_richness_and_held_out_split():
    kinds, sounds, motions, combos_train, combos_test, speakers, words = set(), set(), set(), set(), set(), set(), set()
    for seed in range(400):
        for split in ("train", "test"):
            events, duration = tw.sample_clip(seed, split)
            assert 4.0 <= duration <= 10.0 and 1 <= len(events) <= 4
            for e in events:
                kinds.add(e["type"])
                sounds.update(s.kind for s in e["_sounds"])
                if e["type"] == "visual":
                    motions.add(e["motion"].split()[0])
                if e["type"] in ("visual", "av"):
                    (combos_train if split == "train" else combos_test).add((e["colour"], e["shape"]))
                if e["type"] == "speech":
                    speakers.add(e["speaker"])
                    words.update(e["text"].split())
    assert kinds == {"visual", "audio", "av", "speech"} and motions == {"appears", "disappears", "moves"}
    assert {"low tone", "high tone", "noise burst", "knock", "rising chirp", "falling chirp", "speech"} <= sounds
    assert not combos_train & HELD_OUT and HELD_OUT <= combos_test and len(combos_test) == 12
    assert speakers == {"A", "B"} and len(words) >= 20


def test_parser_tolerates_garbage():
    events = g.parse("a red circle appears at 1.0 s. the the the blue. speaker C says \"x\" at 2.0 s. ")
    assert [e["type"] for e in events] == ["visual", "unparsed", "unparsed"]
    assert g.parse("") == [] and g.parse("....") == [{"type": "unparsed", "text": "....", "start": -1.0, "end": -1.0}]


GT = [dict(type="visual", colour="red", shape="circle", motion="appears", start=1.0, end=1.0),
      dict(type="audio", sound="high tone", start=2.0, end=4.0),
      dict(type="speech", speaker="A", text="tiger piano", start=3.0, end=3.0),
      dict(type="av", colour="blue", shape="square", start=5.0, end=5.0)]


def test_metrics_hand_made_cases():
    perfect = evaluate([g.caption(GT)], [GT], g.parse)
    assert perfect["event_f1"] == 1.0 and perfect["miss"] == 0.0 and perfect["hall"] == 0.0
    assert perfect["dialogue_acc"] == 1.0 and perfect["mean_tiou"] == 1.0 and perfect["repetition"] == 0.0
    dropped = evaluate([g.caption(GT[1:])], [GT], g.parse)  # one of four events missing
    assert dropped["miss"] == 0.25 and dropped["hall"] == 0.0 and dropped["recall"] == 0.75 and dropped["precision"] == 1.0
    invented = g.caption(GT) + " a green triangle disappears at 6.0 s. gibberish here."
    m = evaluate([invented], [GT], g.parse)
    assert m["miss"] == 0.0 and m["hall"] == 2 / 4 and m["total"] == 0.5
    wrong = [dict(GT[1], sound="low tone"), dict(GT[0], start=2.0, end=2.0), dict(GT[2], text="tiger apple")]
    m = evaluate([g.caption(wrong)], [GT], g.parse)
    assert m["event_f1"] == 0.0 and m["miss"] == 1.0 and m["hall"] == 0.75 and m["dialogue_acc"] == 0.5
    shifted = [dict(GT[1], start=2.5, end=4.0), dict(GT[0], start=1.5, end=1.5)]  # tIoU 0.75, |dt| 0.5: both match
    m = evaluate([g.caption(shifted)], [GT], g.parse)
    assert m["recall"] == 0.5 and m["mean_tiou"] == 0.75
    assert evaluate([g.caption([dict(GT[1], start=3.0, end=5.0)])], [GT], g.parse)["recall"] == 0.0  # tIoU 1/3
    per = evaluate([g.caption(GT[:2])], [GT], g.parse)
    assert per["f1_visual"] == 1.0 and per["f1_audio"] == 1.0 and per["f1_speech"] == 0.0 and per["f1_av"] == 0.0


def test_repetition_rate_by_hand():
    assert repetition_rate("a knock. a knock. a tone plays.") == pytest.approx(2 / 7)  # 7 words, 2 repeated
    assert repetition_rate("one two. three, one two. one two!") == pytest.approx(4 / 7)
    assert repetition_rate("a red circle appears at 1.5 s.") == 0.0 and repetition_rate("") == 0.0


def test_grounding_spans_by_hand():
    events = [dict(type="speech", speaker="B", text="tiger piano", start=3.0, end=3.0),
              dict(type="visual", colour="red", shape="circle", motion="appears", start=1.0, end=1.0),
              dict(type="visual", colour="red", shape="circle", motion="disappears", start=4.0, end=4.0),
              dict(type="visual", colour="blue", shape="square", motion="moves left", start=0.5, end=3.0),
              dict(type="audio", sound="high tone", start=2.0, end=3.5),
              dict(type="av", colour="green", shape="triangle", start=4.0, end=4.0)]
    tiger, piano = (len(sf.read(os.path.join(SPEECH, "B", f"{w}.flac"))[0]) / 16000 for w in ("tiger", "piano"))
    assert 0.2 < tiger < 1.0 and 0.2 < piano < 1.0  # the assets' lengths at 16 kHz; 0.1 s of silence after each word
    want = [(3.0, 3.0 + tiger, "a", 'speaker B says "tiger piano"', ["tiger"]),  # each word over its own audio
            (3.0 + tiger + 0.1, 3.0 + tiger + 0.1 + piano, "a", 'speaker B says "tiger piano"', ["piano"]),
            (3.0, 3.0 + tiger + piano + 0.2, "a", 'speaker B says "tiger piano"', ["B"]),  # the speaker over the utterance
            (1.0, 2.0, "v", "a red circle appears", ["red", "circle", "appears"]),
            (3.0, 4.0, "v", "a red circle disappears", ["red", "circle", "disappears"]),
            (0.5, 3.0, "v", "a blue square moves left", ["blue", "square", "moves", "left"]),
            (2.0, 3.5, "a", "a high tone plays", ["high", "tone"]),
            (3.5, 4.5, "v", "the green triangle knocks", ["green", "triangle"])]
    got = spans(events)
    assert [x[2:] for x in got] == [w[2:] for w in want]
    assert [x[:2] for x in got] == [pytest.approx(w[:2]) for w in want]
    other = spans([dict(type="speech", speaker="C", text="hi", start=1.0, end=1.0)])  # no asset: 0.5 s
    assert [x[:2] for x in other] == [(1.0, 1.5), pytest.approx((1.0, 1.6))]


def test_dialogue_reads_the_speech_sentences():
    text = ('a red circle appears at 1.0 s. speaker B says "tiger piano" at 2.0 s. speaker C says "hello" at 3.0 s. '
            'speaker A says "water". speaker A says " hello " at 4.5 s. a low tone plays from 5.0 to 6.0 s.')
    assert g.dialogue(text) == [("B", "tiger piano"), ("A", "hello")]  # unknown speaker / no time: not dialogue
    assert g.dialogue("") == [] and g.dialogue("a red circle appears at 1.0 s.") == []


class ScriptedRng:
    """Stands in for numpy's generator in pseudo_untrimmed: a fixed scene order and fixed scales."""
    def __init__(self, order, scales):
        self.order, self.scales = order, list(scales)

    def permutation(self, n):
        assert n == len(self.order)
        return self.order

    def choice(self, options):
        assert tuple(options) == (0.75, 1.0, 1.25, 1.5)
        return self.scales.pop(0)


def test_pseudo_untrimmed_by_hand():
    sq = Sprite("square", "blue", (40, 8), (8, 8), vis=(0.0, 2.0), move=(0.5, 1.5))
    knocker = Sprite("circle", "red", (8, 8), (8, 8), vis=(0.0, 2.0), bounces=(1.0,))
    scene0 = ([dict(type="visual", colour="blue", shape="square", motion="moves left", start=0.5, end=1.5, _objects=[sq], _sounds=[]),
               dict(type="av", colour="red", shape="circle", start=1.0, end=1.0, _objects=[knocker],
                    _sounds=[Sound("knock", 1.0, 1.15)])], 2.0)
    scene1 = ([dict(type="audio", sound="high tone", start=0.5, end=1.0, _objects=[], _sounds=[Sound("high tone", 0.5, 1.0)]),
               dict(type="speech", speaker="A", text="tiger", start=2.0, end=2.0, _objects=[],
                    _sounds=[Sound("speech", 2.0, 2.0, "A", ("tiger",))])], 3.0)
    scene2 = ([dict(type="audio", sound="low tone", start=0.0, end=3.0, _objects=[], _sounds=[Sound("low tone", 0.0, 3.0)])], 3.5)
    # scene 1 first, x1.5: 4.5 s, times 0.75 -> 1.0 (0.5 s grid), 3.0. Then scene 0 at 4.5 s, x0.75: 1.5 s, times
    # 0.5 -> 0.375 -> 0.5, 1.0 -> 0.75 -> 1.0 (round half to even), the move keeps its 0.75 -> 1.0 s.
    # Scene 2 x1.5 would end at 6.0 + 5.0 > 10 s: dropped.
    events, duration = tw.pseudo_untrimmed([scene0, scene1, scene2], ScriptedRng([1, 0, 2], [1.5, 0.75, 1.5]))
    assert duration == 6.0
    assert [(g.public(e)["type"], e["start"], e["end"]) for e in events] == [
        ("audio", 1.0, 2.0), ("speech", 3.0, 3.0), ("visual", 5.0, 6.0), ("av", 5.5, 5.5)]
    assert [(s.start, s.end) for e in events[:2] for s in e["_sounds"]] == [(1.0, 2.0), (3.0, 3.0)]
    assert events[1]["_sounds"][0].words == ("tiger",)  # re-rendered, never time-stretched
    (moving,), (bouncing,) = events[2]["_objects"], events[3]["_objects"]
    assert (moving.vis, moving.move, moving.xy0, moving.xy1) == ((4.5, 6.0), (5.0, 6.0), (40, 8), (8, 8))
    assert (bouncing.vis, bouncing.bounces) == ((4.5, 6.0), (5.5,))
    (knock,) = events[3]["_sounds"]
    assert knock.start == 5.5 and knock.end == pytest.approx(5.65)  # a knock keeps its 0.15 s
    short, d = tw.pseudo_untrimmed([scene0], ScriptedRng([0], [1.0]))  # one 2 s scene: padded to the 4 s minimum
    assert d == 4.0 and [(e["start"], e["end"]) for e in short] == [(0.5, 1.5), (1.0, 1.0)]


def test_pseudo_untrimmed_clips_stay_on_the_grid_and_inside():
    on_grid = lambda t: t * 2 == int(t * 2)
    for seed in range(300):
        events, duration = tw.sample_clip(seed, "train", pu=True)
        assert 4.0 <= duration <= 10.0 and on_grid(duration) and events
        for e in events:
            assert on_grid(e["start"]) and on_grid(e["end"]) and 0 <= e["start"] <= e["end"] <= duration
            for o in e["_objects"]:
                assert all(on_grid(t) and 0 <= t <= duration for t in (*o.vis, *o.move, *o.bounces))
            for s in e["_sounds"]:
                assert on_grid(s.start) and 0 <= s.start <= duration
                assert s.end == pytest.approx(s.start + 0.15) if s.kind == "knock" else on_grid(s.end) and s.end <= duration


def test_the_world_is_the_same_bytes_whatever_the_worker_count(tmp_path):
    # x264's output once depended on its threads, and PyAV's per-stream pixel converter carried state from one
    # clip to the next in a worker, so a clip's bytes depended on which clips its worker had written before
    import hashlib

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}
    one = digests(Path(tw.build(str(tmp_path / "one"), 40, 8, seed=0, workers=1, progress=False)))
    two = digests(Path(tw.build(str(tmp_path / "two"), 40, 8, seed=0, workers=2, progress=False)))
    assert len(one) == 40 + 8 + 2 and one == two  # the old code: 2 of these 48 clips differed


def test_named_right_counts_colour_and_shape_per_class_seen_and_unseen():
    gt = [dict(type="visual", colour="red", shape="triangle", motion="appears", start=1.0, end=1.0),    # unseen pair
          dict(type="visual", colour="blue", shape="circle", motion="moves left", start=2.0, end=4.0),  # seen pair
          dict(type="av", colour="green", shape="square", start=3.0, end=3.0)]                          # unseen pair
    text = ("a red circle appears at 1.0 s. a blue circle moves right from 2.0 to 4.0 s. "  # wrong shape; wrong motion
            "the green square knocks at 3.5 s.")                                               # 0.5 s off: still near
    m = evaluate([text], [gt], g.parse, unseen={("red", "triangle"), ("green", "square")})
    assert (m["named_visual_unseen"], m["named_visual_seen"], m["named_av_unseen"]) == (0.0, 1.0, 1.0)
    assert (m["named_unseen"], m["named_seen"]) == (0.5, 1.0)
    assert m["event_f1"] == 2 * (1 / 3) * (1 / 3) / (2 / 3)  # only the knock is a full match
