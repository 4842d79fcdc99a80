"""CPU proofs that every tensor is made on the model's device, in the dtype it will meet.

Each training / sampling path runs with the model and data on an explicit device (cuda:0 where there is a GPU,
else cpu) while the process's default device is `meta`: a tensor made without a device is then a meta tensor, and the
guard below raises at the op that made it (meta tensors hold no data, so it would fail later anyway).
FakeTensorMode with a fake CUDA device is a second net for the forward + backward, and greedy
decoding under bf16 autocast must give the fp32 ids wherever fp32's top-1 margin is clear.
"""
import argparse
import contextlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from avnano import grounding, lora, masks, toyworld
from avnano.checkpoint import load_model, save_model
from avnano.data import ClipStore, read_manifest
from avnano.distributed import autocast
from avnano.dpo import dpo_loss, guided_dpo_loss
from avnano.evaluate import caption_clips, eval_split
from avnano.generate import generate
from avnano.grpo import group_advantages, grpo_loss, up_to_eos
from avnano.interleave import order
from avnano.layout import assemble
from avnano.audio import AudioConfig
from avnano.media import load_clip
from avnano.decoder import DecoderConfig
from avnano.model import PRESETS, AVCaptioner, preset
from avnano.ot import ot_loss
from avnano.tokenizer import Tokenizer
from avnano.training import make_optimizer
from avnano.vit import ViTConfig
from tests.helpers import assert_prints_caption
from tests import test_model
from tests.test_model import CAPTIONS, batch, tokenizer

DEVICE = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # a real GPU where there is one


class _NoDeviceGuard(TorchFunctionMode):
    """Raises at any op that returns a meta tensor while none of its inputs is one: something was
    made on the default device instead of the device of the tensors it will meet."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        if made and not any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_flatten((args, kwargs))[0]):
            raise RuntimeError(f"{getattr(func, '__name__', func)} made a tensor on the default device (no device= given)")
        return out


@contextlib.contextmanager
def meta_default():
    """The process default device is `meta` inside; always back to the cpu default after."""
    torch.set_default_device("meta")
    try:
        with _NoDeviceGuard():
            yield
    finally:
        torch.set_default_device(None)  # None = the plain cpu default (no device context left behind)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny toy world (3 train + 2 test clips), its rows, a tokenizer on its captions, decoded train clips."""
    root = str(tmp_path_factory.mktemp("toy"))
    toyworld.build(root, n_train=3, n_test=2, seed=0, workers=1, progress=False)
    train, test = read_manifest(os.path.join(root, "train.jsonl")), read_manifest(os.path.join(root, "test.jsonl"))
    tok = Tokenizer.train([r["caption"] for r in train + test] * 5 + ["Describe the clip."] * 5, vocab_size=300)
    cfg = preset("tiny", tok.vocab_size)
    store = ClipStore(train, cfg.fps, cfg.max_frames, cfg.vit.image_size)
    clips = [store.get(i) for i in range(len(train))]  # decoded before the default device changes
    return dict(root=root, train=train, test=test, tok=tok, clips=clips)


def tiny(world, **overrides):
    torch.manual_seed(0)
    return AVCaptioner(preset("tiny", world["tok"].vocab_size, **overrides), world["tok"]).to(DEVICE)


def sft_batch(model, world, n=2):
    frames, times, audio = ([c[k] for c in world["clips"][:n]] for k in range(3))
    rendered = [model.render(r["caption"]) for r in world["train"][:n]]
    return frames, times, audio, [r[0] for r in rendered], [r[1] for r in rendered]


def on_device(model):
    for name, p in model.named_parameters():
        assert p.device == DEVICE, name
        if p.grad is not None:
            assert p.grad.device == DEVICE and torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------- the net itself
def test_meta_default_raises_on_a_tensor_made_without_device():
    with meta_default():
        torch.zeros(2, device=DEVICE) + 1  # an explicit device is fine
        with pytest.raises(RuntimeError, match="default device"):
            torch.arange(3)
        with pytest.raises(RuntimeError, match="default device"):
            torch.as_tensor(torch.zeros(2, device=DEVICE))  # as_tensor moves a tensor to the default device
    assert torch.get_default_device().type == "cpu" and torch.zeros(1).device.type == "cpu"  # the default is back


