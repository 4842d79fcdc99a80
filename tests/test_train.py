"""train_sft.py as a user runs it: two-process DDP on CPU, kill-and-resume exactness, a corrupt clip skipped."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

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
    assert out.returncode != 0 and str(tmp_path / "train.jsonl") in out.stderr and "delete" in out.stderr


@pytest.fixture(scope="module")
def sft_ckpt(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "ckpt")
    run(["--data", world, "--steps", "2", "--out", out] + FAST)
    return out


DPO_FAST = ["--clips-per-round", "4", "--samples", "2", "--batch-size", "2", "--epochs", "1", "--eval-n", "2",
            "--thresholds", "total:0.0,repetition:-1", "--later-thresholds", "total:0.0,repetition:-1", "--max-new-tokens", "24"]


def test_multi_round_dpo_starts_each_round_at_log2(world, sft_ckpt, tmp_path):
    log = run_script("train_dpo.py", ["--init", sft_ckpt, "--data", world, "--rounds", "2", "--guided",
                                      "--out", str(tmp_path / "dpo")] + DPO_FAST)
    firsts = re.findall(r"round=(\d) epoch=1 step=1 loss=([\d.]+) chosen_reward=([-\d.]+) rejected_reward=([-\d.]+)", log)
    assert [f[0] for f in firsts] == ["1", "2"]
    for _, _, rc, rr in firsts:  # fresh proxy: policy == reference, so both implicit rewards start at 0
        assert float(rc) == 0.0 and float(rr) == 0.0
    assert "after round 2:" in log and os.path.exists(tmp_path / "dpo" / "model.safetensors")


def test_grpo_runs_and_reports_its_signals(world, sft_ckpt, tmp_path):
    log = run_script("train_grpo.py", ["--init", sft_ckpt, "--data", world, "--steps", "2", "--batch-size", "2", "--group", "3",
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
    grpo = run_script("train_grpo.py", ["--init", sft_ckpt, "--data", world, "--steps", "2", "--batch-size", "1", "--group", "2",
                                        "--eval-n", "2", "--max-new-tokens", "16", "--out", str(tmp_path / "grpo")], nproc=2)
    assert re.findall(r"step=(\d+) loss=", grpo) == ["1", "2"]
    assert float(re.search(r"rank_weight_max_diff=(\S+)", grpo)[1]) == 0.0


def test_sample_captions_any_file(world, sft_ckpt, tmp_path):
    import numpy as np
    import soundfile

    from avnano.media import write_clip
    clip = os.path.join(world, "clips", "test_000000.mp4")
    silent, wav = str(tmp_path / "silent.webm"), str(tmp_path / "speech.wav")
    write_clip(silent, (np.random.default_rng(0).random((8, 64, 64, 3)) * 255).astype(np.uint8), fps=4, vcodec="libvpx")
    soundfile.write(wav, 0.1 * np.sin(np.arange(32000) / 10), 16000)
    for path, note in ((clip, None), (silent, "no audio stream"), (wav, "no video stream")):
        log = run_script("sample.py", ["--ckpt", sft_ckpt, "--video", path, "--max-new-tokens", "12"])
        assert log.strip() and (note is None or note in log)
    log = run_script("sample.py", ["--ckpt", sft_ckpt, "--video", clip, "--max-new-tokens", "12", "--num-beams", "3"])
    assert log.strip()
