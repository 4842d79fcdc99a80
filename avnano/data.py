"""Clips from a JSONL manifest, decoded once and kept in memory, served in a resumable, shardable order.

Manifest rows (the toy world writes these; real data uses the same shape): {"video": path relative to
the manifest, "caption": str, optional "events", "checklist", "dialogue"}. Each clip goes through
the same media path as any real video (media.load_clip). A clip that fails to decode is reported
once with its file and problem, counted, and skipped: training never dies on one bad sample.
Order: a permutation of the clips drawn from (seed, epoch); batch b of an epoch is a fixed slice
of it, so the data position (epoch, batch) restores the stream exactly on --resume, and rank r of
W takes every W-th clip of each global batch (DDP).
A background thread decodes the next batches while the model trains; `wait_seconds` tells how long
the training loop stood waiting for data.
"""
import json
import os
import queue
import sys
import threading
import time

import numpy as np
import torch

from .media import MediaError, load_clip


def read_splits(root):
    """(train rows, held-out rows) from root/train.jsonl and root/test.jsonl."""
    return read_manifest(os.path.join(root, "train.jsonl")), read_manifest(os.path.join(root, "test.jsonl"))


def read_manifest(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    root = os.path.dirname(os.path.abspath(path))
    for r in rows:
        r["path"] = r["video"] if os.path.isabs(r["video"]) else os.path.join(root, r["video"])
    return rows


class ClipStore:
    """Decoded clips by index: frames uint8, frame times, audio kept as int16 (half the memory)."""

    def __init__(self, rows, fps, max_frames, image_size, cache=True):
        self.rows, self.fps, self.max_frames, self.size = rows, fps, max_frames, (image_size, image_size)
        self.cache, self.items, self.bad = cache, {}, {}
        self.lock = threading.Lock()

    def get(self, i):
        """(frames, frame_times, audio float32) or None if the clip is bad."""
        if i in self.bad:
            return None
        if i in self.items:
            f, t, a = self.items[i]
            return f, t, a.float() / 32767
        try:
            clip = load_clip(self.rows[i]["path"], self.fps, self.max_frames, self.size)
        except (MediaError, OSError) as e:
            with self.lock:
                if i not in self.bad:
                    self.bad[i] = str(e)
                    print(f"skipping bad clip: {e}", file=sys.stderr)
            return None
        audio16 = (clip.audio.clamp(-1, 1) * 32767).round().to(torch.int16)
        if self.cache:
            self.items[i] = (clip.frames, clip.frame_times, audio16)
        return clip.frames, clip.frame_times, audio16.float() / 32767


def epoch_order(n, seed, epoch):
    return np.random.default_rng(seed * 100_003 + epoch).permutation(n)


def batch_indices(n, batch_size, seed, epoch, rank=0, world=1):
    """Global batches of one epoch (the last partial one dropped), each sliced for this rank."""
    order = epoch_order(n, seed, epoch)
    global_bs = batch_size * world
    return [order[b * global_bs:(b + 1) * global_bs][rank::world].tolist() for b in range(n // global_bs)]


class Loader:
    """Iterates (epoch, batch_no, items) from a start position; items = [(row, frames, times, audio)]."""

    def __init__(self, store, batch_size, seed, rank=0, world=1, prefetch=4):
        self.store, self.batch_size, self.seed, self.rank, self.world, self.prefetch = store, batch_size, seed, rank, world, prefetch
        self.wait_seconds = 0.0
        self.batches_per_epoch = len(store.rows) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(store.rows)} clips cannot fill one batch of {batch_size} x {world} ranks")

    def _produce(self, q, epoch, batch, stop):
        while not stop.is_set():
            idx = batch_indices(len(self.store.rows), self.batch_size, self.seed, epoch, self.rank, self.world)[batch]
            items = []
            for i in idx:
                got = self.store.get(i)
                if got is not None:
                    items.append((self.store.rows[i], *got))
            q.put((epoch, batch, items))
            batch += 1
            if batch == self.batches_per_epoch:
                epoch, batch = epoch + 1, 0

    def iterate(self, epoch=0, batch=0):
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        worker = threading.Thread(target=self._produce, args=(q, epoch, batch, stop), daemon=True)
        worker.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_seconds += time.perf_counter() - t0
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                worker.join(timeout=0.05)