# ------------------------------------------------------------------------------------- SFT, evaluation, sample.py
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_sft_step_with_grounding_on_explicit_device(world, bf16):
    model = tiny(world, ground_weight=0.5)
    opt = make_optimizer(model, 1e-3, 0.1)
    before = model.visual_aligner[0].weight.detach().clone()
    spans = [grounding.spans(r["events"]) for r in world["train"][:2]]
    with meta_default(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(*sft_batch(model, world), ground=spans)
        assert out["ground"].item() > 0  # the grounding loss ran
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert out["loss"].device == DEVICE and out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert not torch.equal(before, model.visual_aligner[0].weight)
    on_device(model)


def test_eval_split_and_beam_captions_on_explicit_device(world):
    model = tiny(world)
    store = ClipStore(world["test"], model.cfg.fps, model.cfg.max_frames, model.cfg.vit.image_size)
    with meta_default():  # the clips are decoded in here too: host-side loading names its device
        metrics, texts = eval_split(model, store, batch_size=2, max_new_tokens=6, progress=False)
        beams = caption_clips(model, store, [0, 1], batch_size=2, progress=False, max_new_tokens=6, num_beams=2)
    assert len(texts) == len(beams) == 2 and all(isinstance(t, str) for t in texts + beams)
    assert metrics["heldout_ce"] > 0


def test_sample_py_captions_a_file_on_explicit_device(world, tmp_path, capsys):
    import sample
    save_model(tiny(world), str(tmp_path / "ckpt"))
    args = argparse.Namespace(ckpt=str(tmp_path / "ckpt"), video=os.path.join(world["root"], world["test"][0]["video"]),
                              device=str(DEVICE), prompt=None, max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0,
                              num_beams=1, length_penalty=0.6, seed=0, dtype=None, system=None)
    capsys.readouterr()
    with meta_default():
        sample.caption_video(args)
    out = capsys.readouterr().out
    model = load_model(args.ckpt, device=args.device)  # the same caption computed outside the meta context
    cfg = model.cfg
    clip = load_clip(args.video, cfg.fps, cfg.max_frames, (cfg.vit.image_size, cfg.vit.image_size))
    with autocast(model.device):
        want = model.generate([clip.frames], [clip.frame_times], [clip.audio], max_new_tokens=6)[0]
    assert_prints_caption(out, want)


# ------------------------------------------------------------------------------------- DPO, GRPO
def test_dpo_step_on_explicit_device(world):
    model = tiny(world, lora_r=4)
    model.set_trainable(["lora"])
    opt = make_optimizer(model, 1e-3, 0.0)
    frames, times, audio, _, _ = sft_batch(model, world)
    captions = [r["caption"] for r in world["train"]]
    with meta_default():
        with torch.no_grad():
            blocks = model.av_block(frames, times, audio)[0]
        ids = [model.completion_ids(c) for c in captions[:2]] + [model.completion_ids(c) for c in captions[1:3]]
        lp, mask = model.completion_logprobs(blocks * 2, ids)
        pi, n = (lp * mask).sum(-1), mask.sum(-1)
        with torch.no_grad(), lora.disabled(model):
            ref_lp, _ = model.completion_logprobs(blocks * 2, ids)
            ref = (ref_lp * mask).sum(-1)
        loss, rc, rr = dpo_loss(pi[:2], pi[2:], ref[:2], ref[2:], 0.1, "ipo", 0.0, n[:2], n[2:])
        total = guided_dpo_loss(loss, pi[:2], n[:2], 0.1)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    assert torch.isfinite(total) and all(t.device == DEVICE for t in (loss, rc, rr, mask))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_" in n_)
    on_device(model)


def test_grpo_step_on_explicit_device(world):
    model = tiny(world, lora_r=4)
    model.set_trainable(["lora"])
    opt = make_optimizer(model, 1e-3, 0.0)
    frames, times, audio, _, _ = sft_batch(model, world)
    G = 3
    with meta_default():
        gen = torch.Generator(model.device).manual_seed(0)
        with torch.no_grad():
            blocks = [b for b in model.av_block(frames, times, audio)[0] for _ in range(G)]
        model.eval()
        texts, ids = model.generate(None, None, None, blocks=blocks, return_ids=True, max_new_tokens=6, temperature=1.0,
                                    top_k=20, top_p=0.9, generator=gen)
        completions = up_to_eos(ids.tolist(), model.tok.eos_ids)
        rewards = torch.tensor([float(len(t)) for t in texts], device=model.device).view(-1, G)
        adv = group_advantages(rewards).view(-1)
        model.train()
        with torch.no_grad(), lora.disabled(model):
            ref, _ = model.completion_logprobs(blocks, completions, 1.0)
        logp, mask = model.completion_logprobs(blocks, completions, 1.0)
        loss = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert ids.device == DEVICE and torch.isfinite(loss)
    on_device(model)


# ------------------------------------------------------------------------------------- every switch that adds tensors
SWITCHES = [dict(interleave="concat"), dict(interleave="per_frame"), dict(interleave="avti"), dict(interleave="chunked", time_positions=True),
            dict(time_positions=True), dict(time_embed=False), dict(ot_weight=0.1, ot_fusion=True), dict(modalities="v"),
            dict(modalities="a"), dict(mask="causal"), dict(label_smoothing=0.1, visual_aligner="linear"), dict(lora_r=4),
            dict(audio_aligner="linear", visual_aligner="linear", visual_delta=False), dict(audio_aligner="mlp"),
            dict(vit=ViTConfig(**{**PRESETS["tiny"]["vit"], "family": "clip"})),  # class token, bicubic crop
            dict(audio=AudioConfig(**{**PRESETS["tiny"]["audio"], "max_positions": 20})),  # 2 s segments + segment embeddings
            dict(audio=AudioConfig(**{**PRESETS["tiny"]["audio"], "exact": True})),  # Whisper's fixed-length padding
            dict(decoder=DecoderConfig(vocab_size=300, **{**PRESETS["tiny"]["decoder"], "qkv_bias": True, "tie_embeddings": False}))]


@pytest.mark.parametrize("kw", SWITCHES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())[:60])
def test_config_switch_forward_backward_on_explicit_device(world, kw):
    if "decoder" in kw:
        kw = dict(kw, decoder=replace(kw["decoder"], vocab_size=world["tok"].vocab_size))
    model = tiny(world, **kw)
    with meta_default():
        out = model(*sft_batch(model, world))
        out["loss"].backward()
    assert torch.isfinite(out["loss"]) and bool(out["ot"] > 0) == (kw.get("ot_weight", 0) > 0)
    on_device(model)


