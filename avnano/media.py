"""Media I/O: frames at phi fps (at most m) and 16 kHz mono audio from real files, with PyAV and soundfile.

Frame sampling follows video-SALMONN 2 (Sec. 3.1): a clip of T seconds gives n = round(phi*T) frames
(at least 1); if n > m the rate is lowered so that n = m. The n target times are spread uniformly,
t_i = (i + 1/2) T / n, and each takes the decoded frame whose presentation time (from the stream's
time base, never the frame index, so variable frame rates are right) is nearest. Frames are scaled by
swscale while decoding, so a huge resolution never lands in memory at full size.
Audio is decoded by PyAV from any container (soundfile for .wav/.flac/.ogg), mixed down to mono and
resampled to 16 kHz. Documented fallbacks, all reported on the returned Clip:
- a video with no audio stream (or one with no samples) -> silence of the video's duration
  (clip.has_audio = False);
- an audio-only file -> no frames (clip.has_video = False).
- a truncated file whose index survives (mkv/webm, an mp4 with its index first) decodes partially:
  the frames and audio before the cut are kept, and the duration is what the video stream still holds.
  An mp4 with its index last (the usual layout) loses the index when cut, and cannot be opened.
Everything else that is wrong (missing file, not media, an mp4 cut before its index, an empty stream)
raises MediaError, an errors.InputError, naming the file and the problem: scripts print it in one line.
"""
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import soundfile
import torch

from .errors import InputError

SAMPLE_RATE = 16000
SOUNDFILE_SUFFIXES = (".wav", ".flac", ".ogg")


class MediaError(InputError):
    """A media file that cannot be read: missing, empty, not media, truncated, no usable stream."""


# the first bytes of the containers that truncation typically breaks (offset, signature, name)
SIGNATURES = ((4, b"ftyp", "MP4/MOV"), (0, b"\x1aE\xdf\xa3", "Matroska/WebM"), (0, b"RIFF", "RIFF (AVI/WAV)"),
              (0, b"OggS", "Ogg"), (0, b"fLaC", "FLAC"), (0, b"ID3", "MP3"))


@dataclass
class Clip:
    frames: torch.Tensor       # uint8 (n, H, W, 3); n = 0 for audio-only files
    frame_times: torch.Tensor  # float (n,) seconds from the start
    audio: torch.Tensor        # float32 (samples,) mono 16 kHz
    duration: float            # seconds
    has_video: bool
    has_audio: bool


def frame_times_for(duration, fps, max_frames):
    """The video-SALMONN 2 rule: n = round(fps * T) (>= 1), capped at max_frames, spread uniformly."""
    n = min(max(1, round(fps * duration)), max_frames)
    return [(i + 0.5) * duration / n for i in range(n)]


def _check(path):
    if not os.path.exists(path):
        raise MediaError(path, "no such file")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty")


def _unreadable(path, reason):
    """Name what the file looks like: a known container that fails to open is truncated or corrupt."""
    with open(path, "rb") as f:
        head = f.read(12)
    for at, magic, name in SIGNATURES:
        if head[at:at + len(magic)] == magic:
            return MediaError(path, f"truncated or corrupt {name} file ({reason})")
    return MediaError(path, f"not a readable media file ({reason})")


def _open(path):
    _check(path)
    try:
        return av.open(path)
    except av.error.FFmpegError as e:
        raise _unreadable(path, e.strerror) from None


