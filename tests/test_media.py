"""Media I/O on real files written here: the phi/m frame rule, 16 kHz mono audio, and every bad case."""
import numpy as np
import pytest
import soundfile
import torch

from avnano.media import SAMPLE_RATE, MediaError, frame_times_for, load_audio, load_clip, write_clip

HOP = 160


def frames(n, h=48, w=64, seed=0):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


def tone(seconds, rate=SAMPLE_RATE, channels=1, f=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * f * (c + 1) * t) for c in range(channels)])


@pytest.mark.parametrize("vcodec", ["libx264", "mpeg4"])
def test_av_clip_follows_the_frame_rule_and_resamples_audio(tmp_path, vcodec):
    path = str(tmp_path / "clip.mp4")
    write_clip(path, frames(100), fps=10, audio=tone(10.0, 44100), sample_rate=44100, vcodec=vcodec)
    clip = load_clip(path, fps=2.0, max_frames=32, size=(32, 24))
    assert clip.has_video and clip.has_audio and abs(clip.duration - 10.0) < 1e-6
    assert clip.frames.shape == (20, 24, 32, 3) and clip.frames.dtype == torch.uint8
    assert torch.allclose(clip.frame_times, torch.tensor(frame_times_for(10.0, 2.0, 32)), atol=0.051)
    assert abs(len(clip.audio) - 10 * SAMPLE_RATE) <= HOP and clip.audio.dim() == 1
    capped = load_clip(path, fps=2.0, max_frames=8)  # 2 fps * 10 s = 20 > 8: the rate drops to 0.8 fps
    assert len(capped.frames) == 8
    gaps = capped.frame_times.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1.25), atol=0.11)  # spread uniformly


def test_frame_rule():
    assert frame_times_for(4.0, 1.0, 32) == [0.5, 1.5, 2.5, 3.5]
    assert len(frame_times_for(100.0, 2.0, 16)) == 16 and len(frame_times_for(0.1, 1.0, 8)) == 1


def test_video_without_audio_falls_back_to_silence(tmp_path):
    path = str(tmp_path / "silent.mp4")
    write_clip(path, frames(30), fps=10)
    clip = load_clip(path, fps=1.0)
    assert clip.has_video and not clip.has_audio
    assert len(clip.audio) == 3 * SAMPLE_RATE and clip.audio.abs().max() == 0


def test_multichannel_48k_audio(tmp_path):
    wav = str(tmp_path / "surround.wav")
    soundfile.write(wav, tone(2.0, 48000, channels=6).T, 48000)
    audio = load_audio(wav)
    assert abs(len(audio) - 2 * SAMPLE_RATE) <= HOP
    m4a = str(tmp_path / "surround.mp4")
    write_clip(m4a, None, audio=tone(2.0, 48000, channels=6), sample_rate=48000)
    clip = load_clip(m4a)
    assert not clip.has_video and clip.has_audio and clip.audio.dim() == 1
    assert abs(len(clip.audio) - 2 * SAMPLE_RATE) <= HOP and abs(clip.duration - 2.0) < 0.01
    # 440 Hz dominates the mono mix (every channel has energy; the spectrum peak sits on a channel's tone)
    spectrum = np.abs(np.fft.rfft(clip.audio.numpy()))
    assert spectrum[int(440 * 2)] > 10 * np.median(spectrum)


def test_one_frame_video_and_large_resolution(tmp_path):
    one = str(tmp_path / "one.mp4")
    write_clip(one, frames(1, 64, 64), fps=25)
    clip = load_clip(one, fps=2.0)
    assert clip.frames.shape[0] == 1 and clip.frame_times.tolist() == [0.0]
    big = str(tmp_path / "big.mp4")
    write_clip(big, frames(3, 2160, 3840), fps=25)
    clip = load_clip(big, fps=25.0, size=(224, 224))  # scaled while decoding
    assert clip.frames.shape == (3, 224, 224, 3)


def test_variable_frame_rate_uses_timestamps(tmp_path):
    path = str(tmp_path / "vfr.mp4")
    times = np.array([0.0, 0.1, 0.2, 1.5, 1.6, 3.0, 3.1, 3.2])
    write_clip(path, frames(8), fps=10, frame_times=times)
    clip = load_clip(path, fps=1.0, max_frames=8)
    for got, target in zip(clip.frame_times.tolist(), frame_times_for(clip.duration, 1.0, 8)):
        assert np.abs(times - got).min() < 1e-3 and abs(got - target) == pytest.approx(np.abs(times - target).min(), abs=1e-3)


def test_bad_inputs_name_the_file_and_problem(tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="nope.mp4: no such file"):
        load_clip(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(MediaError, match="notes.mp4: not a readable media file"):
        load_clip(str(text))
    good = tmp_path / "good.mp4"
    write_clip(str(good), frames(50), fps=10, audio=tone(5.0))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediaError, match=r"cut.mp4: truncated or corrupt MP4/MOV file \("):
        load_clip(str(cut))  # PyAV writes the mp4 index last: the cut loses it
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.mp4: file is empty"):
        load_clip(str(empty))
    with pytest.raises(MediaError, match="is a directory, not a media file"):
        load_clip(str(tmp_path))
    (tmp_path / "notes.wav").write_text("not audio either\n" * 50)
    with pytest.raises(MediaError, match=r"notes.wav: not a readable media file \(Format not recognised"):
        load_audio(str(tmp_path / "notes.wav"))
    wav = tmp_path / "zero.wav"
    soundfile.write(str(wav), np.zeros((0, 1)), 16000)
    with pytest.raises(MediaError, match="zero.wav: audio stream has no samples"):
        load_audio(str(wav))
    write_clip(str(tmp_path / "silent.mp4"), frames(5), fps=10)
    with pytest.raises(MediaError, match="silent.mp4: no audio stream"):
        load_audio(str(tmp_path / "silent.mp4"))