# ------------------------------------------------------------------------------------- bf16 autocast decoding
MARGIN = 1.0  # fp32 top-1 minus top-2 logit above which bf16 autocast must pick the same token


@pytest.fixture(scope="module")
def overfit():
    """A tiny captioner overfit on two short synthetic clips (so its greedy margins are large), and the clips."""
    model = test_model.tiny().to(DEVICE)
    frames, times, audio = ([t.to(DEVICE) for t in ts] for ts in batch(seconds=(1.0, 1.5)))  # 2 and 3 frames
    with torch.no_grad():  # the encoders stay as initialised: only the decoder side learns the two captions (fast)
        blocks = model.av_block(frames, times, audio)[0]
    targets = [model.completion_ids(c) for c in CAPTIONS]
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=3e-3)
    for _ in range(80):  # enough that every greedy step's fp32 margin is far above MARGIN
        opt.zero_grad()
        lp, mask = model.completion_logprobs(blocks, targets)
        (-(lp * mask).sum() / mask.sum()).backward()
        opt.step()
    return model.eval(), (frames, times, audio)


def greedy_margins(model, clips, ids):
    """fp32 top-1 minus top-2 logit at every generated step (teacher-forced on the generated ids), (B, N)."""
    blocks = model.av_block(*clips)[0]
    prompt = model.render()[0]
    with torch.no_grad():
        x = assemble(model, blocks, [prompt + row for row in ids.tolist()], [[0] * len(prompt) + [1] * ids.shape[1]] * len(ids))
        h = model.decoder(inputs_embeds=x.embeds, positions=x.positions, mask=masks.for_sdpa(
            masks.av_prefix(x.is_av) & masks.key_padding(x.valid)), return_hidden=True)
        # the logits that chose token t sit one position before it: where labels (shifted) hold it
        top2 = model.decoder.logits(h[x.labels != -100]).float().topk(2, -1).values
    return (top2[:, 0] - top2[:, 1]).view(ids.shape)


