"""Sampling speed, avnano vs transformers `generate`, same weights, same process (not collected by pytest).

    python tests/bench_generate.py [--layers 30] [--repeats 3] [--compile [--freeze --max-autotune --cpp-wrapper]]

A SmolLM2-135M-shaped LlamaForCausalLM with random weights: greedy, 32-token prompt, 64 new tokens,
fp32 and bf16, batch 1 and 8. Prints tokens/s for both and the ratio (best of --repeats runs each).
--compile wraps avnano's decoder in torch.compile (the static KV cache gives the decode step one
shape, so it compiles once per batch size and dtype; the warm-up run pays for it, and the line
reports that time apart); --freeze, --max-autotune and --cpp-wrapper are the Inductor switches of
avnano.generate.compile_for_sampling (all three on is what `sample.py --compile` does).
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avnano.generate import compile_for_sampling, generate
from avnano.weights import load_decoder


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is kept")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to time")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--compile", action="store_true", help="torch.compile avnano's decoder (warm-up time reported apart)")
    p.add_argument("--freeze", action="store_true", help="with --compile: Inductor freezing (weights become constants, "
                   "prepacked for the CPU GEMM libraries)")
    p.add_argument("--max-autotune", action="store_true", help="with --compile: time Inductor's own C++ GEMM kernels "
                   "against the libraries' and keep the fastest (minutes of compiling)")
    p.add_argument("--cpp-wrapper", action="store_true", help="with --compile: call the kernels from C++, not Python")
    args = p.parse_args()
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                                   num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0, max_position_embeddings=2048)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours_fp32 = load_decoder(d)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, layers {args.layers}")
    print(f"{'dtype':>9} {'batch':>5} {'avnano tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours = ours_fp32.to(device=args.device, dtype=dtype)
        if args.compile:
            ours = compile_for_sampling(ours, args.freeze, args.max_autotune, args.cpp_wrapper)
        ref = hf.to(device=args.device, dtype=dtype)
        for B in map(int, args.batches.split(",")):
            ids = torch.randint(3, 49152, (B, 32), generator=torch.Generator().manual_seed(B)).to(args.device)
            n = 64

            def run_ours():
                out = generate(ours, ids, max_new_tokens=n)
                assert out.shape[1] == n

            def run_ref():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
                assert out.shape[1] == 32 + n

            with torch.no_grad():
                warm = best_time(run_ours, 1)
                run_ref()  # warm-up
                t_ours, t_ref = best_time(run_ours, args.repeats), best_time(run_ref, args.repeats)
            print(f"{dtype_name:>9} {B:>5} {B * n / t_ours:>13.1f} {B * n / t_ref:>19.1f} {t_ref / t_ours:>6.2f}"
                  + (f"   (first run, compiling: {warm:.1f} s)" if args.compile else ""), flush=True)


if __name__ == "__main__":
    main()
