#!/usr/bin/env bash
# scripts/example.sh — build and run the README's example image.
#
# 1. installs Debian's busybox-static if it is missing (as root),
# 2. builds kiln (release),
# 3. makes a busybox base image from /bin/busybox and imports it into the
#    store as busybox:latest (`kiln import`),
# 4. builds testdata/example as example:latest and runs it.
#
# The store is kiln's default ($KILN_ROOT, else /var/lib/kiln as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static
fi
cargo build --release -p kiln
KILN=target/release/kiln

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,var}
chmod 1777 "$root/tmp"
cp "$(command -v busybox)" "$root/bin/busybox"
for p in $("$root/bin/busybox" --list-full); do
  case "$p" in bin/busybox|linuxrc|"") continue ;; esac
  mkdir -p "$root/$(dirname "$p")"
  ln -sfn /bin/busybox "$root/$p"
done
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' > "$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' > "$root/etc/group"
tar --numeric-owner -C "$root" -cf "$work/busybox.tar" .

"$KILN" import "$work/busybox.tar" busybox:latest
"$KILN" build -t example:latest testdata/example
"$KILN" run --rm example:latest
