"""Bad input gives one line naming the file and the problem, and exit status 2, not a traceback:
media, avnano and released checkpoints, configs and manifest rows, through the real scripts."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from avnano.checkpoint import save_model
from avnano.data import ClipStore, read_manifest
from avnano.errors import InputError, run_main
from avnano.media import MediaError, load_clip, write_clip
from avnano.model import AVCaptioner, preset
from avnano.tokenizer import Tokenizer
from avnano.weights import read_config, read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLM_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def run(*argv):
    """A script in a subprocess -> (exit status, its one stderr line, or all of stderr if it printed more)."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    return r.returncode, lines[0] if len(lines) == 1 else r.stderr


def clip_bytes(tmp):
    path = str(tmp / "good.mp4")
    frames = (np.random.default_rng(0).random((20, 32, 32, 3)) * 255).astype(np.uint8)
    write_clip(path, frames, fps=10, audio=0.1 * np.sin(np.arange(32000) / 10.0))
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny saved avnano checkpoint, a good clip and the bad media files."""
    tmp = tmp_path_factory.mktemp("errors")
    torch.manual_seed(0)
    tok = Tokenizer.train(["a red circle appears at 0.5 s."] * 10 + ["Describe the clip."] * 5, vocab_size=300)
    save_model(AVCaptioner(preset("tiny", tok.vocab_size), tok), str(tmp / "ckpt"))
    good = clip_bytes(tmp)
    (tmp / "empty.mp4").write_bytes(b"")
    (tmp / "notes.mp4").write_text("this is not a video\n" * 50)
    (tmp / "cut.mp4").write_bytes(good[:len(good) // 2])  # PyAV writes the mp4 index last: the cut loses it
    return tmp


@pytest.mark.parametrize("name, problem", [
    ("empty.mp4", "file is empty"),
    ("notes.mp4", "not a readable media file (Invalid data found when processing input)"),
    ("cut.mp4", "truncated or corrupt MP4/MOV file ("),  # then FFmpeg's reason, which depends on the cut
    ("missing.mp4", "no such file"),
])
def test_sample_names_a_bad_video(files, name, problem):
    video = str(files / name)
    status, line = run("sample.py", "--ckpt", str(files / "ckpt"), "--video", video, "--device", "cpu")
    assert status == 2 and line.startswith(f"error: {video}: {problem}")


def test_sample_names_a_truncated_or_malformed_checkpoint(files, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(files / "ckpt", ckpt)
    weights = os.path.join(ckpt, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    video = str(files / "notes.mp4")  # never reached: the checkpoint is read first
    status, line = run("sample.py", "--ckpt", ckpt, "--video", video, "--device", "cpu")
    assert status == 2
    assert line == f"error: {weights}: truncated or corrupt safetensors file (incomplete metadata, file not fully covered)"
    config = os.path.join(ckpt, "config.json")
    with open(config, "w") as f:
        f.write('{"avnano": {"fps": 2.0,}}')
    status, line = run("sample.py", "--ckpt", ckpt, "--video", video, "--device", "cpu")
    assert status == 2 and line == f"error: {config}: malformed JSON (Expecting property name enclosed in " \
                                   f"double quotes at line 1 column 24)"


def test_sample_llm_names_a_bad_released_checkpoint(tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps(LLM_CONFIG)[:-1])  # the closing brace lost
    status, line = run("sample.py", "--llm", str(llm), "--prompt", "hi", "--device", "cpu")
    assert status == 2 and line.startswith(f"error: {llm / 'config.json'}: malformed JSON (")
    (llm / "config.json").write_text(json.dumps(LLM_CONFIG))
    with open(llm / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": [1.0] * 16}, f)
    status, line = run("sample.py", "--llm", str(llm), "--prompt", "hi", "--device", "cpu")
    assert status == 2 and line.startswith(f"error: {llm}: only pickle weights found (pytorch_model.bin). "
                                           "avnano reads safetensors only")
    save_file({"model.norm.weight": torch.ones(16), "model.embed_tokens.weight": torch.zeros(64, 16)},
              str(llm / "model.safetensors"))
    with open(llm / "model.safetensors", "r+b") as f:
        f.truncate(100)
    status, line = run("sample.py", "--llm", str(llm), "--prompt", "hi", "--device", "cpu")
    assert status == 2 and line.startswith(f"error: {llm / 'model.safetensors'}: truncated or corrupt safetensors file (")


def test_train_names_a_malformed_manifest_row(tmp_path):
    row = {"video": "clips/a.mp4", "caption": "a knock at 1.0 s."}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps({"video": "clips/b.mp4"}) + "\n")
    status, line = run("train_sft.py", "--data", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "out"))
    assert status == 2 and line == f'error: {tmp_path / "train.jsonl"}:3: missing "caption" (a string)'


def test_manifest_rows_are_checked_and_resolved(tmp_path):
    manifest = tmp_path / "m.jsonl"
    good = json.dumps({"video": "clips/a.mp4", "caption": "a knock."})
    cases = [("{video: 1}", 'malformed JSON (Expecting property name enclosed in double quotes at column 2)'),
             ("[1, 2]", "expected a JSON object, found a list"),
             (json.dumps({"caption": "x"}), 'missing "video" (a string)'),
             (json.dumps({"video": 3, "caption": "x"}), '"video" must be a string, found a int')]
    for text, problem in cases:
        manifest.write_text(good + "\n" + text + "\n")
        with pytest.raises(InputError) as e:
            read_manifest(str(manifest))
        assert str(e.value) == f"{manifest}:2: {problem}"
    with pytest.raises(InputError, match="nope.jsonl: no such manifest file"):
        read_manifest(str(tmp_path / "nope.jsonl"))
    manifest.write_text(good + "\n" + json.dumps({"video": "/abs/b.mp4", "caption": "y"}) + "\n")
    rows = read_manifest(str(manifest))
    assert [r["path"] for r in rows] == [str(tmp_path / "clips/a.mp4"), "/abs/b.mp4"]


def test_weights_readers_name_the_bad_file(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    save_file(tensors, str(tmp_path / "whole.safetensors"))
    assert torch.equal(read_safetensors(str(tmp_path / "whole.safetensors"))["a"], tensors["a"])
    # sharded: an index naming two shards, one missing
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a": tensors["a"]}, str(shards / "s1.safetensors"))
    index = shards / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(InputError) as e:
        read_safetensors(str(shards))
    assert str(e.value) == f"{shards / 's2.safetensors'}: missing shard (listed in model.safetensors.index.json)"
    index.write_text('{"weight_map": ')
    with pytest.raises(InputError, match=r"model.safetensors.index.json: malformed JSON \(Expecting value"):
        read_safetensors(str(shards))
    # torch.save's zip (pytorch_model.bin renamed) where safetensors is expected
    fake = tmp_path / "model.safetensors"
    torch.save(tensors, fake)
    with pytest.raises(InputError, match=r"model.safetensors: a pickle file, not safetensors\. avnano reads"):
        read_safetensors(str(fake))
    with pytest.raises(InputError, match="pickle checkpoint refused"):
        read_safetensors(str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(InputError, match=r"gone.safetensors: no such file"):
        read_safetensors(str(tmp_path / "gone.safetensors"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InputError, match="list.json: expected a JSON object, found a list"):
        read_config(str(tmp_path / "list.json"))
    with pytest.raises(InputError, match=r"config.json: missing \(checkpoints ship a config.json"):
        read_config(str(shards))


def test_media_errors_are_input_errors_and_bad_clips_are_skipped(files, tmp_path, capsys):
    assert issubclass(MediaError, InputError)
    write_clip(str(tmp_path / "good.mp4"), np.zeros((4, 32, 32, 3), np.uint8), fps=4)
    rows = [{"path": str(files / "notes.mp4")}, {"path": str(tmp_path / "good.mp4")}]
    store = ClipStore(rows, fps=2.0, max_frames=4, image_size=32)
    assert store.get(0) is None and store.get(0) is None  # reported once, then remembered
    assert store.get(1)[0].shape == (2, 32, 32, 3)
    assert list(store.bad) == [0] and "notes.mp4: not a readable media file" in store.bad[0]
    assert capsys.readouterr().err.count("skipping bad clip") == 1


def test_run_main_prints_one_line_and_exits_2(capsys):
    def bad():
        raise InputError("x.json", "malformed JSON\n(on two lines)")
    with pytest.raises(SystemExit) as e:
        run_main(bad)
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.json: malformed JSON (on two lines)\n"
    assert run_main(lambda: 7) == 7

    def bug():
        raise KeyError("not user input")
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_main(bug)


def test_truncated_index_first_file_decodes_partially(tmp_path):
    """The documented behaviour: a cut Matroska file keeps the frames before the cut."""
    path = tmp_path / "clip.mkv"
    frames = (np.random.default_rng(0).random((40, 32, 32, 3)) * 255).astype(np.uint8)
    write_clip(str(path), frames, fps=10, audio=0.1 * np.sin(np.arange(64000) / 10.0))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    clip = load_clip(str(path), fps=10.0, max_frames=64, size=(32, 32))
    assert 0 < len(clip.frames) < 40 and clip.duration < 4.0 and clip.has_audio
