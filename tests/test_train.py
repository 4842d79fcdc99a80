"""The training scripts as a user runs them: two-process DDP on CPU, kill-and-resume exactness (SFT and DPO), a corrupt
clip skipped, --init with a LoRA and a stage, --compile's checkpoints, and sample.py printing the model's caption."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from avnano import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "2", "--warmup", "2", "--lr", "3e-3", "--eval-n", "2", "--max-frames", "4", "--fps", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toyworld.build(str(tmp_path_factory.mktemp("world")), 12, 2, seed=1, workers=1, progress=False)


def run_script(script, args, nproc=1):
    if nproc > 1:  # a free port each time: a fixed one can still be held by the previous run's store
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def run(args, nproc=1):
    return run_script("train_sft.py", args, nproc)


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
    log = run(["--data", world, "--steps", "3", "--out", str(tmp_path / "ddp")] + FAST, nproc=2)
    assert "world 2" in log and len(losses(log)) == 3
    assert float(re.search(r"rank_weight_max_diff=(\S+)", log)[1]) == 0.0


def test_corrupt_clip_is_skipped_and_counted(world, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(x) for x in open(os.path.join(world, "train.jsonl"))]
    for r in rows:
        r["video"] = os.path.join(world, r["video"])
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    rows[0] = dict(rows[0], video=str(tmp_path / "broken.mp4"))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text(open(os.path.join(world, "test.jsonl")).read().replace('"clips/', f'"{world}/clips/'))
    log = run(["--data", str(data), "--steps", "6", "--out", str(tmp_path / "o")] + FAST)
    assert "skipping bad clip:" in log and "broken.mp4" in log
    assert "skipped=1" in log and "1 bad clips skipped" in log and len(losses(log)) == 6


def test_a_toy_world_of_another_version_is_refused_by_name(world, tmp_path):
    rows = [dict(json.loads(x), world=toyworld.VERSION - 1) for x in open(os.path.join(world, "train.jsonl"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "train_sft.py", "--data", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and str(tmp_path / "train.jsonl") in out.stderr and "delete" in out.stderr


def test_compile_keeps_the_checkpoint_keys(tmp_path):
    # --compile once swapped model.decoder for torch.compile's wrapper: checkpoints got decoder._orig_mod.* keys
    from avnano.checkpoint import load_model, save_model
    from tests.test_model import tiny
    from train_sft import wrap
    model = tiny()
    keys = list(model.state_dict())
    assert wrap(model, world=1, compile=True) is model  # compiles lazily: nothing is compiled before a forward
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


def test_init_refuses_model_flags_it_cannot_apply(world, sft_ckpt, tmp_path):
    cmd = [sys.executable, "train_sft.py", "--init", sft_ckpt, "--data", world, "--steps", "1", "--out", str(tmp_path / "x"),
           "--interleave", "chunked", "--preset", "small"] + FAST
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert sft_ckpt in out.stderr and "--interleave chunked" in out.stderr and "--preset small" in out.stderr
    assert not os.path.exists(tmp_path / "x")


DPO_FAST = ["--clips-per-round", "4", "--samples", "2", "--batch-size", "2", "--epochs", "1", "--eval-n", "2",
            "--thresholds", "total:0.0,repetition:-1", "--later-thresholds", "total:0.0,repetition:-1", "--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def dpo_two_rounds(world, sft_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo") / "full")
    return run_script("train_dpo.py", ["--init", sft_ckpt, "--data", world, "--rounds", "2", "--guided", "--out", out] + DPO_FAST), out


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
    first = run_script("train_dpo.py", common + ["--rounds", "1"])
    rest = run_script("train_dpo.py", common + ["--rounds", "2", "--resume"])
    assert "resumed after round 1" in rest and "round=1 " not in rest
    full = dpo_steps(dpo_two_rounds[0])
    assert any(s.startswith("round=2") for s in full) and dpo_steps(first) + dpo_steps(rest) == full


def test_grpo_runs_and_reports_its_signals(world, sft_ckpt, tmp_path):
    log = run_script("train_grpo.py", ["--init", sft_ckpt, "--data", world, "--steps", "2", "--batch-size", "2", "--samples", "3",
                                       "--eval-n", "2", "--max-new-tokens", "24", "--out", str(tmp_path / "grpo")])
    steps = re.findall(r"step=(\d+) loss=(-?[\d.]+) reward=([\d.]+).*zero_spread=([\d.]+) kl=([\d.]+) ratio_dev=([\d.]+)", log)
    assert [s[0] for s in steps] == ["1", "2"]
    assert abs(float(steps[0][1])) < 1e-3 and float(steps[0][4]) == 0.0  # ratio 1 and policy == reference at step 1
    assert "before:" in log and "after:" in log


def test_two_process_dpo_and_grpo_keep_ranks_identical(world, sft_ckpt, tmp_path):
    dpo = run_script("train_dpo.py", ["--init", sft_ckpt, "--data", world, "--rounds", "2", "--guided", "--rebirth-clips", "4",
                                      "--rebirth-steps", "2", "--out", str(tmp_path / "dpo")] + DPO_FAST + ["--batch-size", "1"], nproc=2)
    kept = [int(k) for k in re.findall(r"kept (\d+) pairs", dpo)]
    assert len(kept) == 2 and "round=2 epoch=1 step=1" in dpo and "rebirth: kept" in dpo
    assert float(re.search(r"rank_weight_max_diff=(\S+)", dpo)[1]) == 0.0
    grpo = run_script("train_grpo.py", ["--init", sft_ckpt, "--data", world, "--steps", "2", "--batch-size", "1", "--samples", "2",
                                        "--eval-n", "2", "--max-new-tokens", "16", "--out", str(tmp_path / "grpo")], nproc=2)
    assert re.findall(r"step=(\d+) loss=", grpo) == ["1", "2"]
    assert float(re.search(r"rank_weight_max_diff=(\S+)", grpo)[1]) == 0.0


def test_sample_prints_the_models_caption_for_any_file(world, sft_ckpt, tmp_path):
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
        return model.generate([c.frames], [c.frame_times], [c.audio], max_new_tokens=12, **sampling)[0].strip()

    def printed(log, text):  # an empty caption prints a note instead
        return text in log if text else "(empty caption" in log

    for path, note in ((clip, None), (silent, "no audio"), (wav, "no video")):  # sampled: any change of input shows
        log = run_script("sample.py", ["--ckpt", sft_ckpt, "--video", path, "--max-new-tokens", "12", "--temperature", "1"])
        assert printed(log, caption(path, temperature=1.0, generator=torch.Generator().manual_seed(0)))
        assert note is None or note in log
    log = run_script("sample.py", ["--ckpt", sft_ckpt, "--video", clip, "--max-new-tokens", "12", "--num-beams", "3"])
    assert printed(log, caption(clip, num_beams=3))
