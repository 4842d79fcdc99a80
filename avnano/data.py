"""Clips from a JSONL manifest: decoded (and their log-mel computed) by worker processes, kept in a byte-bounded
LRU cache, served in a resumable, shardable order, pinned and copied to the GPU once per batch.

What torch.utils.data.DataLoader does (workers, persistent workers, pinned memory, prefetching), written out so
the cache can live in the training process: a clip decoded once is served from memory, whichever worker decoded it.
Manifest rows (the toy world writes these; real data uses the same shape): {"video": path relative to
the manifest, "caption": str, optional "events", "checklist", "dialogue"}. Each clip goes through
the same media path as any real video (media.load_clip). A clip that fails to decode is reported
once with its file and problem, counted, and skipped: training never dies on one bad sample.
Order: a permutation of the clips drawn from (seed, epoch); batch b of an epoch is a fixed slice
of it, so the data position (epoch, batch) restores the stream exactly on --resume, and rank r of
W takes every W-th clip of each global batch (DDP).
Audio: a waveform, or (ClipStore(audio=AudioConfig)) the log-mel segments the encoder reads (audio.MelSegments),
computed in the worker from the same int16-rounded waveform, so model.encode_audio gives the same numbers either way.
A background thread gathers the next batches (from the cache, or from the workers: persistent processes that
decode and compute log-mel) while the model trains; `wait_seconds` tells how long the training loop stood waiting.
"""
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections import OrderedDict, deque

import numpy as np
import torch

from .audio import AudioConfig, MelSegments, mel_segments
from .errors import InputError
from .media import load_clip

CACHE_BYTES = 8 * 2 ** 30  # default bound of the clip cache (frames + audio or log-mel bytes)
WORKER_TIMEOUT = 600       # seconds a worker may take for one clip before it counts as a bad clip


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


def mel_config(model):
    """The AudioConfig whose log-mel the loader can compute for this model (its Whisper-style encoder), else None."""
    audio = getattr(getattr(model, "cfg", None), "audio", None)
    return audio if isinstance(audio, AudioConfig) else None


def _nbytes(entry):
    frames, times, audio = entry
    return frames.nbytes + times.nbytes + (sum(m.nbytes for m in audio.mels) if isinstance(audio, MelSegments) else audio.nbytes)


class ClipStore:
    """Clips by index: (frames uint8 (n, S, S, 3), frame times (n,), audio). audio is the float32 waveform (kept as
    int16 in the cache: half the memory), or with `audio` (an AudioConfig) the clip's MelSegments for that encoder.
    The cache keeps the most recently used clips within `cache_bytes` (cache=False: none)."""

    def __init__(self, rows, fps, max_frames, image_size, cache=True, cache_bytes=CACHE_BYTES, audio=None, frame_indices=None):
        self.rows, self.fps, self.max_frames, self.audio = rows, fps, max_frames, audio
        self.frame_indices = frame_indices  # media.load_clip's: the Qwen2.5-Omni thinker's own frame rule (omni.py)
        self.size = None if image_size is None else (image_size, image_size)  # None: the source size (Omni resizes itself)
        self.cache_bytes = cache_bytes if cache else 0
        self.items, self.cache_used, self.bad = OrderedDict(), 0, {}
        self.lock = threading.Lock()

    def decode(self, i):
        """Clip i in its cached form, or raises InputError / OSError (a bad clip). Runs in a worker or in-process."""
        clip = load_clip(self.rows[i]["path"], self.fps, self.max_frames, self.size, self.frame_indices)
        audio16 = (clip.audio.clamp(-1, 1) * 32767).round().to(torch.int16)
        audio = audio16 if self.audio is None else mel_segments(audio16.float() / 32767, self.audio)
        return clip.frames, clip.frame_times, audio

    def cached(self, i):
        with self.lock:
            return i in self.items

    def get(self, i):
        """(frames, frame_times, audio) or None if the clip is bad: from the cache, else decoded here."""
        if i in self.bad:
            return None
        with self.lock:
            entry = self.items.get(i)
            if entry is not None:
                self.items.move_to_end(i)  # most recently used
        if entry is None:
            try:
                entry = self.decode(i)
            except (InputError, OSError) as e:  # a bad clip (media.MediaError is an InputError)
                return self.mark_bad(i, str(e))
            self.put(i, entry)
        return self._served(entry)

    def put(self, i, entry):
        """Cache a decoded clip, evicting the least recently used ones to stay within cache_bytes."""
        size = _nbytes(entry)
        if size > self.cache_bytes:
            return
        with self.lock:
            if i in self.items:
                return
            while self.cache_used + size > self.cache_bytes:
                _, old = self.items.popitem(last=False)
                self.cache_used -= _nbytes(old)
            self.items[i] = entry
            self.cache_used += size

    def mark_bad(self, i, message):
        with self.lock:
            if i not in self.bad:
                self.bad[i] = message
                print(f"skipping bad clip: {message}", file=sys.stderr)
        return None

    def _served(self, entry):
        frames, times, audio = entry
        return frames, times, (audio if isinstance(audio, MelSegments) else audio.float() / 32767)