def _stream_duration(container, stream):
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def _decode_frames(path, container, stream, fps, max_frames, size, frame_indices=None):
    """Two passes: demux packet timestamps (cheap) to fix the duration and pick the frames nearest the
    targets (or by frame_indices, see load_clip), then decode and convert only those. Returns (frames, times, duration)."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    times = []
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size > 0:
                times.append(float(packet.pts * tb) - start)
    except av.error.FFmpegError:
        pass  # a truncated file: use the packets before the damage
    if not times:
        raise MediaError(path, "video stream has no frames")
    times = np.unique(np.array(times))
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / float(stream.average_rate or 25)
    duration = float(times[-1] + step)
    if frame_indices is None:
        picks = [int(np.abs(times - t).argmin()) for t in frame_times_for(duration, fps, max_frames)]
    else:  # frame k = the k-th frame in presentation order, as decord / torchvision number them; their average rate
        try:
            picks = [int(k) for k in frame_indices(len(times), float(stream.average_rate or len(times) / duration))]
        except ValueError as e:
            raise MediaError(path, str(e)) from None
    wanted = {round(float(times[i]), 6) for i in picks}
    got = {}
    container.seek(0, stream=stream)
    try:
        for frame in container.decode(stream):
            t = round(float(frame.pts * tb) - start, 6) if frame.pts is not None else None
            if t in wanted and t not in got:
                w, h = size if size else (frame.width, frame.height)
                got[t] = frame.to_ndarray(format="rgb24", width=w, height=h)  # swscale does the resize
    except av.error.FFmpegError as e:
        if not got:
            raise MediaError(path, f"video stream could not be decoded ({e.strerror})") from None
    if not got:
        raise MediaError(path, "video stream has no decodable frames")
    kept = sorted(got)  # frames that failed to decode (truncation) are dropped, the rest keep their times
    chosen = [min(kept, key=lambda k: abs(k - float(times[i]))) for i in picks]
    frames = np.stack([got[k] for k in chosen])
    return torch.from_numpy(frames), torch.tensor(chosen, dtype=torch.float32, device="cpu"), duration


def _resample(chunks):
    """PyAV AudioResampler: any layout / rate -> mono float32 at 16 kHz (FFmpeg's downmix matrix)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = []
    for frame in chunks:
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _decode_audio_av(path, container, stream):
    def frames():
        n = 0
        try:
            for n, frame in enumerate(container.decode(stream), 1):
                yield frame
        except av.error.FFmpegError as e:
            if n == 0:
                raise MediaError(path, f"audio stream could not be decoded ({e.strerror})") from None
            # a truncated file: keep the audio before the damage
    audio = _resample(frames())
    seconds = _stream_duration(container, stream)
    if seconds:  # codecs like AAC pad the last frame: cut back to the stream's stated duration
        audio = audio[:int(round(seconds * SAMPLE_RATE))]
    return audio


def load_audio(path):
    """Any audio (or video) file -> float32 mono 16 kHz tensor."""
    if path.lower().endswith(SOUNDFILE_SUFFIXES):
        _check(path)
        try:
            data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        except RuntimeError as e:  # soundfile's errors (LibsndfileError names the problem in error_string)
            raise _unreadable(path, getattr(e, "error_string", str(e))) from None
        if data.shape[0] == 0:
            raise MediaError(path, "audio stream has no samples")
        mono = data.mean(axis=1)
        if rate == SAMPLE_RATE:
            return torch.from_numpy(np.ascontiguousarray(mono))
        frame = av.AudioFrame.from_ndarray(mono[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        return torch.from_numpy(_resample([frame]))
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        audio = _decode_audio_av(path, container, container.streams.audio[0])
    if audio.size == 0:
        raise MediaError(path, "audio stream has no samples")
    return torch.from_numpy(audio)


def load_clip(path, fps=2.0, max_frames=32, size=(224, 224), frame_indices=None):
    """A media file -> Clip. size=(W, H) of the returned frames (None keeps the source size). frame_indices replaces
    the rule above (fps, max_frames unused): a function (total_frames, video_fps) -> indices of the decoded frames
    to keep (e.g. Qwen2.5-Omni's, omni.omni_frames); a ValueError it raises becomes a MediaError."""
    no_frames = torch.zeros(0, *((size[1], size[0]) if size else (1, 1)), 3, dtype=torch.uint8, device="cpu"), torch.zeros(0, device="cpu")
    if path.lower().endswith(SOUNDFILE_SUFFIXES):
        audio = load_audio(path)
        return Clip(*no_frames, audio, len(audio) / SAMPLE_RATE, has_video=False, has_audio=True)
    with _open(path) as container:
        has_video, has_audio = bool(container.streams.video), bool(container.streams.audio)
        if not (has_video or has_audio):
            raise MediaError(path, "no video or audio stream")
        frames, times, duration = (_decode_frames(path, container, container.streams.video[0], fps, max_frames, size,
                                                  frame_indices)
                                   if has_video else (*no_frames, None))
    audio = None
    if has_audio:
        with _open(path) as container:
            audio = torch.from_numpy(_decode_audio_av(path, container, container.streams.audio[0]))
        has_audio = audio.numel() > 0
    if duration is None:  # audio-only container
        if not has_audio:
            raise MediaError(path, "audio stream has no samples")
        duration = len(audio) / SAMPLE_RATE
    if not has_audio:  # documented fallback: silence as long as the video
        audio = torch.zeros(int(round(duration * SAMPLE_RATE)), device="cpu")
    return Clip(frames, times, audio, duration, has_video=has_video, has_audio=has_audio)


def write_clip(path, frames=None, fps=25, audio=None, sample_rate=SAMPLE_RATE, vcodec="libx264", acodec="aac",
               frame_times=None, threads=1):
    """Write uint8 frames (n, H, W, 3) and/or float audio (samples,) or (channels, samples) to one file.
    frame_times (seconds, optional) gives each frame its own timestamp (variable frame rate). The bytes are a
    function of the input alone: threads = 1 by default (x264's multi-threaded output depends on the thread
    count, so on the machine), and each frame is converted to the encoder's pixel format on its own."""
    with av.open(path, "w") as out:
        vs = as_ = None
        if frames is not None:
            vs = out.add_stream(vcodec, rate=fps)
            vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            vs.codec_context.thread_count = threads
            if frame_times is not None:
                vs.time_base = Fraction(1, 1000)
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
            layout = {1: "mono", 2: "stereo", 6: "5.1"}[audio.shape[0]]
            as_ = out.add_stream(acodec, rate=sample_rate, layout=layout)
            as_.codec_context.thread_count = threads
        if vs is not None:
            for i, img in enumerate(frames):
                # converted here, with a fresh converter per frame: the stream's own one keeps state from clip to
                # clip in a process, so a clip's bytes depended on which clips that worker had written before
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(format=vs.pix_fmt)
                if frame_times is not None:
                    frame.time_base = Fraction(1, 1000)
                    frame.pts = int(round(frame_times[i] * 1000))
                for packet in vs.encode(frame):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
        if as_ is not None:
            chunk = 1024
            for i in range(0, audio.shape[1], chunk):
                piece = np.ascontiguousarray(audio[:, i:i + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=as_.layout.name)
                frame.sample_rate, frame.pts = sample_rate, i
                for packet in as_.encode(frame):
                    out.mux(packet)
            for packet in as_.encode():
                out.mux(packet)
