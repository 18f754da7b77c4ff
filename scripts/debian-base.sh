#!/usr/bin/env bash
# scripts/debian-base.sh — the Debian bookworm base of the real-distribution
# tests (cli/tests/distro_e2e.rs), as a root filesystem tar for
# `kiln import`.
#
# Usage: scripts/debian-base.sh CACHE_DIR
#   Prints the path of CACHE_DIR/debian-bookworm-<key>.tar, making it first
#   when it is missing. <key> hashes this script and the host's CA bundle,
#   so an edit to either makes a new tar (older ones are removed). Several
#   callers at once are fine: one builds under a lock, the others wait.
#
# The tar is `mmdebstrap --variant=minbase` of bookworm main from
# deb.debian.org with the apt/dpkg "minimize" configuration the official
# debian image ships (our own files, same names and effect):
#   /etc/apt/apt.conf.d/docker-clean            no .deb or pkgcache kept
#   /etc/apt/apt.conf.d/docker-autoremove-suggests
#   /etc/apt/apt.conf.d/docker-no-languages     no Translation indexes
#   /etc/apt/apt.conf.d/docker-gzip-indexes     indexes kept compressed
#   /etc/dpkg/dpkg.cfg.d/docker-apt-speedup     dpkg without fsync
# and, as that image, an empty /dev (mmdebstrap's device nodes taken out),
# plus the host's CA bundle as /etc/ssl/certs/ca-certificates.crt and in
# /usr/local/share/ca-certificates (so that it survives
# update-ca-certificates): package managers then work behind a
# TLS-inspecting proxy or with a private CA, as they do on the host.
#
# Needs root and mmdebstrap (apt-get install mmdebstrap).
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

die() { printf '[debian-base] ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[debian-base] %s\n' "$*" >&2; }

[ $# -eq 1 ] || die "usage: $0 CACHE_DIR"
[ "$(id -u)" = 0 ] || die "run as root"
command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
CA=/etc/ssl/certs/ca-certificates.crt
[ -s "$CA" ] || die "no CA bundle at $CA (apt-get install ca-certificates)"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

mkdir -p "$1"
cache="$(cd "$1" && pwd -P)"
key="$(cat "$0" "$CA" | sha256sum | cut -c1-16)"
out="$cache/debian-bookworm-$key.tar"

exec 9>"$cache/debian-base.lock"
flock 9
if [ -s "$out" ]; then
  printf '%s\n' "$out"
  exit 0
fi

find "$cache" -maxdepth 1 -name 'debian-bookworm-*.tar*' -delete
tmp="$out.tmp.$$"
hook="$cache/customize.$$.sh"
trap 'rm -f "$tmp" "$hook"' EXIT

# The configuration files, written into the tree before the tar is made.
customize='#!/bin/sh
set -e
r="$1"
mkdir -p "$r/etc/apt/apt.conf.d" "$r/etc/dpkg/dpkg.cfg.d" "$r/usr/local/share/ca-certificates" "$r/etc/ssl/certs"
cat > "$r/etc/apt/apt.conf.d/docker-clean" <<EOF
// Keep no downloaded packages and no package cache in the image.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat > "$r/etc/apt/apt.conf.d/docker-autoremove-suggests" <<EOF
// Suggested packages are not reasons to keep a package installed.
Apt::AutoRemove::SuggestsImportant "false";
EOF
cat > "$r/etc/apt/apt.conf.d/docker-no-languages" <<EOF
// No Translation-* indexes.
Acquire::Languages "none";
EOF
cat > "$r/etc/apt/apt.conf.d/docker-gzip-indexes" <<EOF
// Keep the package indexes compressed on disk.
Acquire::GzipIndexes "true";
EOF
cat > "$r/etc/dpkg/dpkg.cfg.d/docker-apt-speedup" <<EOF
# No fsync from dpkg: a container image is rebuilt, not repaired.
force-unsafe-io
EOF
cp '"$CA"' "$r/usr/local/share/ca-certificates/kiln-host-ca-bundle.crt"
cp '"$CA"' "$r/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$r/usr/local/share/ca-certificates/kiln-host-ca-bundle.crt" "$r/etc/ssl/certs/ca-certificates.crt"
rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/log/apt/* "$r"/var/log/dpkg.log
rm -f "$r/etc/hostname" "$r/etc/resolv.conf"
'

printf '%s' "$customize" > "$hook"
chmod 0755 "$hook"

log "making $out (mmdebstrap minbase bookworm from $MIRROR)"
start=$SECONDS
# In a session of its own (setsid --wait): when mmdebstrap fails to write
# its tarball it sends SIGHUP to its whole process group, which was ours
# and our caller's — a test process died of it, and the failure behind it
# was never seen. A failure (a mirror's hiccup) is tried again twice.
make_tar() {
  setsid --wait mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='force-unsafe-io' \
    --customize-hook="$hook" \
    --customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap" "$1/etc/dpkg/dpkg.cfg.d/99mmdebstrap"' \
    bookworm - "deb $MIRROR bookworm main" \
    | tar --delete --wildcards './dev/?*' > "$tmp"
}
for try in 1 2 3; do
  if make_tar; then
    break
  fi
  [ "$try" -lt 3 ] || die "mmdebstrap failed 3 times"
  log "mmdebstrap failed (try $try of 3); trying again"
  rm -f "$tmp"
  sleep 2
done
mv "$tmp" "$out"
rm -f "$hook"
trap - EXIT
log "made $out ($(du -h "$out" | cut -f1)) in $((SECONDS - start))s"
printf '%s\n' "$out"
