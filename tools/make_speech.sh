#!/usr/bin/env bash
# Make the toy world's spoken-word assets once (committed; neither the product nor its tests run this).
# Needs Debian's espeak-ng and sox: apt-get install -y espeak-ng sox
# Voice A: en-us male, pitch 40; voice B: en-gb with the f3 (female) variant, pitch 70.
# Each word: 16 kHz mono 16-bit FLAC, leading/trailing silence trimmed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=avnano/assets/speech
words=$(python -c "from avnano.toyworld import WORDS; print(' '.join(WORDS))")
mkdir -p "$out/A" "$out/B"
tmp=$(mktemp -d)
for w in $words; do
  espeak-ng -v en-us -p 40 -s 150 -w "$tmp/a.wav" "$w"
  espeak-ng -v en-gb+f3 -p 70 -s 150 -w "$tmp/b.wav" "$w"
  sox "$tmp/a.wav" -r 16000 -c 1 -b 16 "$out/A/$w.flac" silence 1 0.01 1% reverse silence 1 0.01 1% reverse
  sox "$tmp/b.wav" -r 16000 -c 1 -b 16 "$out/B/$w.flac" silence 1 0.01 1% reverse silence 1 0.01 1% reverse
done
rm -r "$tmp"
du -sh "$out"
