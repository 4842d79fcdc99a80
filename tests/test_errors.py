"""Bad input gives one line naming the file and the problem, and exit status 2, not a traceback: media, avnano and
released checkpoints, configs and manifest rows; each script path once end to end as a subprocess, the rest in-process."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

import sample
from avnano.checkpoint import save_model
from avnano.data import ClipStore, read_manifest
from avnano.errors import InputError, run_main
from avnano.media import MediaError, load_clip, write_clip
from avnano.weights import read_config, read_safetensors
from tests.helpers import one_error, run_in_process, run_script
from tests.test_media import frames, tone
from tests.test_model import tiny

LLM_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.fixture
def refused(monkeypatch, capsys):
    """refused(script, *argv, cli=False) -> the one stderr line of a run that exits with status 2: sample.py's main
    in-process, or (cli=True) the script in a subprocess, end to end."""
    def run(script, *argv, cli=False):
        if cli:
            return one_error(run_script(script, *argv, status=2, timeout=120).stderr.splitlines())
        assert script == "sample.py"
        return one_error(run_in_process(monkeypatch, capsys, sample.main, *argv, status=2)[1])
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny saved avnano checkpoint, a good clip (2 s, 10 fps, with sound) and the bad media files."""
    tmp = tmp_path_factory.mktemp("errors")
    save_model(tiny(), str(tmp / "ckpt"))
    write_clip(str(tmp / "good.mp4"), frames(20, 32, 32), fps=10, audio=tone(2.0))
    good = (tmp / "good.mp4").read_bytes()
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
def test_sample_names_a_bad_video(files, refused, name, problem):
    video = str(files / name)
    line = refused("sample.py", "--ckpt", files / "ckpt", "--video", video, "--device", "cpu", cli=name == "empty.mp4")
    assert line.startswith(f"error: {video}: {problem}")


def test_sample_names_a_truncated_or_malformed_checkpoint(files, refused, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(files / "ckpt", ckpt)
    weights = os.path.join(ckpt, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    video = str(files / "notes.mp4")  # never reached: the checkpoint is read first
    line = refused("sample.py", "--ckpt", ckpt, "--video", video, "--device", "cpu")
    assert line == f"error: {weights}: truncated or corrupt safetensors file (incomplete metadata, file not fully covered)"
    config = os.path.join(ckpt, "config.json")
    with open(config, "w") as f:
        f.write('{"avnano": {"fps": 2.0,}}')
    line = refused("sample.py", "--ckpt", ckpt, "--video", video, "--device", "cpu")
    assert line == f"error: {config}: malformed JSON (Expecting property name enclosed in double quotes at line 1 column 24)"


def test_sample_llm_names_a_bad_released_checkpoint(refused, tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps(LLM_CONFIG)[:-1])  # the closing brace lost
    line = refused("sample.py", "--llm", llm, "--prompt", "hi", "--device", "cpu", cli=True)
    assert line.startswith(f"error: {llm / 'config.json'}: malformed JSON (")
    (llm / "config.json").write_text(json.dumps(LLM_CONFIG))
    with open(llm / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": [1.0] * 16}, f)
    line = refused("sample.py", "--llm", llm, "--prompt", "hi", "--device", "cpu")
    assert line.startswith(f"error: {llm}: only pickle weights found (pytorch_model.bin). avnano reads safetensors only")
    save_file({"model.norm.weight": torch.ones(16), "model.embed_tokens.weight": torch.zeros(64, 16)},
              str(llm / "model.safetensors"))
    with open(llm / "model.safetensors", "r+b") as f:
        f.truncate(100)
    line = refused("sample.py", "--llm", llm, "--prompt", "hi", "--device", "cpu")
    assert line.startswith(f"error: {llm / 'model.safetensors'}: truncated or corrupt safetensors file (")


def test_train_names_a_malformed_manifest_row(refused, tmp_path):
    row = {"video": "clips/a.mp4", "caption": "a knock at 1.0 s."}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps({"video": "clips/b.mp4"}) + "\n")
    line = refused("train_sft.py", "--data", tmp_path, "--steps", 1, "--out", tmp_path / "out", cli=True)
    assert line == f'error: {tmp_path / "train.jsonl"}:3: missing "caption" (a string)'
    assert not os.path.exists(tmp_path / "out")


def test_recolour_is_refused_on_clips_that_are_not_a_toy_world(refused, tmp_path):
    row = {"video": "clips/a.mp4", "caption": "a red car passes."}  # recolouring the toy palette would falsify it
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    line = refused("train_sft.py", "--data", tmp_path, "--recolour", 0.5, "--steps", 1, "--out", tmp_path / "out", cli=True)
    assert line == f"error: {tmp_path}: --recolour permutes the toy world's palette; these clips are not a toy world"


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


def test_media_errors_are_input_errors_and_bad_clips_are_skipped(files, capsys):
    assert issubclass(MediaError, InputError)
    rows = [{"path": str(files / "notes.mp4")}, {"path": str(files / "good.mp4")}]
    store = ClipStore(rows, fps=2.0, max_frames=4, image_size=32)
    assert store.get(0) is None and store.get(0) is None  # reported once, then remembered
    assert store.get(1)[0].shape == (4, 32, 32, 3)  # 2 s at 2 fps
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
    write_clip(str(path), frames(40, 32, 32), fps=10, audio=tone(4.0))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    clip = load_clip(str(path), fps=10.0, max_frames=64, size=(32, 32))
    assert 0 < len(clip.frames) < 40 and clip.duration < 4.0 and clip.has_audio
