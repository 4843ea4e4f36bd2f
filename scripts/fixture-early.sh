#!/usr/bin/env bash
# Starts building the loopback API server's fixture (upstream etcd, kube-apiserver,
# kube-controller-manager and kubectl from their Go modules; minutes on a cold machine) in the
# background, at the lowest CPU priority, and returns at once. `make test` calls it before the
# Rust compile: the module downloads and what the compile leaves of the two cores go to it, and
# `apiserver.rs`, which needs it, finds it built or waits for the build already running
# (build.sh serialises on its lock and is a no-op once its stamp is current).
#
# The directory is the one `qemu_tests::kubernetes::control_plane_fixture` uses:
# <cache>/fixtures/kubernetes-<version>-control-plane, <cache> being $LABFORGE_CACHE_DIR, else
# $XDG_CACHE_HOME/labforge, else $HOME/.cache/labforge, else /var/cache/labforge.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/qemu-tests/fixtures/kubernetes/build.sh"
version="$(sed -n 's/^K8S_VERSION=//p' "$build")"
if [ -n "${LABFORGE_CACHE_DIR:-}" ]; then
  cache="$LABFORGE_CACHE_DIR"
else
  base="${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}"
  cache="${base:-/var/cache}/labforge"
fi
out="$cache/fixtures/kubernetes-$version-control-plane"
log="$root/target/qemu-tests/control-plane-fixture-early.log"
mkdir -p "$(dirname "$log")"
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
  # The test says so itself when it needs the fixture.
  echo "fixture-early: go is not installed; the API server's fixture is built when a test needs it" >&2
  exit 0
fi
FIXTURE_NICE=19 nohup "$build" "$out" control-plane >"$log" 2>&1 </dev/null &
echo "fixture-early: building the API server's fixture in the background into $out (log: $log)"
