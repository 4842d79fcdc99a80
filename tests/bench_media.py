"""Throughput of the AV front end on CPU: decode + log-mel + encoders for a 10 s 640x360 clip (not collected).

    python tests/bench_media.py [--repeats 3]

Writes one H.264/AAC clip, then times each stage (best of --repeats): PyAV decode at 2 fps (20 frames,
224x224) with 16 kHz mono audio; log-mel in native and exact (30 s) mode; a Whisper-base-sized encoder
(d 512, 6 layers, random weights) in both modes; a SigLIP-base-sized ViT (d 768, 12 layers, 224/16)
over the 20 frames. Prints seconds per stage and clips per second for the whole pipeline.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from avnano.audio import AudioConfig, AudioEncoder, log_mel  # noqa: E402
from avnano.media import load_clip, write_clip  # noqa: E402
from avnano.vit import ViT, ViTConfig, preprocess  # noqa: E402


def best(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per stage; the best is kept")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mp4")
        rng = np.random.default_rng(0)
        base = (rng.random((360, 640, 3)) * 255).astype(np.uint8)
        frames = np.stack([np.roll(base, 4 * i, axis=1) for i in range(250)])
        t = np.arange(160000) / 16000
        write_clip(path, frames, fps=25, audio=0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape),
                   sample_rate=16000)
        clip, t_decode = best(lambda: load_clip(path, fps=2.0, max_frames=32, size=(224, 224)), args.repeats)
    enc = AudioEncoder(AudioConfig(n_mels=80, dim=512, n_layers=6, n_heads=8, hidden_dim=2048)).eval()
    vcfg = ViTConfig(family="siglip", image_size=224, patch_size=16, dim=768, n_layers=12, n_heads=12, hidden_dim=3072)
    vit = ViT(vcfg).eval()
    with torch.no_grad():
        mel_native, t_mel_native = best(lambda: log_mel(clip.audio, 80, exact=False), args.repeats)
        mel_exact, t_mel_exact = best(lambda: log_mel(clip.audio, 80, exact=True), args.repeats)
        _, t_enc_native = best(lambda: enc(mel_native), args.repeats)
        _, t_enc_exact = best(lambda: enc(mel_exact), args.repeats)
        _, t_vit = best(lambda: vit.merge(vit.patches(preprocess(clip.frames, vcfg))), args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; clip 10 s 640x360 H.264/AAC, "
          f"{len(clip.frames)} frames at 2 fps")
    rows = [("decode (PyAV, frames + audio)", t_decode), ("log-mel native", t_mel_native), ("log-mel exact 30 s", t_mel_exact),
            ("whisper-base encoder native", t_enc_native), ("whisper-base encoder exact", t_enc_exact),
            ("siglip-base ViT, 20 frames", t_vit)]
    for name, t in rows:
        print(f"{name:32s} {t * 1000:8.1f} ms")
    native = t_decode + t_mel_native + t_enc_native
    exact = t_decode + t_mel_exact + t_enc_exact
    print(f"audio path (decode + mel + encoder): native {1 / native:.2f} clips/s, exact {1 / exact:.2f} clips/s "
          f"(native/exact speed ratio {exact / native:.2f})")
    print(f"with the ViT too: native {1 / (native + t_vit):.2f} clips/s, exact {1 / (exact + t_vit):.2f} clips/s")


if __name__ == "__main__":
    main()
