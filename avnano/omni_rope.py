"""TMRoPE position ids (Qwen2.5-Omni, Xu et al. 2025, "Time-aligned Multimodal RoPE") for the thinker's decoder.

Every token gets three ids (t, h, w); the decoder's rotary frequencies are cut into sections that read
them in turn (decoder.rope_cos_sin, `mrope_section`). The ids equal transformers' `get_rope_index`
token for token, computed here one segment of the prompt at a time; each segment starts one past the
largest id of the segment before it:
- text, and every bos / eos token: t = h = w = start, start + 1, ...;
- image: t = start, h / w = start + the merged patch's row / column;
- video: the same, with t = start + floor(k * second_per_grid * ids_per_second) for temporal patch k:
  time, not index (25 ids per second; patch k's time is k * second_per_grid, frame timestamps unused);
- audio alone: start + 0, 1, 2, ... (25 tokens per second at 25 ids per second: index and time agree);
- audio in video: `<vision_bos><audio_bos>` share one id; both streams start at the next id; their
  tokens come in chunks of `seconds_per_chunk` (video chunk 0, audio chunk 0, video chunk 1, ...);
  `<audio_eos><vision_eos>` share the id one past the *last chunk's* largest id. That can lie below an
  earlier id (audio ending before the video's last temporal patch in the same chunk, or a tall frame's
  h ids reaching past a short audio's end): transformers places it so, and the released models were
  trained so.
The delta (largest id + 1 - length) is how far generation's new tokens are shifted from their index:
they continue at largest id + 1 (generate.py does this from the positions themselves).
Departures from transformers: use_audio_in_video is read per video from the layout (transformers takes
one flag for the whole batch; the two agree whenever the flag matches the layout), and each audio's
token count is its run of audio tokens in the ids (transformers recomputes it from the mel length).
Host side: plain CPU tensors, built once per sample in the data path.
"""
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class OmniRopeConfig:
    image_id: int
    video_id: int
    audio_id: int
    vision_bos_id: int
    vision_eos_id: int
    audio_bos_id: int
    audio_eos_id: int
    merge: int = 2                  # vision spatial_merge_size: a merged token covers merge x merge patches
    ids_per_second: float = 25      # position_id_per_seconds
    seconds_per_chunk: float = 2

    @property
    def ids_per_chunk(self):
        return int(self.ids_per_second * self.seconds_per_chunk)

    @classmethod
    def from_config(cls, thinker, source="config.json"):
        """The thinker config dict: config.json's "thinker_config" (full layout) or its top level (the
        thinker-only layout). Token ids under their v4 (`image_token_index`) or v5 (`image_token_id`) names."""
        def get(*names):
            for name in names:
                if name in thinker:
                    return int(thinker[name])
            raise InputError(source, f"the thinker config has no {' / '.join(names)}")
        return cls(image_id=get("image_token_index", "image_token_id"),
                   video_id=get("video_token_index", "video_token_id"),
                   audio_id=get("audio_token_index", "audio_token_id"),
                   vision_bos_id=get("vision_start_token_id"), vision_eos_id=get("vision_end_token_id"),
                   audio_bos_id=get("audio_start_token_id"), audio_eos_id=get("audio_end_token_id"),
                   merge=int((thinker.get("vision_config") or {}).get("spatial_merge_size", 2)),
                   ids_per_second=thinker.get("position_id_per_seconds", 25),
                   seconds_per_chunk=thinker.get("seconds_per_chunk", 2))


def _text(n, start):
    """(3, n): t = h = w = start .. start + n - 1."""
    return (start + torch.arange(n)).expand(3, n)


def _vision(grid_thw, second_per_grid, cfg):
    """(3, t*h*w / merge^2) ids of one image or video relative to its start, in the merged tokens' order
    (temporal patch, row, column). t is computed in float32 and truncated, as transformers does."""
    gt, gh, gw = (int(x) for x in grid_thw)
    h, w = gh // cfg.merge, gw // cfg.merge
    t = (torch.arange(gt, dtype=torch.float32) * torch.tensor(float(second_per_grid)) * cfg.ids_per_second).long()
    return torch.stack([t.repeat_interleave(h * w), torch.arange(h).repeat_interleave(w).repeat(gt),
                        torch.arange(w).repeat(gt * h)])


