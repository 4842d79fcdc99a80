"""Qwen2.5-Omni thinker sampling speed, avnano vs transformers, same weights, same inputs (not collected by pytest).

    python tests/bench_omni.py [--seconds 10] [--new-tokens 64] [--repeats 3] [--threads 2]

A ~100M-parameter thinker with the released model's shape of every part (Qwen2 decoder with 3-section TMRoPE, window
ViT with full-attention blocks and the 2x2 merger, chunked Whisper-style audio tower), random weights, saved by
transformers and loaded by avnano. Input: a `--seconds` clip of random 224 x 224 frames at 2 fps and noise audio,
through avnano's processor (the same pixel values and features go to transformers), audio in video. Greedy; both
generate exactly --new-tokens tokens (no end token). Prints prefill time (the prompt to the first token, towers
included), decode tokens/s (the rest), the ratios, and whether the generated ids agree (fp32: they must).
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avnano.generate import generate  # noqa: E402
from avnano.omni import load_omni  # noqa: E402
from tests.helpers import best_time  # noqa: E402
from tests.test_omni import IDS, hf_inputs, our_sequence, write_tokenizer  # noqa: E402


def config():
    from transformers import Qwen2_5OmniThinkerConfig
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12])),
        vision_config=dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=512,
                           fullatt_block_indexes=[3, 7]),
        audio_config=dict(d_model=384, encoder_layers=8, encoder_attention_heads=6, encoder_ffn_dim=1536, output_dim=512,
                          max_source_positions=1500, n_window=100), **IDS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    torch.manual_seed(0)
    ref = Qwen2_5OmniThinkerForConditionalGeneration(config()).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        write_tokenizer(d)
        with open(os.path.join(d, "video_preprocessor_config.json"), "w") as f:
            f.write('{"min_pixels": 50176, "max_pixels": 50176}')  # 224 x 224
        model = load_omni(d)
    print(f"thinker: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (transformers attention: "
          f"{ref.config._attn_implementation}); ", end="")
    n = int(round(2 * args.seconds))
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g)
    wav = torch.randn(int(args.seconds * 16000), generator=g) * 0.1
    video, mel = model.preprocess(frames, wav)
    block = model.encode([(video, mel)])[0]
    ids = our_sequence(model, block)
    print(f"prompt {len(ids)} tokens ({block.ids.count(model.ids['video'])} video, {block.ids.count(model.ids['audio'])} audio)")
    inputs = hf_inputs(model, block, ids, video, mel, torch.float32)

    @torch.no_grad()
    def ours(k):
        blocks = model.encode([(video, mel)])
        x = model.layout(blocks, [model.render()[0]], left_pad=True)
        return generate(model.decoder, inputs_embeds=x.embeds, attention_mask=x.valid, positions=x.positions,
                        max_new_tokens=k, eos_ids=(), pad_id=model.tok.pad_id)[0]

    @torch.no_grad()
    def theirs(k):
        return ref.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False)[0, len(ids):]

    runs = (("avnano", ours), ("transformers", theirs))
    for name, fn in runs:
        fn(2)  # warm-up
    t1, tk, outs = {k: float("inf") for k, _ in runs}, {k: float("inf") for k, _ in runs}, {}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load; the best of each is kept
        for name, fn in runs:
            t1[name] = min(t1[name], best_time(lambda: fn(1), 1)[0])
            t, outs[name] = best_time(lambda: fn(args.new_tokens), 1)
            tk[name] = min(tk[name], t)
    same = outs["avnano"].tolist() == outs["transformers"].tolist()
    rate = {k: (args.new_tokens - 1) / (tk[k] - t1[k]) for k in tk}
    for k in tk:
        print(f"{k:12s} prefill {t1[k]:.3f} s   decode {rate[k]:.1f} tokens/s")
    print(f"avnano / transformers: prefill {t1['transformers'] / t1['avnano']:.2f}x faster, decode "
          f"{rate['avnano'] / rate['transformers']:.2f}x; ids identical: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