# ----------------------------------------------------------------------------------- worker processes
_WORKER_STORE = None


def _worker_init(rows, fps, max_frames, image_size, audio, frame_indices):
    global _WORKER_STORE
    torch.set_num_threads(1)  # one intra-op thread per worker, as DataLoader's workers (and fork-safe with OpenMP)
    _WORKER_STORE = ClipStore(rows, fps, max_frames, image_size, cache=False, audio=audio, frame_indices=frame_indices)


def _worker_decode(i):
    """Clip i as numpy arrays (pickled through the pool's pipe), or the bad clip's message."""
    try:
        frames, times, audio = _WORKER_STORE.decode(i)
    except (InputError, OSError) as e:
        return str(e)
    audio = ([m.numpy() for m in audio.mels], audio.tokens) if isinstance(audio, MelSegments) else audio.numpy()
    return frames.numpy(), times.numpy(), audio


def _from_worker(got):
    frames, times, audio = got
    audio = MelSegments([torch.from_numpy(m) for m in audio[0]], list(audio[1])) if isinstance(audio, tuple) \
        else torch.from_numpy(audio)
    return torch.from_numpy(frames), torch.from_numpy(times), audio


# ----------------------------------------------------------------------------------- order and batches
def epoch_order(n, seed, epoch):
    return np.random.default_rng(seed * 100_003 + epoch).permutation(n)


