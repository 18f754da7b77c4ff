#!/usr/bin/env bash
# scripts/release.sh — a release of kiln: one stripped, statically linked
# binary, its shell completions and man page, in dist/kiln-VERSION-ARCH.tar.gz.
#
# Static linking: the musl target when it can be had (`rustup target add
# x86_64-unknown-linux-musl` and Debian's musl-tools for musl-gcc, which
# the bundled SQLite is compiled with); installs both when missing and it
# may (root, apt). Else glibc with `crt-static` (KILN_RELEASE_TARGET=gnu):
# kiln resolves users from the image's own /etc files, never through NSS,
# but glibc's getaddrinfo still loads the host's NSS modules for registry
# host names, so that binary wants a glibc of the same version at run time;
# musl's has no such tie.
#
# The binary says where it comes from (`kiln version`): KILN_GIT_COMMIT,
# KILN_BUILD_DATE and KILN_RUSTC_VERSION are read at compile time.
#
# Environment:
#   KILN_RELEASE_TARGET  musl (default when possible) or gnu
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[release.sh] %s\n' "$*" >&2; }

arch=$(uname -m)
musl="$arch-unknown-linux-musl"
gnu="$arch-unknown-linux-gnu"
want=${KILN_RELEASE_TARGET:-musl}

if [ "$want" = musl ]; then
    if ! rustup target list --installed | grep -qx "$musl"; then
        log "adding the $musl target"
        rustup target add "$musl" || want=gnu
    fi
    if [ "$want" = musl ] && ! command -v musl-gcc >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "installing musl-tools (musl-gcc)"
            apt-get install -y --no-install-recommends musl-tools >/dev/null || want=gnu
        else
            log "musl-gcc missing (apt-get install musl-tools): building with glibc crt-static"
            want=gnu
        fi
    fi
fi

export KILN_GIT_COMMIT=${KILN_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export KILN_BUILD_DATE=${KILN_BUILD_DATE:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}
export KILN_RUSTC_VERSION=${KILN_RUSTC_VERSION:-$(rustc --version | cut -d' ' -f2)}

if [ "$want" = musl ]; then
    target=$musl
    export CC_x86_64_unknown_linux_musl=musl-gcc CC_aarch64_unknown_linux_musl=musl-gcc
else
    target=$gnu
    export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
fi
log "building kiln $KILN_GIT_COMMIT for $target (profile dist)"
cargo build --locked --profile dist --target "$target" -p kiln

bin="${CARGO_TARGET_DIR:-target}/$target/dist/kiln"
if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q 'statically linked\|not a dynamic'; then
    log "error: $bin is dynamically linked:"
    ldd "$bin" >&2
    exit 1
fi

version=$("$bin" version -f '{{.Client.Version}}')
case "$arch" in x86_64) deb=amd64 ;; aarch64) deb=arm64 ;; *) deb=$arch ;; esac
name="kiln-$version-linux-$deb"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name/completions" "$stage/$name/man/man1"
install -m 0755 "$bin" "$stage/$name/kiln"
"$bin" completion bash > "$stage/$name/completions/kiln.bash"
"$bin" completion zsh > "$stage/$name/completions/_kiln"
"$bin" completion fish > "$stage/$name/completions/kiln.fish"
"$bin" man > "$stage/$name/man/man1/kiln.1"
cp README.md LICENSE* "$stage/$name/" 2>/dev/null || true
mkdir -p dist
tar -C "$stage" --owner=0 --group=0 --numeric-owner -czf "dist/$name.tar.gz" "$name"
(cd dist && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
log "dist/$name.tar.gz"
"$bin" version
