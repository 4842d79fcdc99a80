"""The training scripts as a user runs them: two-process DDP on CPU, kill-and-resume exactness (SFT and DPO), a corrupt
clip skipped, --init with a LoRA and a stage, --compile's checkpoints, and sample.py printing the model's caption; the
CUDA/DDP conventions proven on CPU (collectives on the model's device, backend choice, no_sync, empty shards, sharded
evaluation, TF32, bf16 autocast in DPO / GRPO)."""
import argparse
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from avnano import toyworld
from tests.helpers import ROOT, assert_prints_caption, run_in_process, run_script
FAST = ["--batch-size", "2", "--warmup", "2", "--lr", "3e-3", "--eval-n", "2", "--max-frames", "4", "--fps", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toyworld.build(str(tmp_path_factory.mktemp("world")), 12, 2, seed=1, workers=1, progress=False)


# Loaded into every torchrun child (PYTHONPATH): logs each collective's tensor devices, each DDP bucket all-reduce
# (is it the backward's last bucket?) and each rank's number of evaluated clips to $PROBE_LOG.rank.
PROBE = """
import os
if "RANK" in os.environ and os.environ.get("PROBE_LOG"):
    import functools, json
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    import avnano.evaluate
    log = open(os.environ["PROBE_LOG"] + "." + os.environ["RANK"], "a")
    def note(**kw):
        log.write(json.dumps(kw) + "\\n")
        log.flush()
    def probe(name, fn):
        @functools.wraps(fn)
        def call(*a, **k):
            tensors = [x for x in list(a) + list(k.values()) for x in (x if isinstance(x, (list, tuple)) else [x])
                       if hasattr(x, "device")]
            note(op=name, devices=[str(t.device) for t in tensors])
            return fn(*a, **k)
        return call
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce"):
        setattr(dist, name, probe(name, getattr(dist, name)))
    init = DistributedDataParallel.__init__
    def ddp_init(self, module, *a, **k):
        init(self, module, *a, **k)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        note(op="model", devices=[str(next(module.parameters()).device)])
        def hook(state, bucket):
            note(op="ddp_bucket", last=bucket.is_last(), devices=[str(bucket.buffer().device)])
            return allreduce_hook(state, bucket)
        self.register_comm_hook(None, hook)
    DistributedDataParallel.__init__ = ddp_init
    captions = avnano.evaluate.caption_clips
    def caption_clips(model, store, indices, *a, **k):
        note(op="caption", n=len(indices), devices=[str(model.device)])
        return captions(model, store, indices, *a, **k)
    avnano.evaluate.caption_clips = caption_clips
"""


def probe_env(tmp_path, name="log"):
    (tmp_path / "probe").mkdir(exist_ok=True)
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "probe"), ROOT]), "PROBE_LOG": str(tmp_path / "probe" / name)}


def probed(tmp_path, rank, name="log"):
    return [json.loads(x) for x in open(tmp_path / "probe" / f"{name}.{rank}")]


def check_collectives(tmp_path, name, device="cpu"):
    """Every probed collective of both ranks got tensors on the model's device; both ranks captioned held-out clips."""
    for rank in (0, 1):
        calls = probed(tmp_path, rank, name)
        models = {d for c in calls if c["op"] in ("model", "caption") for d in c["devices"]}
        assert models == {device}  # the --device the script was given
        assert any(c["op"] not in ("model", "caption") for c in calls)
        assert all(d == device for c in calls for d in c["devices"]), calls
        assert any(c["op"] == "caption" and c["n"] > 0 for c in calls)  # evaluation sharded, not rank 0 alone


def script_log(script, args, nproc=1, env=None, timeout=600):
    """A script that must succeed -> its stdout + stderr."""
    out = run_script(script, *args, nproc=nproc, env=env, timeout=timeout)
    return out.stdout + out.stderr


def run(args, nproc=1):
    return script_log("train_sft.py", args, nproc)


def losses(log):
    return {int(m[1]): m[2] for m in re.finditer(r"step=(\d+) loss=([\d.]+)", log)}


