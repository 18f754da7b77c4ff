#!/usr/bin/env bash
# scripts/test.sh — kiln's whole test suite, exactly as CI runs it.
#
# Installs what the tests need when it is missing (Debian packages, the Rust
# components, cargo-nextest), then runs formatting, clippy and every test
# (unit, integration, conformance, doc tests). Run it as root: the executor
# tests create namespaces and mounts.
#
# Environment:
#   KILN_CONFORMANCE  where the public conformance corpora are
#                     (default: ../shared/conformance next to the checkout)
#   CI=true           missing prerequisites fail tests instead of skipping
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

# Debian packages the tests use: busybox-static builds the base rootfs;
# skopeo, umoci and podman (with runc) check the images kiln writes;
# docker-registry, htpasswd (apache2-utils) and openssl serve the registry tests;
# git makes and clones the repositories of the ADD/context git tests;
# gcc and libc6-dev build the static syscall probe of the seccomp tests;
# mmdebstrap makes the Debian base of the real-distribution tests (scripts/debian-base.sh),
# whose results buildah builds too, for a file-by-file comparison.
# qemu-user-static runs the arm64/armhf busybox images of the multi-platform
# tests (scripts/foreign-busybox.sh makes them from Debian's busybox-static
# for those architectures; `kiln system binfmt` registers the interpreters).
# curl reads the registry's manifests in the docker_compat cases.
APT_PKGS=(busybox-static uidmap skopeo umoci podman buildah runc docker-registry apache2-utils openssl git gcc libc6-dev mmdebstrap qemu-user-static curl)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    log "missing Debian packages: ${missing[*]} (run as root to install them)"
  fi
fi

for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "adding rustup component $comp"
    rustup component add "$comp"
  fi
done
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

if [ -z "${KILN_CONFORMANCE:-}" ] && [ -d ../shared/conformance ]; then
  KILN_CONFORMANCE="$(cd ../shared/conformance && pwd)"
  export KILN_CONFORMANCE
fi

# A clean checkout gains nothing from incremental caches, and they are the
# biggest part of a debug target directory.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
log "disk free before the build: $(df -h --output=avail . | tail -1 | tr -d ' ')"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# Foreign-platform RUN steps need QEMU registered with binfmt_misc (flag F).
# Debian's qemu-user-static registers it only where systemd-binfmt or
# binfmt-support runs, which a fresh CI machine or container may lack.
if [ "$(id -u)" = 0 ]; then
  log "kiln system binfmt"
  cargo run -q -p kiln -- system binfmt >&2 || log "kiln system binfmt failed: foreign-platform tests will say why"
fi
log "cargo nextest run"
cargo nextest run --workspace --no-fail-fast
log "doc tests"
cargo test --workspace --doc
log "target directory: $(du -sh target 2>/dev/null | cut -f1), disk free: $(df -h --output=avail . | tail -1 | tr -d ' ')"
