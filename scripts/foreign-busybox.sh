#!/usr/bin/env bash
# scripts/foreign-busybox.sh — a static busybox for a foreign Debian
# architecture (arm64, armhf, ...), for the multi-platform tests
# (cli/tests/platform_e2e.rs), made the way the amd64 test image is: from
# Debian's busybox-static, not from a container registry.
#
# Usage: scripts/foreign-busybox.sh CACHE_DIR DEB_ARCH
#   Prints the path of CACHE_DIR/busybox-static-<DEB_ARCH>/bin/busybox,
#   making it first when it is missing: `dpkg --add-architecture DEB_ARCH`
#   (and `apt-get update` once, if apt does not know the package yet),
#   `apt-get download busybox-static:DEB_ARCH` into CACHE_DIR,
#   `dpkg-deb -x`. The .deb and the tree stay in CACHE_DIR (the tests use
#   <target>/tmp/kiln-test-cache). Several callers at once are fine: one
#   works under a lock, the others wait.
#
# Needs root (dpkg --add-architecture, apt-get update).
set -euo pipefail

die() { printf '[foreign-busybox] ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[foreign-busybox] %s\n' "$*" >&2; }

[ $# -eq 2 ] || die "usage: $0 CACHE_DIR DEB_ARCH"
arch="$2"
case "$arch" in
  *[!a-z0-9]*|'') die "not a Debian architecture name: $arch" ;;
esac

mkdir -p "$1"
cache="$(cd "$1" && pwd -P)"
tree="$cache/busybox-static-$arch"
out="$tree/bin/busybox"

exec 9>"$cache/foreign-busybox.lock"
flock 9
if [ -x "$out" ]; then
  printf '%s\n' "$out"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (dpkg --add-architecture)"
if ! dpkg --print-foreign-architectures | grep -qx "$arch" && [ "$(dpkg --print-architecture)" != "$arch" ]; then
  log "dpkg --add-architecture $arch"
  dpkg --add-architecture "$arch"
fi

deb="$(find "$cache" -maxdepth 1 -name "busybox-static_*_$arch.deb" | head -n1)"
if [ -z "$deb" ]; then
  # apt-get download runs in the current directory; _apt cannot write a
  # root-owned cache, so apt downloads as root (its warning is harmless).
  if ! (cd "$cache" && apt-get download -q "busybox-static:$arch" >&2 2>/dev/null); then
    log "apt-get update (apt does not know busybox-static:$arch yet)"
    # A mirror caught mid-sync fails one index now and then: try again,
    # and at the end try the download anyway (the index it needs may be
    # among those that came).
    for try in 1 2 3; do
      apt-get update -q >&2 && break
      log "apt-get update failed (try $try of 3)"
      sleep $((try * 5))
    done
    (cd "$cache" && apt-get download -q "busybox-static:$arch" >&2)
  fi
  deb="$(find "$cache" -maxdepth 1 -name "busybox-static_*_$arch.deb" | head -n1)"
  [ -n "$deb" ] || die "apt-get download busybox-static:$arch left no .deb in $cache"
fi

tmp="$tree.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp" "$tree"
dpkg-deb -x "$deb" "$tmp"
[ -f "$tmp/bin/busybox" ] || die "$deb has no /bin/busybox"
mv "$tmp" "$tree"
trap - EXIT
log "made $out from $(basename "$deb")"
printf '%s\n' "$out"
