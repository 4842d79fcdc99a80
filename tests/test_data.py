"""The data loader on real video files (640x360, 10 s, H.264 + AAC written here): worker processes give the same
batches as the in-process path, log-mel made by the loader equals the model's own, the clip cache stays within its
byte bound (least recently used clips dropped), and train_sft.py trains with --workers and reports data_wait."""
import json
import re

import numpy as np
import pytest
import torch

from avnano.audio import MelSegments
from avnano.data import ClipStore, Loader, mel_config, pack, read_manifest, unpack
from avnano.media import write_clip
from tests.helpers import run_script

N_FILES, SECONDS, FPS = 3, 10, 5


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """3 files (5 fps keeps the H.264 encode cheap), 6 training rows (each file twice, its own caption), 1 held-out."""
    root = tmp_path_factory.mktemp("real")
    n, t = SECONDS * FPS, np.arange(SECONDS * 16000) / 16000
    for f in range(N_FILES):
        frames = np.zeros((n, 360, 640, 3), np.uint8)
        frames[..., f] = 60
        for i in range(n):  # a square moving right, a different colour per file
            x = (i * 11 + 50 * f) % 560
            frames[i, 140:220, x:x + 80] = (255, 255 * (f % 2), 80 * f)
        write_clip(str(root / f"clip{f}.mp4"), frames, fps=FPS, audio=0.3 * np.sin(2 * np.pi * 220 * (f + 1) * t))
    rows = [{"video": f"clip{i % N_FILES}.mp4", "caption": f"a square moves right, tone {i % N_FILES}, take {i}."}
            for i in range(2 * N_FILES)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return root


@pytest.fixture(scope="module")
def model():
    from avnano.model import AVCaptioner, preset
    from avnano.tokenizer import Tokenizer
    torch.manual_seed(0)
    tok = Tokenizer.train(["a square moves right, tone 1.", "Describe the clip."], vocab_size=300)
    return AVCaptioner(preset("tiny", tok.vocab_size, max_frames=4, fps=1.0), tok).eval()


def batches(loader, n):
    stream = loader.iterate()
    out = [next(stream) for _ in range(n)]
    stream.close()
    return out


def same_items(a, b):
    assert [r["caption"] for r, *_ in a] == [r["caption"] for r, *_ in b]
    for (_, fa, ta, aa), (_, fb, tb, ab) in zip(a, b):
        assert torch.equal(fa, fb) and torch.equal(ta, tb) and fa.shape == (4, 64, 64, 3)
        assert isinstance(aa, MelSegments) and aa.tokens == ab.tokens and len(aa.mels) == len(ab.mels)
        assert all(torch.equal(x, y) for x, y in zip(aa.mels, ab.mels))


def test_workers_give_the_same_batches_as_the_in_process_loader(manifest, model):
    rows, cfg = read_manifest(str(manifest / "train.jsonl")), model.cfg
    store = lambda: ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, audio=mel_config(model))
    n = 4  # 6 rows in batches of 2: 3 per epoch, so 4 batches cross into epoch 1
    plain = batches(Loader(store(), 2, seed=3), n)
    workers = Loader(store(), 2, seed=3, workers=2)
    try:
        got = batches(workers, n)
        stream = workers.iterate(1, 1)  # resumed mid-epoch, by the same (persistent) worker processes
        again = next(stream)
        stream.close()
    finally:
        workers.close()
    assert [(e, b) for e, b, _ in got] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    for (_, _, a), (_, _, b) in zip(plain, got):
        same_items(a, b)
    same_items(again[2], Loader(store(), 2, seed=3).iterate(1, 1).__next__()[2])
    # the pinned-buffer path (CUDA) packs each batch into one buffer per dtype and splits it after the copy
    packed = Loader(store(), 2, seed=3)
    packed.pack = True
    for (_, _, a), (_, _, b) in zip(plain, batches(packed, n)):
        same_items(a, b)
    items = plain[0][2]
    _, buffers, _ = pack(items, pin=False)
    assert sorted(map(str, buffers)) == ["torch.float32", "torch.uint8"]  # frames; log-mel (times stay on the host)
    same_items(unpack(pack(items, pin=False), "cpu"), items)


