#!/usr/bin/env bash
# The toy-world ablations of the README: one SFT run per switch, same data, seed and budget.
# usage: bash tools/ablate.sh [STEPS [FLAGS...]]   (default 300; FLAGS go to every run; prints a markdown
# table from each run's eval.json; runs already in the output folder are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}; shift || true
extra=("$@"); dir="out/ablate_$steps"; [ $# -gt 0 ] && dir="${dir}_$(echo "$*" | tr -c 'a-zA-Z0-9.\n-' '_')"
mkdir -p "$dir"
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
  [ -f "$dir/$name/eval.json" ] || python train_sft.py --steps "$steps" --out "$dir/$name" $flags "${extra[@]}" > "$dir/$name.log" 2>&1
done
python - "$steps" "$dir" <<'PY'
import json, sys
names = ["av_per_frame", "video_only", "audio_only", "concat", "avti_0.25", "avti_0.5", "chunked_timepos", "ot_0.1", "causal_mask"]
print(f"| run ({sys.argv[1]} steps) | held-out CE | event F1 | Miss | Hall | visual F1 | audio F1 | AV F1 | speech F1 | dialogue acc |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n in names:
    m = json.load(open(f"{sys.argv[2]}/{n}/eval.json"))
    print(f"| {n} | {m['heldout_ce']:.3f} | {m['event_f1']:.3f} | {m['miss']:.3f} | {m['hall']:.3f} | {m['f1_visual']:.3f} | "
          f"{m['f1_audio']:.3f} | {m['f1_av']:.3f} | {m['f1_speech']:.3f} | {m['dialogue_acc']:.3f} |")
PY