def _chunk_spans(t, per_chunk):
    """Cut non-decreasing temporal ids (relative to the block's start) into chunks [start, end): a new chunk
    starts at the first token whose id reaches the next edge. As in transformers' processor and model,
    the edge moves on by one chunk per cut, so when one temporal patch jumps over whole chunks
    (second_per_grid > seconds_per_chunk, i.e. fewer than 1 fps) each skipped edge cuts one token later
    instead of leaving an empty chunk."""
    spans, start, edge = [], 0, per_chunk
    for i, ti in enumerate(t.tolist()):
        if ti >= edge:
            spans.append((start, i))
            start, edge = i, edge + per_chunk
    return [s for s in spans + [(start, len(t))] if s[1] > s[0]]


def av_chunks(grid_thw, second_per_grid, n_audio, cfg):
    """The token order inside <vision_bos><audio_bos> ... <audio_eos><vision_eos>: a list of
    ("video", start, end) / ("audio", start, end) slices of the video's merged tokens (grid order) and of
    the audio tokens, video chunk j before audio chunk j."""
    video = _chunk_spans(_vision(grid_thw, second_per_grid, cfg)[0], cfg.ids_per_chunk)
    audio = _chunk_spans(torch.arange(n_audio), cfg.ids_per_chunk)
    order = []
    for j in range(max(len(video), len(audio))):
        order += [("video", *video[j])] if j < len(video) else []
        order += [("audio", *audio[j])] if j < len(audio) else []
    return order


def _run(ids, i, token):
    """Length of the run of `token` starting at ids[i]."""
    j = i
    while j < len(ids) and ids[j] == token:
        j += 1
    return j - i


def _av_block_end(ids, i, grid, spg, cfg):
    """Check the audio-in-video block opening at ids[i] holds its video and audio tokens in av_chunks' order
    and closes with <audio_eos><vision_eos>; returns (the index after it, its number of audio tokens)."""
    end = i + 2
    while end < len(ids) and ids[end] in (cfg.video_id, cfg.audio_id):
        end += 1
    body = ids[i + 2:end]
    n_audio = body.count(cfg.audio_id)
    order = av_chunks(grid, spg, n_audio, cfg)
    if body != [cfg.video_id if kind == "video" else cfg.audio_id for kind, s, e in order for _ in range(e - s)]:
        n_video = sum(e - s for kind, s, e in order if kind == "video")
        raise InputError("input_ids", f"the audio-in-video block at token {i} ({len(body) - n_audio} video, {n_audio} "
                         f"audio tokens) is not laid out for video grid {list(grid)} ({n_video} video tokens) in "
                         f"{cfg.seconds_per_chunk} s chunks, video then audio (omni_rope.av_chunks gives the order)")
    if ids[end:end + 2] != [cfg.audio_eos_id, cfg.vision_eos_id]:
        raise InputError("input_ids", f"the audio-in-video block at token {i} does not end in <audio_eos><vision_eos> "
                         f"(ids {cfg.audio_eos_id}, {cfg.vision_eos_id})")
    return end + 2, n_audio


