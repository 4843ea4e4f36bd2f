#!/usr/bin/env bash
# `make bench`: build-speed figures as JSON in target/bench/results.json.
#
#   cold_build_s            labforge build of images/demo.toml with an empty cache
#   mmdebstrap_alone_s      mmdebstrap of the same package set from the same mirror, same run:
#                           the floor any cold build of this package set stands on
#   cold_vs_mmdebstrap      ratio of the two (1.0 would mean labforge adds nothing)
#   warm_overlay_rebuild_s  rebuild after changing one overlay file (target: <= 20 s)
#   image_bytes, zst_bytes  sizes of demo.img and demo.img.zst
#   pull_*                  ~500 MB of incompressible layers (5 images x 2 x 50 MiB) from a real
#                           registry on 127.0.0.1: `labforge images pull` (cold cache) against
#                           `skopeo copy` of the same images from the same registry, one after
#                           the other and all at once; the warm re-pull's transferred bytes
#   flash_*                 `labforge flash` of demo.img.zst (and .img) onto a file against
#                           `bmaptool copy` of the same .zst and block map and `dd` of the raw
#                           image (scripts/bench-flash.sh); labforge also reads everything back
#   netboot_*               a master of qemu-tests/images/pxe.toml serving netboot to diskless VMs:
#                           power-on to "joined" for one node, and for three at once; then a PC
#                           with a blank disk installing itself over the network (power-on to
#                           "installed", and to "ready" from its disk)
#   k8s_*                   one PC of qemu-tests/images/kube.toml (real Kubernetes built from
#                           source): power-on to node Ready with the agent, and by hand on the
#                           same image (kubeadm init, CNI config, wait Ready); their ratio; power
#                           cut to Ready again (target/release/labforge-bench-kubernetes)
#   stack_*                 the same run, the image's stack (storage, monitoring): node Ready to
#                           the stack ready with the agent, against kubectl apply --server-side
#                           and rollout status by hand on the other PC; after the power cut, the
#                           stack ready again and the agent's no-op round (nothing applied)
#                           against kubectl re-applying every object; power-on to the stack
#                           ready both ways (stack_*_power_on_s) and their ratio
#   nb_*                    one PC of qemu-tests/images/notebooks.toml (real Kubernetes, the stack
#                           storage + projects + notebooks): a student's login to her server
#                           ready on a warm node, and a kernel's start to its first result,
#                           through the hub's NodePort; against the same pods by hand (kubectl,
#                           plain jupyter-server; the kernel pod's cell as `python3 -c`), and
#                           their ratios (target/release/labforge-bench-notebooks)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v jq >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq jq >/dev/null; }

B=target/bench
rm -rf "$B"
mkdir -p "$B/overlay/etc"
LF=target/release/labforge
MIRROR=${LABFORGE_MIRROR:-}
mirror_args=()
[ -n "$MIRROR" ] && mirror_args=(--mirror "$MIRROR")

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l | xargs printf '%.1f'; }
command -v bc >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq bc >/dev/null; }

echo "bench: cold build (empty cache)" >&2
t0=$(now)
"$LF" build images/demo.toml --out "$B/out" --cache-dir "$B/cache" "${mirror_args[@]}" >&2
t1=$(now)
cold=$(elapsed "$t0" "$t1")

echo "bench: mmdebstrap alone, same package set" >&2
cmd=$("$LF" plan images/demo.toml --json --cache-dir "$B/cache" "${mirror_args[@]}" | jq -r '.rootfs.command')
mkdir -p "$B/mm-tmp"
# The plan prints the exact argv labforge runs; only the output path is a placeholder.
read -r -a argv <<<"${cmd/<rootfs.tar>/$B/mm.tar}"
t0=$(now)
TMPDIR="$B/mm-tmp" "${argv[@]}" >/dev/null 2>&1
t1=$(now)
mm=$(elapsed "$t0" "$t1")
rm -f "$B/mm.tar"

echo "bench: warm rebuild after an overlay change" >&2
cat > "$B/spec.toml" <<SPEC
extends = "$(pwd)/images/demo.toml"
overlays = ["overlay"]
SPEC
echo one > "$B/overlay/etc/bench-note"
"$LF" build "$B/spec.toml" --out "$B/out-warm" --cache-dir "$B/cache" "${mirror_args[@]}" >&2
echo two > "$B/overlay/etc/bench-note"
t0=$(now)
"$LF" build "$B/spec.toml" --out "$B/out-warm" --cache-dir "$B/cache" "${mirror_args[@]}" >&2
t1=$(now)
warm=$(elapsed "$t0" "$t1")