def batch_indices(n, batch_size, seed, epoch, rank=0, world=1):
    """Global batches of one epoch (the last partial one dropped), each sliced for this rank."""
    order = epoch_order(n, seed, epoch)
    global_bs = batch_size * world
    return [order[b * global_bs:(b + 1) * global_bs][rank::world].tolist() for b in range(n // global_bs)]


def _leaves(items):
    """The tensors of a batch's items that go to the device, in a fixed order (frames, then the waveform or each mel
    segment). Frame times stay on the host: the model plans the layout from them there (layout.py)."""
    out = []
    for _, frames, _, audio in items:
        out += [frames] + (list(audio.mels) if isinstance(audio, MelSegments) else [audio])
    return out


def _rebuild(items, leaves):
    it, out = iter(leaves), []
    for row, _, times, audio in items:
        frames = next(it)
        audio = MelSegments([next(it) for _ in audio.mels], audio.tokens) if isinstance(audio, MelSegments) else next(it)
        out.append((row, frames, times, audio))
    return out


def pack(items, pin):
    """One host buffer per dtype holding every tensor of the batch (page-locked when pin): (items, buffers, spans)."""
    leaves, buffers, spans = _leaves(items), {}, []
    for dtype in dict.fromkeys(t.dtype for t in leaves):
        total = sum(t.numel() for t in leaves if t.dtype == dtype)
        buffers[dtype] = torch.empty(total, dtype=dtype, pin_memory=pin)
    at = dict.fromkeys(buffers, 0)
    for t in leaves:
        buffers[t.dtype][at[t.dtype]:at[t.dtype] + t.numel()].copy_(t.reshape(-1))
        spans.append((t.dtype, at[t.dtype], t.shape))
        at[t.dtype] += t.numel()
    return items, buffers, spans


def unpack(packed, device):
    """One non-blocking copy per buffer to the device, then the batch's tensors as views of the copies."""
    items, buffers, spans = packed
    moved = {dtype: buf.to(device, non_blocking=True) for dtype, buf in buffers.items()}
    return _rebuild(items, [moved[dtype][a:a + int(np.prod(shape))].view(shape) for dtype, a, shape in spans])


class Loader:
    """Iterates (epoch, batch_no, items) from a start position; items = [(row, frames, times, audio)] (bad clips left
    out). workers > 0: that many persistent processes decode the clips the cache lacks (the pool lives as long as the
    loader: close() ends it). On a CUDA device every batch arrives on it: packed into pinned buffers by the
    background thread, copied without blocking the host (one copy per dtype per batch); frame times stay on the host.
    transform(items, epoch, batch) -> items, if given, runs in the background thread on the host copies, before any
    packing (the SFT script's colour swaps: recolour.recoloured)."""

    def __init__(self, store, batch_size, seed, rank=0, world=1, prefetch=4, workers=0, device="cpu", transform=None):
        self.store, self.batch_size, self.seed, self.rank, self.world, self.prefetch = store, batch_size, seed, rank, world, prefetch
        self.transform = transform
        self.workers, self.device, self.pool = workers, torch.device(device), None
        self.pack = self.device.type == "cuda"  # tests set it on the CPU to check the packing itself
        self.wait_seconds = 0.0
        self.batches_per_epoch = len(store.rows) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(store.rows)} clips cannot fill one batch of {batch_size} x {world} ranks")

    def _start_pool(self):
        if self.workers > 0 and self.pool is None:  # started from the calling thread, before any producer thread runs
            s = self.store
            args = s.rows, s.fps, s.max_frames, s.size and s.size[0], s.audio, s.frame_indices
            self.pool = multiprocessing.get_context().Pool(self.workers, _worker_init, args)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def _submit(self, epoch, batch, order):
        """Ask the workers for the clips of one batch that the cache lacks."""
        idx = order[batch]
        jobs = {} if self.pool is None else {i: self.pool.apply_async(_worker_decode, (i,)) for i in dict.fromkeys(idx)
                                              if i not in self.store.bad and not self.store.cached(i)}
        return epoch, batch, idx, jobs

    def _collect(self, i, job, stop):
        store = self.store
        if job is None:
            return store.get(i)
        t0 = time.perf_counter()
        while not job.ready():
            if stop.is_set():
                return None
            if time.perf_counter() - t0 > WORKER_TIMEOUT:
                return store.mark_bad(i, f"{store.rows[i]['path']}: no result from a data worker in {WORKER_TIMEOUT} s")
            job.wait(0.1)
        got = job.get()
        if isinstance(got, str):
            return store.mark_bad(i, got)
        entry = _from_worker(got)
        store.put(i, entry)
        return store._served(entry)

    def _produce(self, q, epoch, batch, stop):
        try:
            self._batches(q, epoch, batch, stop)
        except BaseException as e:  # raised again in the training loop, not lost in this thread
            q.put((None, None, e))

    def _batches(self, q, epoch, batch, stop):
        orders, pending = {}, deque()  # epoch -> its batches; batches asked of the workers, oldest first
        while not stop.is_set():
            while len(pending) < max(1, self.prefetch):
                if epoch not in orders:
                    orders = {e: o for e, o in orders.items() if e >= epoch - 1}  # one permutation per epoch, few kept
                    orders[epoch] = batch_indices(len(self.store.rows), self.batch_size, self.seed, epoch, self.rank, self.world)
                pending.append(self._submit(epoch, batch, orders[epoch]))
                epoch, batch = self.next_position(epoch, batch)
            e, b, idx, jobs = pending.popleft()
            items = []
            for i in idx:
                got = self._collect(i, jobs.get(i), stop)
                if got is not None:
                    items.append((self.store.rows[i], *got))
            if stop.is_set():
                return
            items = self.transform(items, e, b) if self.transform and items else items
            q.put((e, b, pack(items, pin=self.device.type == "cuda") if self.pack and items else items))

    def next_position(self, epoch, batch):
        """The (epoch, batch) after this one: where the stream goes on, and what a checkpoint saves for --resume."""
        return (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)

    def iterate(self, epoch=0, batch=0):
        self._start_pool()
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        worker = threading.Thread(target=self._produce, args=(q, epoch, batch, stop), daemon=True)
        worker.start()
        try:
            while True:
                t0 = time.perf_counter()
                e, b, items = q.get()
                if isinstance(items, BaseException):
                    raise items
                if isinstance(items, tuple):  # packed: one copy per buffer to the device
                    items = unpack(items, self.device)
                self.wait_seconds += time.perf_counter() - t0
                yield e, b, items
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                worker.join(timeout=0.05)
