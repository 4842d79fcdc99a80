"""Interleavers' exact orders (interleave.order, as model.av_block applies them) on integer-labelled tokens, the window
Q-Former, segment embeddings."""
import numpy as np
import torch

from avnano.interleave import AUDIO, VISUAL, SegmentEmbedding, WindowQFormer, order


def labelled(n_frames, per_frame_tokens, n_audio, duration):
    """Visual token of frame i, slot j has label 100*i + j; audio token k has label -(k+1)."""
    v = torch.tensor([[[100.0 * i + j] for j in range(per_frame_tokens)] for i in range(n_frames)])
    ft = (torch.arange(n_frames) + 0.5) * duration / n_frames
    a = -(torch.arange(n_audio, dtype=torch.float) + 1)[:, None]
    at = torch.arange(n_audio) * duration / n_audio
    return v, ft, a, at


def labels(out):
    return [int(x) for x in out[0][:, 0].tolist()]


def interleave(kind, v, ft, a, at, **kw):
    """The order of `kind` from counts and float32 times on the host, applied as one gather: (tokens, times, modality)."""
    idx, times, modality = order(kind, ft.numpy().astype(np.float32), v.shape[1], at.numpy().astype(np.float32), **kw)
    return torch.cat([v.flatten(0, 1), a])[torch.from_numpy(idx)], torch.from_numpy(times), torch.from_numpy(modality)


def test_concat_is_all_visual_then_all_audio():
    out = interleave("concat", *labelled(2, 2, 3, 2.0))
    assert labels(out) == [0, 1, 100, 101, -1, -2, -3]
    assert out[2].tolist() == [VISUAL] * 4 + [AUDIO] * 3


def test_per_frame_slices_audio_by_frame():
    out = interleave("per_frame", *labelled(3, 2, 6, 3.0))
    assert labels(out) == [0, 1, -1, -2, 100, 101, -3, -4, 200, 201, -5, -6]


def test_per_frame_resamples_when_not_divisible():
    # l = 5, n = 2: audio resampled (nearest) up to 2 * ceil(5 / 2) = 6 tokens: indices floor(i * 5 / 6)
    out = interleave("per_frame", *labelled(2, 1, 5, 2.0))
    assert labels(out) == [0, -1, -1, -2, 100, -3, -4, -5]  # every audio token kept, none dropped
    assert out[2].tolist() == [VISUAL, AUDIO, AUDIO, AUDIO] * 2
    # frames at 0.5 / 1.5 s; audio token k starts at 0.4 k s and keeps its own time when repeated
    assert torch.allclose(out[1], torch.tensor([0.5, 0.0, 0.0, 0.4, 1.5, 0.8, 1.2, 1.6]))


def test_avti_air_quarter_gives_a_v_v_v():
    v, ft, a, at = labelled(10, 3, 7, 5.0)  # n_v = 30 -> N = 40, n_a = 10, k = 3
    out = interleave("avti", v, ft, a, at, air=0.25)
    pattern = ["A" if m == AUDIO else "V" for m in out[2].tolist()]
    assert pattern == ["A", "V", "V", "V"] * 10
    vis = [x for x, m in zip(labels(out), out[2].tolist()) if m == VISUAL]
    assert vis == [100 * i + j for i in range(10) for j in range(3)]  # visual keeps its order
    aud = [x for x, m in zip(labels(out), out[2].tolist()) if m == AUDIO]
    assert aud == [-1, -1, -2, -3, -3, -4, -5, -5, -6, -7]  # 7 -> 10 in time order: token floor(i * 7 / 10)


def test_avti_other_rate():
    v, ft, a, at = labelled(4, 1, 8, 4.0)  # n_v = 4, AIR 0.5: N = 8, n_a = 4, k = round(4/5) = 1
    out = interleave("avti", v, ft, a, at, air=0.5)
    assert ["A" if m == AUDIO else "V" for m in out[2].tolist()] == ["A", "V"] * 4


def test_chunked_order():
    # frames at 0.5, 1.5, 2.5, 3.5 s (1 token each); audio at 0, 1, 2, 3, 4.5 s
    v = torch.tensor([[[0.0]], [[100.0]], [[200.0]], [[300.0]]])
    ft = torch.tensor([0.5, 1.5, 2.5, 3.5])
    a = -(torch.arange(5, dtype=torch.float) + 1)[:, None]
    at = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.5])
    tokens, times, modality = interleave("chunked", v, ft, a, at, chunk_seconds=2.0)
    assert [int(x) for x in tokens[:, 0]] == [0, 100, -1, -2, 200, 300, -3, -4, -5]
    assert times.tolist() == [0.5, 1.5, 0.0, 1.0, 2.5, 3.5, 2.0, 3.0, 4.5]  # each token keeps its own time
    assert modality.tolist() == [VISUAL, VISUAL, AUDIO, AUDIO] * 2 + [AUDIO]  # (positions: test_switches.py)


def test_window_qformer_count_and_times():
    torch.manual_seed(0)
    q = WindowQFormer(16, 8, window=0.5, n_queries=1, frames_per_second=50)
    for frames, windows in ((100, 4), (101, 5), (25, 1), (1, 1)):  # 2 s -> 4, a partial window counts
        out, times = q(torch.randn(frames, 16))
        assert out.shape == (windows, 8) and times.tolist() == [0.5 * i for i in range(windows)]
    q2 = WindowQFormer(16, 8, window=1.0, n_queries=3, frames_per_second=50)
    assert q2(torch.randn(150, 16))[0].shape == (9, 8)
    # a partial last window ignores its padding: appending frames changes only the last window
    x = torch.randn(60, 16)
    a, b = q(x)[0], q(torch.cat([x, torch.randn(10, 16)]))[0]
    assert torch.allclose(a[:2], b[:2], atol=1e-6) and not torch.allclose(a[2], b[2])


def test_segment_embedding_zero_for_first_segment():
    seg = SegmentEmbedding(4, 8)
    torch.nn.init.normal_(seg.table)
    x = torch.randn(5, 8)
    assert torch.equal(seg(x, 0), x)
    assert not torch.allclose(seg(x, 1), x) and torch.allclose(seg(x, 2) - x, seg.table[2].expand(5, 8))
