"""Sample from avnano: a caption for any video (or audio) file, or text from a released LLM checkpoint.

    python sample.py --ckpt out/sft --video clip.mp4            # AV captioner (mp4/mkv/webm/avi/wav/...)
    python sample.py --ckpt AVoCaDO --video clip.mp4 --dtype bfloat16 --device cuda   # a released Qwen2.5-Omni thinker
    python sample.py --llm path/to/SmolLM2-135M-Instruct --prompt "What is a knock?"   # text, streamed
"""
import argparse
import sys

import torch

from avnano.errors import run_main
from avnano.generate import compile_for_sampling, generate
from avnano.tokenizer import Tokenizer
from avnano.distributed import allow_tf32, autocast
from avnano.weights import load_decoder


def sampling_args(p):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples from softmax(logits/T)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set with this mass")
    g.add_argument("--num-beams", type=int, default=1, help=">1: beam search with the GNMT length penalty")
    g.add_argument("--length-penalty", type=float, default=0.6, help="GNMT alpha for beam search (AVCap: 0.6)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")


def sampling_kwargs(args, device):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty,
                generator=torch.Generator(device).manual_seed(args.seed))


class Streamer:
    """Prints the decoded text as it grows, holding back an incomplete UTF-8 character."""

    def __init__(self, tok, eos_ids):
        self.tok, self.eos, self.ids, self.shown = tok, set(eos_ids), [], ""

    def __call__(self, ids):
        token = int(ids[0])
        if token in self.eos or self.eos & set(self.ids):
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def caption_video(args):
    """An avnano AV checkpoint, or a Qwen2.5-Omni directory (AVoCaDO, Qwen2.5-Omni-3B/7B, ...: detected from its
    config.json; its weights read in --dtype, its chat template and default system prompt, or --system)."""
    from avnano.checkpoint import load_model
    from avnano.media import load_clip
    model = load_model(args.ckpt, device=args.device, dtype=DTYPES.get(args.dtype))
    cfg = model.cfg
    size = None if cfg.vit.image_size is None else (cfg.vit.image_size, cfg.vit.image_size)  # None: the thinker resizes
    clip = load_clip(args.video, fps=cfg.fps, max_frames=cfg.max_frames, size=size,
                     frame_indices=getattr(model, "frame_indices", None))  # a Qwen2.5-Omni thinker's own frame rule
    omni = getattr(model, "omni", False)
    if omni and args.system:
        cfg.system = args.system
    if not clip.has_audio and omni:  # as Qwen2.5-Omni's processor: a video without audio gets no audio tokens
        print(f"note: {args.video} has no audio; captioning from the frames alone", file=sys.stderr)
        clip.audio = clip.audio[:0]
    elif not clip.has_audio:
        print(f"note: {args.video} has no audio; captioning with silence", file=sys.stderr)
    if not clip.has_video:
        print(f"note: {args.video} has no video stream; captioning from audio alone", file=sys.stderr)
    kw = sampling_kwargs(args, args.device)
    with autocast(model.device):
        text = model.generate([clip.frames], [clip.frame_times], [clip.audio], prompt=args.prompt, **kw)[0]
    print(text if text.strip() else "(empty caption: the model ended at once; an undertrained checkpoint does this)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def chat(args):
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if args.device == "cuda" else torch.float32)
    model = load_decoder(args.llm, dtype=dtype, device=args.device)
    if args.compile:
        model = compile_for_sampling(model)
    tok = Tokenizer.from_file(args.llm)
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    ids, _ = tok.render(msgs) if tok.chat else (tok.encode(args.prompt), None)
    stream = Streamer(tok, tok.eos_ids)
    out = generate(model, torch.tensor([ids], device=args.device), eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                   on_token=stream if args.num_beams == 1 else None, **sampling_kwargs(args, args.device))
    if args.num_beams > 1:
        print(tok.decode([t for t in out[0].tolist() if t not in tok.eos_ids and t != tok.pad_id]), end="")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("AV captioning")
    g.add_argument("--ckpt", default=None, help="avnano AV checkpoint directory (e.g. out/sft), or a Qwen2.5-Omni "
                   "directory (AVoCaDO, Qwen2.5-Omni-3B/7B; --dtype and --system apply)")
    g.add_argument("--video", default=None, help="media file to caption (video-only and audio-only files work too)")
    g = p.add_argument_group("text from a released LLM")
    g.add_argument("--llm", default=None, help="directory with config.json, model.safetensors(.index.json), tokenizer.json")
    g.add_argument("--system", default=None, help="optional system message (default: none for --llm; a Qwen2.5-Omni "
                   "--ckpt uses its chat template's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="compile the decoder for sampling first (minutes; pays off "
                   "for long outputs: 1.5-2.1x transformers on CPU in the README, ~1.1x without)")
    p.add_argument("--prompt", default=None, help="user message (--llm, required) or captioning instruction (--ckpt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    sampling_args(p)
    args = p.parse_args()
    allow_tf32()
    if args.ckpt and args.video:
        caption_video(args)
    elif args.llm and args.prompt:
        chat(args)
    else:
        p.error("give --ckpt and --video (caption a file) or --llm and --prompt (text)")


if __name__ == "__main__":
    run_main(main)