def test_a_transform_changes_each_batch_before_it_is_packed(manifest, model):
    rows, cfg = read_manifest(str(manifest / "train.jsonl")), model.cfg
    store = lambda: ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, audio=mel_config(model))
    mark = lambda items, e, b: [(dict(r, caption=f"{e}/{b}"), f.flip(1), *rest) for r, f, *rest in items]  # noqa: E731
    plain = batches(Loader(store(), 2, seed=3), 4)
    loader = Loader(store(), 2, seed=3, transform=mark)
    loader.pack = True  # the CUDA path: the transform sees the host copies, the packed batch carries its output
    for (e, b, got), (_, _, ref) in zip(batches(loader, 4), plain):
        assert [r["caption"] for r, *_ in got] == [f"{e}/{b}"] * len(ref)
        assert all(torch.equal(f, g.flip(1)) for (_, f, *_), (_, g, *_) in zip(got, ref))


def test_log_mel_from_the_loader_equals_the_models_own(manifest, model):
    rows, cfg = read_manifest(str(manifest / "train.jsonl")), model.cfg
    raw = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size)  # the waveform, log-mel in encode_audio
    mel = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, audio=mel_config(model))
    waves, feats = [raw.get(i)[2] for i in (0, 1)], [mel.get(i)[2] for i in (0, 1)]
    assert waves[0].dim() == 1 and abs(len(waves[0]) - SECONDS * 16000) <= 160
    with torch.no_grad():
        for (ta, xa), (tb, xb) in zip(model.encode_audio(waves), model.encode_audio(feats)):
            assert torch.equal(ta, tb) and torch.equal(xa, xb)


def test_clip_cache_stays_within_its_byte_bound(manifest, model):
    rows, cfg = read_manifest(str(manifest / "train.jsonl")), model.cfg
    probe = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, audio=mel_config(model))
    probe.get(0)
    one = probe.cache_used  # frames 4 x 64 x 64 x 3 + 4 times + 80 x 1000 log-mel floats
    assert one == 4 * 64 * 64 * 3 + 4 * 4 + 80 * 1000 * 4
    limit = int(2.5 * one)  # room for two clips
    store = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, cache_bytes=limit, audio=mel_config(model))
    loader = Loader(store, 2, seed=0, workers=2)
    try:
        stream = loader.iterate()
        for _ in range(6):  # two epochs
            _, _, items = next(stream)
            assert store.cache_used <= limit and len(store.items) <= 2
            assert store.cache_used == len(store.items) * one
        stream.close()
    finally:
        loader.close()
    lru = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, cache_bytes=limit, audio=mel_config(model))
    for i in (0, 1, 0, 2):  # without a loader's prefetching: 1 is the least recently used when 2 arrives
        lru.get(i)
    assert sorted(lru.items) == [0, 2] and lru.cache_used == 2 * one
    off = ClipStore(rows, cfg.fps, cfg.max_frames, cfg.vit.image_size, cache=False)
    assert off.get(0) is not None and off.cache_used == 0 and not off.items


def test_train_sft_with_workers_reports_data_wait(manifest, tmp_path):
    log = run_script("train_sft.py", "--data", manifest, "--workers", "2", "--steps", "4", "--stop-after", "2",
                     "--batch-size", "2", "--max-frames", "4", "--fps", "1", "--warmup", "1", "--save-every", "1000",
                     "--out", tmp_path / "out", timeout=300)
    lines = [line for line in log.stdout.splitlines() if line.startswith("step=")]
    assert len(lines) == 2, log.stdout + log.stderr
    for line in lines:
        wait = float(re.search(r"data_wait=([\d.]+)", line)[1])
        assert 0.0 <= wait <= 1.0 and "skipped=0" in line
