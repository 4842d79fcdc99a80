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

from .errors import InputError
from .media import load_clip


def read_splits(root):
    """(train rows, held-out rows) from root/train.jsonl and root/test.jsonl."""
    return read_manifest(os.path.join(root, "train.jsonl")), read_manifest(os.path.join(root, "test.jsonl"))


def read_manifest(path):
    """JSONL rows, each with "path" = its video resolved against the manifest's folder. A malformed
    row raises InputError naming file:line and the problem (a bad clip is only found, and skipped, later)."""
    if not os.path.isfile(path):
        raise InputError(path, "no such manifest file")
    root, rows = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip())
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}", f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}", f"expected a JSON object, found a {type(row).__name__}")
            for key in ("video", "caption"):
                if not isinstance(row.get(key), str):
                    raise InputError(f"{path}:{n}", f'missing "{key}" (a string)' if key not in row
                                     else f'"{key}" must be a string, found a {type(row[key]).__name__}')
            row["path"] = row["video"] if os.path.isabs(row["video"]) else os.path.join(root, row["video"])
            rows.append(row)
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
        except (InputError, OSError) as e:  # a bad clip (media.MediaError is an InputError)
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
        order = {}  # epoch -> its batches (one permutation per epoch, not one per batch)
        while not stop.is_set():
            if epoch not in order:
                order = {epoch: batch_indices(len(self.store.rows), self.batch_size, self.seed, epoch, self.rank, self.world)}
            idx = order[epoch][batch]
            items = []
            for i in idx:
                got = self.store.get(i)
                if got is not None:
                    items.append((self.store.rows[i], *got))
            q.put((epoch, batch, items))
            epoch, batch = self.next_position(epoch, batch)

    def next_position(self, epoch, batch):
        """The (epoch, batch) after this one: where the stream goes on, and what a checkpoint saves for --resume."""
        return (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)

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
