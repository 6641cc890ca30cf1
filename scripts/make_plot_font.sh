#!/usr/bin/env bash
# Rebuilds crates/troupe-cli/assets/DejaVuSans-subset.ttf, the font `troupe plot` embeds:
# DejaVu Sans cut down to printable ASCII plus `·`, `×` and `−`. Needs fontTools
# (`pip install fonttools`) and a DejaVuSans.ttf (Debian: fonts-dejavu-core).
set -euo pipefail
src=${1:-/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf}
out=$(dirname "$0")/../crates/troupe-cli/assets/DejaVuSans-subset.ttf
pyftsubset "$src" --unicodes="U+0020-007E,U+00B7,U+00D7,U+2212" \
  --no-hinting --desubroutinize --output-file="$out"
ls -l "$out"
