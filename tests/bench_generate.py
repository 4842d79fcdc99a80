"""Sampling speed and correctness, avnano vs transformers `generate`, same weights, same process (not collected by pytest).

    python tests/bench_generate.py [--layers 30] [--repeats 3] [--compile [--freeze --max-autotune --cpp-wrapper]]

A SmolLM2-135M-shaped LlamaForCausalLM with random weights: greedy, 32-token prompt, 64 new tokens,
fp32 and bf16, batch 1 and 8. Prints tokens/s for both and the ratio (best of --repeats runs each), and checks
what it times: the share of avnano's generated ids equal to transformers' (position by position) and the rows
that agree entirely. fp32 must agree on every token (the exit status is 1 otherwise); bf16 rounds differently
in the two implementations, so greedy paths may part where two logits are close: its share is reported.
--compile wraps avnano's decoder with avnano.generate.compile_for_sampling (the static KV cache gives the decode
step one shape, so it compiles once per batch size and dtype; the warm-up run pays for it, and the line reports
that time apart, with the state of Inductor's on-disk cache: "cold" when --cache-dir held nothing before the run).
Run it twice to see the second run's compile time: the FX graph, autotuning and C++ kernel caches are reused
(with --freeze on a CPU the FX graph cache needs --no-prepack: oneDNN-prepacked weights cannot be pickled).
--freeze, --max-autotune and --cpp-wrapper are the Inductor switches of compile_for_sampling (all three on is
what `sample.py --compile` does).
"""
import argparse
import os
import sys
import tempfile

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avnano.generate import CACHE_DIR, compile_for_sampling, generate  # noqa: E402
from avnano.weights import load_decoder  # noqa: E402
from tests.helpers import best_time  # noqa: E402


def files_under(path):
    return sum(len(f) for _, _, f in os.walk(path)) if os.path.isdir(path) else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is kept")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to time")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--compile", action="store_true", help="torch.compile avnano's decoder (warm-up time reported apart)")
    p.add_argument("--freeze", action="store_true", help="with --compile: Inductor freezing (weights become constants, "
                   "prepacked for the CPU GEMM libraries)")
    p.add_argument("--max-autotune", action="store_true", help="with --compile: time Inductor's own C++ GEMM kernels "
                   "against the libraries' and keep the fastest (minutes of compiling)")
    p.add_argument("--cpp-wrapper", action="store_true", help="with --compile: call the kernels from C++, not Python")
    p.add_argument("--no-prepack", action="store_true", help="with --freeze: keep plain weights (no oneDNN prepacking), "
                   "so Inductor's FX graph cache can store the compiled graphs")
    p.add_argument("--cache-dir", default=os.environ.get("TORCHINDUCTOR_CACHE_DIR", CACHE_DIR),
                   help="Inductor's on-disk cache (compiled graphs, autotuning, C++ kernels) kept across runs")
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
    cache_state = ("warm" if files_under(args.cache_dir) else "cold") if args.compile else ""
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, layers {args.layers}"
          + (f", Inductor cache {args.cache_dir} ({cache_state}: {files_under(args.cache_dir)} files)" if args.compile else ""))
    print(f"{'dtype':>9} {'batch':>5} {'avnano tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} {'same ids':>9} "
          f"{'same rows':>9}")
    n, failed = args.new_tokens, []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours = ours_fp32.to(device=args.device, dtype=dtype)
        if args.compile:
            ours = compile_for_sampling(ours, args.freeze, args.max_autotune, args.cpp_wrapper, cache_dir=args.cache_dir,
                                        prepack=not args.no_prepack)
        ref = hf.to(device=args.device, dtype=dtype)
        for B in map(int, args.batches.split(",")):
            ids = torch.randint(3, 49152, (B, 32), generator=torch.Generator().manual_seed(B)).to(args.device)

            def run_ours():
                out = generate(ours, ids, max_new_tokens=n)  # no EOS given: every row runs n tokens
                assert out.shape == (B, n)
                return out

            def run_ref():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
                assert out.shape[1] == 32 + n
                return out[:, 32:]

            with torch.no_grad():
                warm, _ = best_time(run_ours, 1)
                run_ref()  # warm-up
                (t_ours, got), (t_ref, want) = best_time(run_ours, args.repeats), best_time(run_ref, args.repeats)
            same = (got.cpu() == want.cpu())
            share, rows = same.float().mean().item(), int(same.all(1).sum())
            if dtype == torch.float32 and share < 1.0:
                failed.append(f"{dtype_name} batch {B}: {share:.1%} of the ids equal transformers'")
            print(f"{dtype_name:>9} {B:>5} {B * n / t_ours:>13.1f} {B * n / t_ref:>19.1f} {t_ref / t_ours:>6.2f} "
                  f"{share:>9.1%} {rows:>5}/{B:<3}"
                  + (f"   (first run, compiling: {warm:.1f} s, cache {cache_state})" if args.compile else ""), flush=True)
    if failed:
        raise SystemExit("fp32 ids differ from transformers': " + "; ".join(failed))


if __name__ == "__main__":
    main()