def test_kill_and_resume_reproduces_losses(world, tmp_path):
    common = ["--data", world, "--steps", "6", "--save-every", "3"] + FAST
    full = losses(run(common + ["--out", str(tmp_path / "a")]))
    first = losses(run(common + ["--out", str(tmp_path / "b"), "--stop-after", "3"]))
    assert not os.path.exists(tmp_path / "b" / "eval.json")  # it really stopped early
    rest = losses(run(common + ["--out", str(tmp_path / "b"), "--resume"]))
    assert sorted(full) == list(range(1, 7)) and sorted(first) == [1, 2, 3] and sorted(rest) == [4, 5, 6]
    assert {**first, **rest} == full  # bit-for-bit the same printed losses
    metrics = json.load(open(tmp_path / "b" / "eval.json"))
    assert {"event_f1", "miss", "hall", "dialogue_acc", "repetition"} <= set(metrics)


def test_two_process_ddp_keeps_ranks_identical(world, tmp_path):
    # probed in each rank: every collective's tensors on the model's device; --grad-accum 2 once all-reduced every
    # micro-batch (no no_sync); the held-out evaluation once ran on rank 0 while rank 1 waited in a collective
    log = script_log("train_sft.py", ["--data", world, "--steps", "3", "--grad-accum", "2", "--out", str(tmp_path / "ddp")]
                     + FAST, nproc=2, env=probe_env(tmp_path))
    assert "world 2" in log and len(losses(log)) == 3
    assert float(re.search(r"rank_weight_max_diff=(\S+)", log)[1]) == 0.0
    check_collectives(tmp_path, "log")
    for rank in (0, 1):
        calls = probed(tmp_path, rank)
        assert sum(c["op"] == "ddp_bucket" and c["last"] for c in calls) == 3  # one gradient all-reduce per step
        assert [c["n"] for c in calls if c["op"] == "caption"] == [1]  # --eval-n 2: one clip per rank


