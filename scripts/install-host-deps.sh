#!/usr/bin/env bash
# Installs the Debian packages labforge needs on the build host (run as root; `make demo` and
# `make test` call this). Package names come from the Makefile (HOST_PACKAGES), which a test
# keeps in step with `labforge doctor`.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install-host-deps: not root; skipping apt-get. Run 'labforge doctor' to see what is missing." >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
missing_now() {
    missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
}
# Twice: installing one package can make apt remove another that was there (a backported
# qemu-utils goes when Debian's qemu-system-x86 comes in), and the second round puts the
# distribution's version back.
updated=
for round in 1 2; do
    missing_now "$@"
    [ "${#missing[@]}" -gt 0 ] || break
    echo "install-host-deps: installing ${missing[*]}" >&2
    [ -n "$updated" ] || { apt-get update -qq; updated=1; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The tests start their own registry on loopback; the packaged service is not wanted.
    if printf '%s\n' "${missing[@]}" | grep -qx docker-registry; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
done
missing_now "$@"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-host-deps: still missing after installing: ${missing[*]}" >&2
    exit 1
fi

# Ubuntu's archive keyring (for images/lab.toml). Debian 12 does not carry it; Debian 13 does.
# Fetch it through apt from Debian's own archive, signed and hash-checked like any package.
if [ ! -f /usr/share/keyrings/ubuntu-archive-keyring.gpg ]; then
    if apt-cache policy ubuntu-keyring 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get install -y -qq ubuntu-keyring >/dev/null
    else
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" > "$tmp/sources.list"
        opts=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache")
        if apt-get -qq "${opts[@]}" update && (cd "$tmp" && apt-get -qq "${opts[@]}" download ubuntu-keyring); then
            dpkg -i "$tmp"/ubuntu-keyring_*.deb >/dev/null
        else
            echo "install-host-deps: could not fetch ubuntu-keyring; images/lab.toml will not plan on this host" >&2
        fi
    fi
fi
