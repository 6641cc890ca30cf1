#!/usr/bin/env bash
# Renders `troupe eval`'s report.html in headless Chromium and saves screenshots to look at:
# the tiny protocol on a fresh adapter and on its own references (two runs side by side).
#
#   bash scripts/check_report.sh [OUT_DIR]      (needs `chromium`: apt-get install chromium)
#
# Prints the screenshot paths. Fails when Chromium cannot render the page or the screenshot is
# implausibly small (a blank page is a few kilobytes).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/troupe-report-check}
troupe=${TROUPE:-target/release/troupe}
command -v chromium >/dev/null || { echo "chromium not found (apt-get install chromium)" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out"

"$troupe" adapter init --unet-config configs/tiny-sdxl/unet/config.json --rank 4 --clip-dim 24 \
  --ppr-dim-head 8 --ppr-depth 1 --out "$out/adapter.safetensors" >/dev/null
"$troupe" eval run --protocol configs/eval/tiny.toml --adapter "$out/adapter.safetensors" \
  --out "$out/fresh" 2>/dev/null
# The references as the "generated" images: face similarity and CLIP-I 100.
( cd "$out/fresh/images" && find . -name '*.png' ) | while read -r f; do
  subject=$(dirname "$f" | sed 's|^\./||; s|+.*||')
  mkdir -p "$out/refs-as-images/$(dirname "$f")"
  cp "$out/fresh/references/$subject.png" "$out/refs-as-images/$f"
done
"$troupe" eval score --protocol configs/eval/tiny.toml --images "$out/refs-as-images" \
  --out "$out/refs" 2>/dev/null
"$troupe" eval report "$out/fresh" "$out/refs" --labels "fresh adapter,references" \
  --out "$out/compare.html" >/dev/null

for page in fresh/report.html compare.html; do
  png="$out/${page//\//-}.png"
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,3000 \
    --screenshot="$png" "file://$(realpath "$out/$page")" >/dev/null 2>&1
  size=$(stat -c %s "$png")
  [ "$size" -gt 100000 ] || { echo "$png: only $size bytes: blank page?" >&2; exit 1; }
  echo "$png"
done