def test_bf16_autocast_greedy_and_beams_match_fp32_where_margins_allow(overfit):
    model, clips = overfit
    texts32, ids32 = model.generate(*clips, max_new_tokens=30, return_ids=True)
    assert texts32 == CAPTIONS  # memorised (else the margins below would prove little)
    beams32 = model.generate(*clips, max_new_tokens=30, num_beams=3)
    with meta_default(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        _, ids16 = model.generate(*clips, max_new_tokens=30, return_ids=True)
        beams16 = model.generate(*clips, max_new_tokens=30, num_beams=3)
        text_beams = generate(model.decoder, input_ids=torch.tensor([model.render()[0]], device=DEVICE), max_new_tokens=5,
                              num_beams=3, eos_ids=model.tok.eos_ids, pad_id=model.tok.pad_id)
    assert text_beams.device == DEVICE and text_beams.dtype == torch.long  # the decoder's own beam search on token ids
    margins = greedy_margins(model, clips, ids32)
    lengths = torch.tensor([len(c) for c in up_to_eos(ids32.tolist(), model.tok.eos_ids)], device=ids32.device)
    real = torch.arange(ids32.shape[1], device=ids32.device) < lengths[:, None]  # up to and including EOS
    # overfit: fp32's choice is clear at every step of both captions, so bf16 must make every one of them
    assert (margins[real] > MARGIN).all(), margins
    assert ids16.shape == ids32.shape and torch.equal(ids16, ids32)
    assert beams32 == CAPTIONS and beams16 == beams32  # the memorised captions win the beam search in both dtypes


# ------------------------------------------------------------------------------------- FakeTensorMode with a fake CUDA device
def test_fake_cuda_decoder_and_aligners_forward_backward():
    """Second net: the decoder, aligners, interleaver and OT on fake CUDA tensors (no data, no GPU) with a
    fake CPU tensor anywhere in the graph raising. Needs a torch build that knows CUDA: the CPU-only
    wheel refuses Python indexing of a fake CUDA tensor ("not linked with support for cuda devices")
    and aborts the process in a fake CUDA conv, so the ViT / Whisper conv stems are left to the meta net."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    try:
        with mode:
            torch.zeros(2, device="cuda")[:1]
    except RuntimeError as e:
        pytest.skip(f"this torch build has no fake CUDA indexing: {e}")
    tok = tokenizer()
    with torch.device("meta"):  # shapes only: fake CUDA has no RNG to initialise weights with
        model = AVCaptioner(preset("tiny", tok.vocab_size, ot_weight=0.1, ot_fusion=True), tok)
    with mode:
        model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda"))
        cuda = model.device
        v = model.visual_aligner(torch.zeros(3, model.cfg.vit.tokens_per_frame, model.visual_aligner[0].in_features, device=cuda))
        a, at = model.audio_aligner(torch.zeros(40, model.cfg.audio.dim, device=cuda))
        idx, times, _ = order("per_frame", np.float32([0.25, 0.75, 1.25]), v.shape[1], model.audio_aligner.host_times(40))
        tokens = torch.cat([v.flatten(0, 1), a])[torch.tensor(idx.tolist(), device=cuda)]
        times = torch.tensor(times.tolist(), device=cuda)
        av = tokens + model.time_embed(times)
        ids = torch.zeros(2, 7, dtype=torch.long, device=cuda)
        x = torch.cat([model.decoder.embed(ids[:, :3]), av.expand(2, -1, -1), model.decoder.embed(ids[:, 3:])], 1)
        is_av = torch.zeros(2, x.shape[1], dtype=torch.bool, device=cuda)
        is_av[:, 3:3 + len(av)] = True
        mask = masks.for_sdpa(masks.av_prefix(is_av) & masks.key_padding(torch.ones_like(is_av)))
        logits = model.decoder(inputs_embeds=x, mask=mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), torch.zeros(logits.shape[:2], dtype=torch.long, device=cuda).flatten())
        loss = loss + ot_loss(v.flatten(0, 1), a)
        loss.backward()
        assert loss.device.type == "cuda" and model.visual_aligner[0].weight.grad.device.type == "cuda"