echo "bench: pulling preloaded images (labforge vs skopeo copy)" >&2
coproc REG { target/release/labforge-bench-registry 5 2 50; }
read -r info <&"${REG[0]}"
addr=$(jq -r .addr <<<"$info")
pull_bytes=$(jq -r .bytes <<<"$info")
{
    echo "extends = \"$(pwd)/images/demo.toml\""
    echo "name = \"pullbench\""
    for r in $(jq -r '.refs[]' <<<"$info"); do printf '[[preload]]\nref = "%s"\n' "$r"; done
} > "$B/pull.toml"
pull() { "$LF" images pull "$B/pull.toml" --plain-http "$addr" --cache-dir "$B/pull-cache" --lock-file "$B/pull.lock.toml" --json; }
t0=$(now); pull > "$B/pull-cold.json"; t1=$(now)
pull_cold=$(elapsed "$t0" "$t1")
pull >"$B/pull-warm.json"
pull_warm_bytes=$(jq -r .transferred_bytes "$B/pull-warm.json")
t0=$(now)
i=0
for r in $(jq -r '.refs[]' <<<"$info"); do
    skopeo copy -q --src-tls-verify=false "docker://$r" "oci:$B/skopeo-seq:img$i" >/dev/null
    i=$((i + 1))
done
t1=$(now)
skopeo_seq=$(elapsed "$t0" "$t1")
t0=$(now)
i=0
pids=()
for r in $(jq -r '.refs[]' <<<"$info"); do
    skopeo copy -q --src-tls-verify=false "docker://$r" "oci:$B/skopeo-par$i:img" >/dev/null &
    pids+=($!)
    i=$((i + 1))
done
wait "${pids[@]}"
t1=$(now)
skopeo_par=$(elapsed "$t0" "$t1")
exec {REG[1]}>&-
mib=$(echo "$pull_bytes / 1048576" | bc -l)
tput() { echo "$mib / $1" | bc -l | xargs printf '%.1f'; }

img=$(stat -c %s "$B/out/demo.img")
zst=$(stat -c %s "$B/out/demo.img.zst")
stages=$(jq -c '[.stages[] | {(.stage): .seconds}] | add' "$B/out-warm/demo.manifest.json")
ratio=$(echo "$cold / $mm" | bc -l | xargs printf '%.2f')
cat > "$B/results.json" <<JSON
{
  "machine": {"cores": $(nproc), "mem_gib": $(free -g | awk '/Mem:/{print $2}')},
  "cold_build_s": $cold,
  "mmdebstrap_alone_s": $mm,
  "cold_vs_mmdebstrap": $ratio,
  "mkosi25_reference_s": {"low": 70, "high": 100, "note": "mkosi 25 is not installable on these hosts (Debian 12 ships mkosi 14, which needs mounts); figure from the issue"},
  "warm_overlay_rebuild_s": $warm,
  "warm_overlay_rebuild_target_s": 20,
  "warm_stages_s": $stages,
  "image_bytes": $img,
  "zst_bytes": $zst,
  "pull_bytes": $pull_bytes,
  "pull_labforge_cold_s": $pull_cold,
  "pull_labforge_mib_s": $(tput "$pull_cold"),
  "pull_skopeo_sequential_s": $skopeo_seq,
  "pull_skopeo_sequential_mib_s": $(tput "$skopeo_seq"),
  "pull_skopeo_parallel_s": $skopeo_par,
  "pull_skopeo_parallel_mib_s": $(tput "$skopeo_par"),
  "pull_labforge_vs_skopeo_parallel": $(echo "$skopeo_par / $pull_cold" | bc -l | xargs printf '%.2f'),
  "pull_warm_transferred_bytes": $pull_warm_bytes
}
JSON
echo "bench: flashing (labforge flash vs bmaptool copy vs dd)" >&2
scripts/bench-flash.sh "$B/out/demo.img" "$B/flash.json" >/dev/null
echo "bench: netboot (one node, then three at once, then an install over the network)" >&2
target/release/labforge-bench-netboot > "$B/netboot.json"
echo "bench: real Kubernetes on one PC, the agent against the same steps by hand" >&2
target/release/labforge-bench-kubernetes > "$B/kubernetes.json"
echo "bench: notebooks on one PC, the hub and the gateway against the same pods by hand" >&2
target/release/labforge-bench-notebooks > "$B/notebooks.json"
jq -s 'add' "$B/results.json" "$B/flash.json" "$B/netboot.json" "$B/kubernetes.json" "$B/notebooks.json" > "$B/results.tmp" && mv "$B/results.tmp" "$B/results.json"
rm -rf "$B/cache" "$B/out" "$B/out-warm" "$B/mm-tmp" "$B/pull-cache" "$B"/skopeo-*
cat "$B/results.json"
