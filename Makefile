# labforge — see README.md. `make demo` and `make test` are the whole quick start.

# Debian packages the build host needs; a test checks this list against `labforge doctor`.
HOST_PACKAGES := mmdebstrap debian-archive-keyring e2fsprogs dosfstools mtools fdisk binutils systemd-boot-efi systemd passwd tar gpg curl qemu-utils squashfs-tools qemu-system-x86 ovmf bmap-tools zstd ca-certificates openssl dnsmasq-base iproute2
# What the tests need beyond that: a real OCI registry, skopeo (the peer in `make bench`),
# and a C toolchain with static glibc for the tiny test images.
# iptables goes into the kube-proxy test image; ssh drives the real-Kubernetes scenarios.
# busybox-static's /bin/busybox is the local-path provisioner's helper image (busybox:1.35.0).
# The notebook test images are Debian's Python 3.11 (with venv and its pip wheel) and Node.js.
TEST_PACKAGES := docker-registry skopeo gcc libc6-dev iptables openssh-client busybox-static ca-certificates python3-venv nodejs

CARGO    ?= cargo
OUT      ?= out
LABFORGE := target/release/labforge

.PHONY: all host-deps build lint demo test test-deps test-kubernetes test-notebooks bench e2e-kubernetes kubernetes-release clean

all: build

host-deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install a Rust toolchain (https://rustup.rs) first" >&2; exit 1; }
	@scripts/install-host-deps.sh $(HOST_PACKAGES)

build:
	$(CARGO) build --release --workspace

# Build images/demo.toml, boot it in QEMU and show what the agent reports.
demo: host-deps build
	$(LABFORGE) doctor
	$(LABFORGE) build images/demo.toml --out $(OUT)
	target/release/labforge-vm $(OUT)/demo.img

# The whole suite (what .ci/run calls): unit, property, CLI and QEMU scenario tests. The loopback
# API server's Go fixture starts building in the background first (lowest CPU priority), beside
# the Rust compile; the test that needs it waits for it.
test: host-deps test-deps build lint
	$(CARGO) test --release --workspace --no-fail-fast

test-deps: host-deps
	@scripts/install-host-deps.sh $(TEST_PACKAGES)
	@scripts/fixture-early.sh

# The real-Kubernetes room (qemu-tests/tests/real_cluster.rs): upstream Kubernetes built from
# its Go modules (once per machine, cached by its inputs), then two PCs: an interrupted init, a
# single-node cluster, the stack (storage, monitoring, a failing site component, the portal),
# a worker joining, pod-to-pod traffic across nodes, a whole-room power cut. Not part of `make test`: with it the suite does not fit CI's time limit on two emulated
# cores (see README, "CI time").
test-kubernetes: host-deps build
	@scripts/install-host-deps.sh $(TEST_PACKAGES)
	$(CARGO) test --release -p qemu-tests --test real_cluster -- --ignored --nocapture

# The notebooks in a real cluster (qemu-tests/tests/notebooks_room.rs): one PC with the
# notebooks stack and a roster; a student's login, server, environment and kernel within the
# project's limits, homes that survive a server restart and a power cut. Not part of `make test`
# either (see README, "CI time").
test-notebooks: host-deps build
	@scripts/install-host-deps.sh $(TEST_PACKAGES)
	$(CARGO) test --release -p qemu-tests --test notebooks_room -- --ignored --nocapture

# Formatting and lints are part of the suite.
lint:
	@$(CARGO) fmt --version >/dev/null 2>&1 && $(CARGO) clippy --version >/dev/null 2>&1 || { echo "rustfmt and clippy are needed: rustup component add rustfmt clippy" >&2; exit 1; }
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Speed figures as JSON (target/bench/results.json).
bench: host-deps build
	@scripts/install-host-deps.sh $(TEST_PACKAGES)
	scripts/bench.sh

# The cluster scenarios against images/lab.toml with the real kubeadm (Ubuntu 24.04 and
# pkgs.k8s.io must be reachable; 4 VMs with 2 CPUs / 2.5 GB each).
e2e-kubernetes: host-deps build
	LABFORGE_REAL_KUBEADM=1 $(CARGO) test --release -p qemu-tests --test cluster -- --test-threads=1

# Upstream Kubernetes built from its Go modules, as a mirror of release files plus an OCI
# layout of the control-plane images (see README, "Kubernetes from release binaries").
kubernetes-release: build
	target/release/labforge-kubernetes-release out/kubernetes-release $(if $(IMAGE_REPOSITORY),--image-repository $(IMAGE_REPOSITORY))

clean:
	rm -rf $(OUT) target/qemu-tests
