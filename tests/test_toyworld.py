"""Toy world: deterministic, decodable, parser round trip, held-out split; metrics on hand-made cases."""
import json
import os

import pytest
import soundfile as sf
import torch

from avnano import toyworld as tw
from avnano.media import load_clip
from avnano.metrics import evaluate, repetition_rate


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
            ordered = sorted((tw.public(e) for e in events), key=lambda e: (e["start"], tw.TYPE_ORDER[e["type"]], tw.sentence(e)))
            parsed = tw.parse(tw.caption(events))
            strip = lambda e: {k: v for k, v in e.items() if k in ("type", "start", "end", "colour", "shape", "motion", "sound", "speaker", "text")}
            assert [strip(e) for e in parsed] == [strip(e) for e in ordered]


def test_richness_and_held_out_split():
    kinds, sounds, motions, combos_train, combos_test, speakers = set(), set(), set(), set(), set(), set()
    for seed in range(400):
        for split in ("train", "test"):
            events, duration = tw.sample_clip(seed, split)
            assert 4.0 <= duration <= 10.0 and 1 <= len(events) <= 4
            for e in events:
                kinds.add(e["type"])
                sounds.update(s["kind"] for s in e["_sounds"])
                if e["type"] == "visual":
                    motions.add(e["motion"].split()[0])
                if e["type"] in ("visual", "av"):
                    (combos_train if split == "train" else combos_test).add((e["colour"], e["shape"]))
                if e["type"] == "speech":
                    speakers.add(e["speaker"])
    assert kinds == {"visual", "audio", "av", "speech"} and motions == {"appears", "disappears", "moves"}
    assert {"low tone", "high tone", "noise burst", "knock", "rising chirp", "falling chirp", "speech"} <= sounds
    assert not combos_train & tw.HELD_OUT and tw.HELD_OUT <= combos_test
    assert speakers == {"A", "B"} and len(tw.WORDS) >= 20


def test_parser_tolerates_garbage():
    events = tw.parse("a red circle appears at 1.0 s. the the the blue. speaker C says \"x\" at 2.0 s. ")
    assert [e["type"] for e in events] == ["visual", "unparsed", "unparsed"]
    assert tw.parse("") == [] and tw.parse("....") == [{"type": "unparsed", "text": "....", "start": -1.0, "end": -1.0}]


GT = [dict(type="visual", colour="red", shape="circle", motion="appears", start=1.0, end=1.0),
      dict(type="audio", sound="high tone", start=2.0, end=4.0),
      dict(type="speech", speaker="A", text="tiger piano", start=3.0, end=3.0),
      dict(type="av", colour="blue", shape="square", start=5.0, end=5.0)]


def test_metrics_hand_made_cases():
    perfect = evaluate([tw.caption(GT)], [GT], tw.parse)
    assert perfect["event_f1"] == 1.0 and perfect["miss"] == 0.0 and perfect["hall"] == 0.0
    assert perfect["dialogue_acc"] == 1.0 and perfect["mean_tiou"] == 1.0 and perfect["repetition"] == 0.0
    dropped = evaluate([tw.caption(GT[1:])], [GT], tw.parse)  # one of four events missing
    assert dropped["miss"] == 0.25 and dropped["hall"] == 0.0 and dropped["recall"] == 0.75 and dropped["precision"] == 1.0
    invented = tw.caption(GT) + " a green triangle disappears at 6.0 s. gibberish here."
    m = evaluate([invented], [GT], tw.parse)
    assert m["miss"] == 0.0 and m["hall"] == 2 / 4 and m["total"] == 0.5
    wrong = [dict(GT[1], sound="low tone"), dict(GT[0], start=2.0, end=2.0), dict(GT[2], text="tiger apple")]
    m = evaluate([tw.caption(wrong)], [GT], tw.parse)
    assert m["event_f1"] == 0.0 and m["miss"] == 1.0 and m["hall"] == 0.75 and m["dialogue_acc"] == 0.5
    shifted = [dict(GT[1], start=2.5, end=4.0), dict(GT[0], start=1.5, end=1.5)]  # tIoU 0.75, |dt| 0.5: both match
    m = evaluate([tw.caption(shifted)], [GT], tw.parse)
    assert m["recall"] == 0.5 and m["mean_tiou"] == 0.75
    assert evaluate([tw.caption([dict(GT[1], start=3.0, end=5.0)])], [GT], tw.parse)["recall"] == 0.0  # tIoU 1/3
    per = evaluate([tw.caption(GT[:2])], [GT], tw.parse)
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
    t1 = 3.0 + len(sf.read(os.path.join(tw.SPEECH_DIR, "B", "tiger.flac"))[0]) / tw.SAMPLE_RATE  # the asset's length
    t2 = t1 + tw.WORD_GAP + len(sf.read(os.path.join(tw.SPEECH_DIR, "B", "piano.flac"))[0]) / tw.SAMPLE_RATE
    got, want = tw.grounding(events), [
        (3.0, t1, "a", 'speaker B says "tiger piano"', ["tiger"]),  # each word over its own audio
        (t1 + tw.WORD_GAP, t2, "a", 'speaker B says "tiger piano"', ["piano"]),
        (3.0, t2 + tw.WORD_GAP, "a", 'speaker B says "tiger piano"', ["B"]),  # the speaker over the utterance
        (1.0, 2.0, "v", "a red circle appears", ["red", "circle", "appears"]),
        (3.0, 4.0, "v", "a red circle disappears", ["red", "circle", "disappears"]),
        (0.5, 3.0, "v", "a blue square moves left", ["blue", "square", "moves", "left"]),
        (2.0, 3.5, "a", "a high tone plays", ["high", "tone"]),
        (3.5, 4.5, "v", "the green triangle knocks", ["green", "triangle"])]
    assert [g[2:] for g in got] == [w[2:] for w in want]
    assert [g[:2] for g in got] == [pytest.approx(w[:2]) for w in want]
    other = tw.grounding([dict(type="speech", speaker="C", text="hi", start=1.0, end=1.0)])  # no asset: 0.5 s
    assert [g[:2] for g in other] == [(1.0, 1.5), (1.0, 1.5 + tw.WORD_GAP)]