def _positions(ids, cfg, images, videos):
    """(3, L) ids of one unpadded sample; `images` / `videos` are iterators over its grids (videos with
    their second_per_grid), consumed in order of appearance."""
    pieces, nxt, i, L = [], 0, 0, len(ids)

    def put(piece):  # the next segment starts one past this piece's largest id
        nonlocal nxt
        pieces.append(piece)
        nxt = int(piece.max()) + 1

    def take(it, what):
        try:
            return next(it)
        except StopIteration:
            raise InputError("input_ids", f"more {what}s in the token ids than {what} grids given") from None

    def av_block(i):
        return i + 1 < L and ids[i] == cfg.vision_bos_id and ids[i + 1] == cfg.audio_bos_id

    media = (cfg.image_id, cfg.video_id, cfg.audio_id)
    while i < L:
        tok = ids[i]
        if av_block(i):  # <vision_bos><audio_bos> [video chunk][audio chunk] ... <audio_eos><vision_eos>
            grid, spg = take(videos, "video")
            after, n_audio = _av_block_end(ids, i, grid, spg, cfg)
            put(_text(1, nxt).repeat(1, 2))  # both bos share one id
            video, audio = _vision(grid, spg, cfg) + nxt, _text(n_audio, nxt)  # both streams start one past it
            for kind, s, e in av_chunks(grid, spg, n_audio, cfg):
                put((video if kind == "video" else audio)[:, s:e])
            put(_text(1, nxt).repeat(1, 2))  # both eos share one id: one past the *last chunk's* largest
            i = after
        elif tok in (cfg.image_id, cfg.video_id):
            n = _run(ids, i, tok)
            grid, spg = (take(images, "image"), 1.0) if tok == cfg.image_id else take(videos, "video")
            piece = _vision(grid, spg, cfg)
            if piece.shape[1] != n:
                kind = "image" if tok == cfg.image_id else "video"
                raise InputError("input_ids", f"{n} {kind} tokens at token {i}, but its grid {[int(g) for g in grid]} "
                                 f"gives {piece.shape[1]} (t*h*w / {cfg.merge}^2)")
            put(piece + nxt)
            i += n
        elif tok == cfg.audio_id:  # audio alone: one id per token, like text
            n = _run(ids, i, tok)
            put(_text(n, nxt))
            i += n
        else:  # text up to the next media token or audio-in-video block
            j = i + 1
            while j < L and ids[j] not in media and not av_block(j):
                j += 1
            put(_text(j - i, nxt))
            i = j
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _grids(image_grid_thw, video_grid_thw, second_per_grid):
    images = iter([tuple(int(x) for x in g) for g in (image_grid_thw if image_grid_thw is not None else [])])
    vgrids = [tuple(int(x) for x in g) for g in (video_grid_thw if video_grid_thw is not None else [])]
    spg = [float(s) for s in (second_per_grid if second_per_grid is not None else [1.0] * len(vgrids))]
    if len(spg) != len(vgrids):
        raise InputError("second_per_grid", f"{len(spg)} values for {len(vgrids)} videos")
    return images, iter(zip(vgrids, spg))


def _check_used(images, videos):
    if next(images, None) is not None or next(videos, None) is not None:
        raise InputError("input_ids", "fewer images or videos in the token ids than grids given")


def omni_position_ids(input_ids, cfg, image_grid_thw=None, video_grid_thw=None, second_per_grid=None):
    """One unpadded sample: input_ids (L,) -> (positions (3, L) long, delta int). Grids (n, 3) are this
    sample's, in order of appearance; second_per_grid (n_videos,) = temporal_patch_size / fps."""
    ids = torch.as_tensor(input_ids).tolist()
    images, videos = _grids(image_grid_thw, video_grid_thw, second_per_grid)
    pos = _positions(ids, cfg, images, videos)
    _check_used(images, videos)
    return pos, (int(pos.max()) + 1 - len(ids)) if len(ids) else 0


def omni_position_ids_batch(input_ids, valid, cfg, image_grid_thw=None, video_grid_thw=None, second_per_grid=None):
    """A padded batch: input_ids, valid (B, L) -> (positions (3, B, L) long, deltas (B,) long). The grids
    are consumed row after row (as transformers does); padding keeps id 1 (transformers' filler)."""
    input_ids = torch.as_tensor(input_ids).cpu()
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else torch.as_tensor(valid).bool().cpu()
    B, L = input_ids.shape
    images, videos = _grids(image_grid_thw, video_grid_thw, second_per_grid)
    out, deltas = torch.ones(3, B, L, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for b in range(B):
        ids = input_ids[b][valid[b]].tolist()
        pos = _positions(ids, cfg, images, videos)
        out[:, b, valid[b]] = pos
        deltas[b] = int(pos.max()) + 1 - len(ids) if len(ids) else 0
    _check_used(images, videos)
    return out, deltas
