#!/usr/bin/env bash
# Flash figures (called by scripts/bench.sh, or alone: scripts/bench-flash.sh IMG OUT.json):
# `labforge flash` of IMG.zst (with its block map, read back and verified) against
# `bmaptool copy` of the same .zst and block map, and `dd` of the raw image, each onto a fresh
# file of the image's size in the same directory, page cache dropped before each run.
set -euo pipefail
img=$1
out=$2
LF=${LF:-target/release/labforge}
dir=$(dirname "$out")/flash-target
mkdir -p "$dir"
t="$dir/stick"
now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l | xargs printf '%.2f'; }
fresh() { rm -f "$t"; truncate -s "$(stat -c %s "$img")" "$t"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

fresh; t0=$(now); "$LF" flash "$img.zst" "$t" --json > "$dir/lf-zst.json"; t1=$(now); lf_zst=$(elapsed "$t0" "$t1")
fresh; t0=$(now); "$LF" flash "$img" "$t" --json > "$dir/lf-raw.json"; t1=$(now); lf_raw=$(elapsed "$t0" "$t1")
fresh; t0=$(now); bmaptool -q copy --bmap "${img%.img}.img.bmap" "$img.zst" "$t"; t1=$(now); bmap_zst=$(elapsed "$t0" "$t1")
fresh; t0=$(now); dd if="$img" of="$t" bs=4M conv=fsync,notrunc status=none; t1=$(now); dd_raw=$(elapsed "$t0" "$t1")
rm -rf "$dir"
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }
cat > "$out" <<JSON
{
  "flash_image_bytes": $(stat -c %s "$img"),
  "flash_labforge_zst_s": $lf_zst,
  "flash_labforge_raw_s": $lf_raw,
  "flash_bmaptool_zst_s": $bmap_zst,
  "flash_dd_raw_s": $dd_raw,
  "flash_labforge_vs_bmaptool": $(ratio "$bmap_zst" "$lf_zst"),
  "flash_labforge_vs_dd": $(ratio "$dd_raw" "$lf_raw"),
  "flash_note": "labforge times include reading everything back to verify it; bmaptool checks while writing and dd checks nothing"
}
JSON
cat "$out"