def manifest_with_broken_clips(world, tmp_path, broken):
    """A copy of the tiny world's manifests (absolute paths) whose rows `broken` point at a corrupt mp4."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(x) for x in open(os.path.join(world, "train.jsonl"))]
    for r in rows:
        r["video"] = os.path.join(world, r["video"])
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    for i in broken:
        rows[i] = dict(rows[i], video=str(tmp_path / "broken.mp4"))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text(open(os.path.join(world, "test.jsonl")).read().replace('"clips/', f'"{world}/clips/'))
    return str(data)


def bad_first_batch_of_rank1(world, tmp_path):
    """A manifest whose rank-1 share of the first global batch (batch 2 x 2 ranks, seed 0) is all broken clips."""
    from avnano.data import batch_indices
    n = sum(1 for _ in open(os.path.join(world, "train.jsonl")))
    return manifest_with_broken_clips(world, tmp_path, batch_indices(n, 2, 0, 0, rank=1, world=2)[0])


def test_a_rank_with_an_empty_batch_does_not_hang_the_others(world, tmp_path):
    # rank 1 once `continue`d past its empty micro-batch while rank 0 waited in DDP's all-reduce (a hang, or ranks out
    # of step); now every rank skips a micro-batch that is empty on any rank
    data = bad_first_batch_of_rank1(world, tmp_path)
    log = script_log("train_sft.py", ["--data", data, "--steps", "2", "--out", str(tmp_path / "o")] + FAST, nproc=2,
                     timeout=120)
    assert "skipping bad clip:" in log and len(losses(log)) == 2
    # --grad-accum 1: step 1's one micro-batch was empty on rank 1, so rank 0 (which logs) skipped its own full one too;
    # a step whose micro-batches were all skipped logs zero sums and no gradient. Step 2 trained.
    assert re.search(r"step=1 loss=0\.0000 ce=0\.0000 ot=0\.0000 ground=0\.0000 lr=\S+ grad_norm=0\.000 ", log), log
    assert float(losses(log)[2]) > 0
    assert float(re.search(r"rank_weight_max_diff=(\S+)", log)[1]) == 0.0


def test_collectives_take_tensors_on_the_models_device(monkeypatch):
    # mean_over_ranks once all-reduced a CPU float64 tensor, which NCCL refuses; a model on "meta" stands in for CUDA
    import torch.distributed as dist

    from avnano import distributed

    class Reached(Exception):
        pass

    model = torch.nn.Linear(3, 2, device="meta")
    device = next(model.parameters()).device
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def check(t, *a, **k):
        assert t.device == device, f"a collective got a tensor on {t.device}, the model is on {device}"
        raise Reached

    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, check)
    for call in (lambda: distributed.mean_over_ranks([1.0, 2.0], 2, device), lambda: distributed.every_rank([True], 2, device),
                 lambda: distributed.sync_grads(model, 2), lambda: distributed.rank_weight_diff(model)):
        with pytest.raises(Reached):
            call()


@pytest.mark.parametrize("device,local_rank,expected", [("cuda", 1, ("nccl", "cuda:1")), ("cuda:0", 1, ("nccl", "cuda:1")),
                                                         ("cuda:0", 0, ("nccl", "cuda:0")), ("cpu", 1, ("gloo", "cpu"))])
def test_backend_follows_the_device_type(device, local_rank, expected):
    # --device cuda:0 once picked gloo (the check was device == "cuda")
    from avnano.distributed import backend_for
    assert backend_for(device, local_rank) == expected


def test_cuda_device_is_set_before_the_process_group(monkeypatch):
    import torch.distributed as dist

    from avnano import distributed
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: calls.append(("init", backend, str(k.get("device_id")))))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    rank, world, device, _ = distributed.setup_distributed("cuda:0")
    assert (rank, world, device) == (1, 2, "cuda:1")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl", "cuda:1")]


def test_setup_turns_tf32_on(monkeypatch):
    from avnano.distributed import setup_distributed
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    setup_distributed("cpu")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_corrupt_clip_is_skipped_and_counted(world, tmp_path):
    data = manifest_with_broken_clips(world, tmp_path, [0])
    log = run(["--data", data, "--steps", "6", "--out", str(tmp_path / "o")] + FAST)
    assert "skipping bad clip:" in log and "broken.mp4" in log
    assert "skipped=1" in log and "1 bad clips skipped" in log and len(losses(log)) == 6


def test_a_toy_world_of_another_version_is_refused_by_name(world, tmp_path):
    rows = [dict(json.loads(x), world=toyworld.VERSION - 1) for x in open(os.path.join(world, "train.jsonl"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_script("train_sft.py", "--data", tmp_path, status=2, timeout=120)
    assert str(tmp_path / "train.jsonl") in out.stderr and "delete" in out.stderr


def test_compile_keeps_the_checkpoint_keys(tmp_path):
    # --compile once swapped model.decoder for torch.compile's wrapper: checkpoints got decoder._orig_mod.* keys
    from avnano.checkpoint import load_model, save_model
    from tests.test_model import tiny
    from train_sft import wrap
    model = tiny()
    keys = list(model.state_dict())
    assert model.decoder._compiled_call_impl is None
    assert wrap(model, world=1, compile=True) is model  # compiles lazily: nothing is compiled before a forward
    assert model.decoder._compiled_call_impl is not None  # but the decoder's calls now go through torch.compile
    assert list(model.state_dict()) == keys
    save_model(model, str(tmp_path))
    back = load_model(str(tmp_path)).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def sft_ckpt(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "ckpt")
    run(["--data", world, "--steps", "2", "--out", out] + FAST)
    return out


def test_init_applies_lora_and_stage(world, sft_ckpt, tmp_path):
    # --init once returned the checkpoint as loaded: --lora-r ignored, --stage sft trained the whole decoder
    out = tmp_path / "sft_lora"
    run(["--init", sft_ckpt, "--data", world, "--stage", "sft", "--lora-r", "4", "--steps", "1", "--out", str(out)] + FAST)
    before, after = load_file(os.path.join(sft_ckpt, "model.safetensors")), load_file(out / "model.safetensors")
    assert json.load(open(out / "config.json"))["avnano"]["lora_r"] == 4
    added = sorted(set(after) - set(before))
    assert added and all("lora_" in k for k in added) and any(k.endswith("lora_B") and after[k].abs().sum() > 0 for k in added)
    frozen = [k for k in before if k.startswith(("decoder.", "vit.", "audio."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # stage sft: aligners + LoRA only
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual_aligner."))


def test_init_refuses_model_flags_it_cannot_apply(sft_ckpt):
    from avnano import training
    from avnano.errors import InputError
    p = argparse.ArgumentParser()
    training.model_args(p, architecture=True)
    training.opt_args(p)
    args = p.parse_args(["--init", sft_ckpt, "--interleave", "chunked", "--preset", "small", "--lora-r", "4"])
    with pytest.raises(InputError) as e:
        training.build_model(args, [], p)
    msg = str(e.value)
    assert msg.startswith(sft_ckpt) and "--interleave chunked" in msg and "--preset small" in msg and "--lora-r" not in msg


DPO_FAST = ["--clips-per-round", "4", "--samples", "2", "--batch-size", "2", "--epochs", "1", "--eval-n", "2",
            "--thresholds", "total:0.0,repetition:-1", "--later-thresholds", "total:0.0,repetition:-1", "--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def dpo_two_rounds(world, sft_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo") / "full")
    return script_log("train_dpo.py", ["--init", sft_ckpt, "--data", world, "--rounds", "2", "--guided", "--out", out] + DPO_FAST), out


def dpo_steps(log):
    return re.findall(r"round=\d epoch=\d step=\d+ loss=\S+ chosen_reward=\S+ rejected_reward=\S+ margin=\S+ accuracy=\S+", log)


def test_multi_round_dpo_starts_each_round_at_log2(dpo_two_rounds):
    log, out = dpo_two_rounds
    firsts = re.findall(r"round=(\d) epoch=1 step=1 loss=([\d.]+) chosen_reward=([-\d.]+) rejected_reward=([-\d.]+)", log)
    assert [f[0] for f in firsts] == ["1", "2"]
    for _, _, rc, rr in firsts:  # fresh proxy: policy == reference, so both implicit rewards start at 0
        assert float(rc) == 0.0 and float(rr) == 0.0
    assert "after round 2:" in log and os.path.exists(os.path.join(out, "model.safetensors"))


def test_dpo_resume_reproduces_the_uninterrupted_losses(world, sft_ckpt, dpo_two_rounds, tmp_path):
    # --resume once built the optimizer before the LoRA was added and died ("parameter group doesn't match")
    common = ["--init", sft_ckpt, "--data", world, "--guided", "--out", str(tmp_path / "dpo")] + DPO_FAST
    first = script_log("train_dpo.py", common + ["--rounds", "1"])
    rest = script_log("train_dpo.py", common + ["--rounds", "2", "--resume"])
    assert "resumed after round 1" in rest and "round=1 " not in rest
    full = dpo_steps(dpo_two_rounds[0])
    assert any(s.startswith("round=2") for s in full) and dpo_steps(first) + dpo_steps(rest) == full


def test_grpo_runs_and_reports_its_signals(world, sft_ckpt, tmp_path):
    log = script_log("train_grpo.py", ["--init", sft_ckpt, "--data", world, "--steps", "2", "--batch-size", "2", "--samples", "3",
                                       "--eval-n", "2", "--max-new-tokens", "24", "--out", str(tmp_path / "grpo")])
    steps = re.findall(r"step=(\d+) loss=(-?[\d.]+) reward=([\d.]+).*zero_spread=([\d.]+) kl=([\d.]+) ratio_dev=([\d.]+)", log)
    assert [s[0] for s in steps] == ["1", "2"]
    assert abs(float(steps[0][1])) < 1e-3 and float(steps[0][4]) == 0.0  # ratio 1 and policy == reference at step 1
    assert "before:" in log and "after:" in log


def test_two_process_dpo_and_grpo_keep_ranks_identical(world, sft_ckpt, tmp_path):
    dpo = script_log("train_dpo.py", ["--init", sft_ckpt, "--data", world, "--rounds", "2", "--guided", "--rebirth-clips", "4",
                                      "--rebirth-steps", "2", "--out", str(tmp_path / "dpo")] + DPO_FAST + ["--batch-size", "1"], nproc=2,
                     env=probe_env(tmp_path, "dpo"))
    kept = [int(k) for k in re.findall(r"kept (\d+) pairs", dpo)]
    assert len(kept) == 2 and "round=2 epoch=1 step=1" in dpo and "rebirth: kept" in dpo
    assert float(re.search(r"rank_weight_max_diff=(\S+)", dpo)[1]) == 0.0
    grpo = script_log("train_grpo.py", ["--init", sft_ckpt, "--data", world, "--steps", "2", "--batch-size", "1", "--samples", "2",
                                        "--eval-n", "2", "--max-new-tokens", "16", "--out", str(tmp_path / "grpo")], nproc=2,
                       env=probe_env(tmp_path, "grpo"))
    assert re.findall(r"step=(\d+) loss=", grpo) == ["1", "2"]
    assert float(re.search(r"rank_weight_max_diff=(\S+)", grpo)[1]) == 0.0
    check_collectives(tmp_path, "dpo")  # mean_over_ranks, sync_grads, rank_weight_diff, sharded held-out evaluations
    check_collectives(tmp_path, "grpo")


def test_sample_prints_the_models_caption_for_any_file(world, sft_ckpt, tmp_path, monkeypatch, capsys):
    import sample
    import numpy as np
    import soundfile

    from avnano.checkpoint import load_model
    from avnano.media import load_clip, write_clip
    clip = os.path.join(world, "clips", "test_000000.mp4")
    silent, wav = str(tmp_path / "silent.webm"), str(tmp_path / "speech.wav")
    write_clip(silent, (np.random.default_rng(0).random((8, 64, 64, 3)) * 255).astype(np.uint8), fps=4, vcodec="libvpx")
    soundfile.write(wav, 0.1 * np.sin(np.arange(32000) / 10), 16000)
    model = load_model(sft_ckpt)
    cfg = model.cfg

    def caption(path, **sampling):  # the library's caption of the decoded file: what sample.py must print
        c = load_clip(path, cfg.fps, cfg.max_frames, (cfg.vit.image_size, cfg.vit.image_size))
        return model.generate([c.frames], [c.frame_times], [c.audio], max_new_tokens=12, **sampling)[0]

    for path, note in ((clip, None), (silent, "no audio"), (wav, "no video")):  # sampled: any change of input shows
        out, err = run_in_process(monkeypatch, capsys, sample.main, "--ckpt", sft_ckpt, "--video", path, "--max-new-tokens", 12,
                                  "--temperature", 1, "--device", "cpu")
        assert_prints_caption(out, caption(path, temperature=1.0, generator=torch.Generator().manual_seed(0)))
        notes = [line for line in err if line.startswith("note:")]  # on stderr, never mixed into the caption's line
        assert len(notes) == (note is not None) and all(path in n and note in n for n in notes)
    out = run_script("sample.py", "--ckpt", sft_ckpt, "--video", clip, "--max-new-tokens", 12, "--num-beams", 3, timeout=120)
    assert_prints_caption(out.stdout, caption(clip, num_beams=3))  # once end to end, as a user runs it


def test_dpo_and_grpo_steps_score_and_sample_under_bf16_autocast(world, sft_ckpt, monkeypatch):
    # DPO / GRPO once scored and sampled in fp32 on CUDA (autocast only in SFT); CPU bf16 autocast runs the same path
    import train_dpo
    import train_grpo
    from avnano import distributed, training
    from avnano.checkpoint import load_model
    from avnano.data import ClipStore, read_splits
    monkeypatch.setattr(distributed, "CPU_BF16", True)
    model = load_model(sft_ckpt)
    training.add_lora(model, 4, 8.0)
    model.set_trainable({"lora"})
    seen = []
    model.decoder.register_forward_pre_hook(lambda m, a: seen.append(torch.get_autocast_dtype("cpu")
                                                                       if torch.is_autocast_enabled("cpu") else None))
    rows = read_splits(world)[0]
    store = ClipStore(rows, model.cfg.fps, model.cfg.max_frames, model.cfg.vit.image_size)
    args = argparse.Namespace(seed=0, batch_size=2, samples=2, max_new_tokens=8, temperature=1.0, thresholds="total:-1,repetition:-1",
                              later_thresholds="total:-1,repetition:-1", lr=1e-2, weight_decay=0.0, epochs=1, beta=0.1,
                              loss="sigmoid", cdpo_eps=0.1, guided=True, guided_weight=0.1, grad_clip=1.0, iterations=2,
                              clip_eps=0.2, clip_eps_high=None, norm="grpo", scale="std", max_words=30, weights=(1.0, 1.0, 1.0))
    pairs = train_dpo.build_pairs(model, store, [0, 1], args, 0, print, 1, 0)  # sampling
    assert seen and all(d == torch.bfloat16 for d in seen)
    pairs = pairs or [(0, rows[0]["caption"], rows[1]["caption"]), (1, rows[1]["caption"], rows[0]["caption"])]
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    seen.clear()
    train_dpo.train_round(model, store, pairs[:2], args, print, 0, 1, 0)  # scoring: policy, reference, ground truth
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the step moved the LoRA
    seen.clear()
    items = [(rows[i], *store.get(i)) for i in (0, 1)]
    optimizer = training.make_optimizer(model, args.lr, 0.0)
    loss, kl, ratio_dev, cmask, grad_norm, r, _ = train_grpo.grpo_step(model, optimizer, items, args, torch.Generator().manual_seed(0))
    assert seen and all(d == torch.bfloat16 for d in seen)  # sampling, reference and both policy iterations
    assert r.shape == (2, 2) and all(map(math.isfinite, (loss, kl, ratio_dev, grad_norm)))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
