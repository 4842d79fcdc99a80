"""The host-planned layout: the AVTI order against its slot-by-slot definition, the one-buffer copy, layouts and
grounding rows planned from host data equal to those read back from the device, a training step with no host
sync, and greedy decoding that looks for finished rows every 16 tokens giving the ids of a check after each token."""
import random

import numpy as np
import torch

from avnano import grounding
from avnano.decoder import Decoder, DecoderConfig
from avnano.generate import CHECK_EVERY, generate
from avnano.interleave import WindowQFormer, avti_order
from avnano.layout import assemble, plan_rows
from avnano.plan import Plan, to_device
from tests.test_model import CAPTIONS, tiny, training_batch


def avti_by_slot(n_v, n_a):
    """AVicuna's AVTI as a loop over the slots: audio at every (k+1)-th slot while it lasts, else visual
    (audio again once the visual tokens run out). Returns the modality of each slot."""
    k, ia, iv, out = round(n_v / (n_a + 1)), 0, 0, []
    for slot in range(n_v + n_a):
        if ia < n_a and (slot % (k + 1) == 0 or iv >= n_v):
            out.append(1)
            ia += 1
        else:
            out.append(0)
            iv += 1
    return out


def test_avti_order_is_the_slot_by_slot_interleaver():
    rng = random.Random(0)
    for _ in range(300):
        n_frames, tpf, n_audio, air = rng.randint(1, 12), rng.choice([1, 2, 4]), rng.randint(1, 40), rng.choice([0.1, 0.25, 0.5, 0.7])
        idx = avti_order(n_frames, tpf, n_audio, air)
        n_v = n_frames * tpf
        n_a = len(idx) - n_v
        assert n_a == round(n_v / (1 - air)) - n_v
        assert (idx >= n_v).astype(int).tolist() == avti_by_slot(n_v, n_a)
        assert idx[idx < n_v].tolist() == list(range(n_v))  # visual tokens in order
        audio = idx[idx >= n_v] - n_v
        assert audio.tolist() == sorted(audio.tolist()) and all(audio < n_audio)  # audio resampled in time order


def test_one_buffer_copy_keeps_every_array():
    arrays = {"a": np.arange(7), "b": np.array([0.5, -1.25, 3.0], np.float32), "c": np.array([[True, False], [False, True]]),
              "empty": np.zeros((0, 3), np.int64), "d": np.arange(12).reshape(3, 4)}
    got = to_device(arrays, "cpu")
    for k, a in arrays.items():
        assert got[k].shape == a.shape and np.array_equal(got[k].numpy(), a), k
    assert got["a"].dtype == torch.long and got["b"].dtype == torch.float32 and got["c"].dtype == torch.bool


def test_host_plan_equals_the_layout_read_from_the_device():
    model = tiny(time_positions=True)
    frames, times, audio, ids, masks = training_batch(model)
    blocks = model.av_block(frames, times, audio)[0]
    plain = [tuple(b) for b in blocks]  # no host copy: the layout reads times back from the device
    a, b = assemble(model, blocks, ids, masks), assemble(model, plain, ids, masks)
    for x, y in zip(a, b):
        assert (x == y) if isinstance(x, bool) else torch.equal(x, y)
    # labels: each caption token (and the end token) predicted by the position before it, nowhere else
    for row, (i, m) in enumerate(zip(ids, masks)):
        want = [t for t, keep in zip(i, m) if keep]
        assert a.labels[row][a.labels[row] != -100].tolist() == want
    assert a.label_targets.tolist() == [t for i, m in zip(ids, masks) for t, keep in zip(i, m) if keep]
    # grounding rows: the same triples whether the times come with the blocks or from the device
    spans = [[(0.0, 1.0, "v", CAPTIONS[0], ["red", "circle"])], [(1.0, 2.0, "a", CAPTIONS[1], ["knock"])]]
    model.cfg.ground_weight = 1.0
    assert torch.equal(grounding.loss(model, blocks, spans), grounding.loss(model, plain, spans))
    plan = plan_rows(Plan(), model, [bl.host[0] for bl in blocks], ids, masks)
    assert plan.meta["n_tokens"] == sum(map(sum, masks)) and plan.meta["right_padded"]


def test_a_training_step_reads_nothing_back_from_the_device():
    model = tiny(ground_weight=1.0)
    frames, times, audio, ids, masks = training_batch(model)
    spans = [[(0.0, 1.0, "v", CAPTIONS[0], ["red", "circle"])], [(1.0, 2.0, "a", CAPTIONS[1], ["knock"])]]
    model(frames, times, audio, ids, masks, ground=spans)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(frames, times, audio, ids, masks, ground=spans)
        out["loss"].backward()
    names = [e.name for e in prof.events()]
    syncs = sum(names.count(n) for n in ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::masked_select"))
    assert syncs == 0 and out["ground"] > 0, [n for n in names if n in ("aten::_local_scalar_dense", "aten::nonzero")]
    assert out["n_tokens"] == sum(map(sum, masks)) and isinstance(out["n_seq"], int)


def test_window_qformer_host_times_and_batched_windows():
    torch.manual_seed(0)
    q = WindowQFormer(16, 8, window=0.5, n_queries=2, frames_per_second=10)
    xs = [torch.randn(n, 16) for n in (1, 7, 23)]
    for x in xs:
        assert torch.equal(q(x)[1], torch.from_numpy(q.host_times(len(x))))
    # all pieces' windows in one call (zero rows + key padding past each piece's end) = each piece alone
    W = q.frames_per_window
    windows, pad = [], []
    for x in xs:
        nw = q.n_windows(len(x))
        windows.append(torch.cat([x, x.new_zeros(nw * W - len(x), 16)]).view(nw, W, 16))
        pad.append(torch.arange(nw * W).view(nw, W) >= len(x))
    together = q.attend(torch.cat(windows), torch.cat(pad))
    assert torch.allclose(together, torch.cat([q(x)[0] for x in xs]), atol=1e-6)


def test_checking_for_finished_rows_every_16_tokens_gives_the_same_ids():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)).eval()
    ids = torch.randint(3, 24, (4, 5))
    for eos in ([5, 6, 7], [8], [2, 9, 11, 13]):  # rows finishing at different steps, or some never
        for n in (3, CHECK_EVERY, CHECK_EVERY + 5, 40):
            every_token = generate(model, ids, max_new_tokens=n, eos_ids=eos, on_token=lambda t: None)  # reads every token
            batched = generate(model, ids, max_new_tokens=n, eos_ids=eos)
            assert torch.equal(every_token, batched), (eos, n)
