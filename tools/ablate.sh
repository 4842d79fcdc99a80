#!/usr/bin/env bash
# The toy-world ablations of the README: one SFT run per switch, same data, seed and budget.
# usage: bash tools/ablate.sh [STEPS]   (default 300; prints a markdown table from each run's eval.json)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
runs=(
  "av_per_frame|"
  "video_only|--modalities v"
  "audio_only|--modalities a"
  "concat|--interleave concat"
  "avti_0.25|--interleave avti --air 0.25"
  "avti_0.5|--interleave avti --air 0.5"
  "chunked_timepos|--interleave chunked --time-positions"
  "ot_0.1|--ot-weight 0.1"
  "causal_mask|--mask causal"
)
for r in "${runs[@]}"; do
  name=${r%%|*}; flags=${r#*|}
  [ -f "out/ablate/$name/eval.json" ] || python train_sft.py --steps "$steps" --out "out/ablate/$name" $flags > "out/ablate_$name.log" 2>&1
done
python - "$steps" <<'PY'
import json, sys
names = ["av_per_frame", "video_only", "audio_only", "concat", "avti_0.25", "avti_0.5", "chunked_timepos", "ot_0.1", "causal_mask"]
print(f"| run ({sys.argv[1]} steps) | held-out CE | event F1 | Miss | Hall | visual F1 | audio F1 | AV F1 | speech F1 | dialogue acc |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n in names:
    m = json.load(open(f"out/ablate/{n}/eval.json"))
    print(f"| {n} | {m['heldout_ce']:.3f} | {m['event_f1']:.3f} | {m['miss']:.3f} | {m['hall']:.3f} | {m['f1_visual']:.3f} | "
          f"{m['f1_audio']:.3f} | {m['f1_av']:.3f} | {m['f1_speech']:.3f} | {m['dialogue_acc']:.3f} |")
PY
