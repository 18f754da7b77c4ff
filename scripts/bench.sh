#!/usr/bin/env bash
# scripts/bench.sh — kiln against buildah (and BuildKit, when one is given)
# on the same machine, same run.
#
# Sets up the peer tools and the three fixtures with
# ../shared/tools/peer-env.sh (buildah, a local registry, a busybox base
# image made from Debian's busybox-static; fixture a: one stage, b: three
# stages, c: COPY . of 20,000 files + 500 MiB), then for every fixture and
# scenario runs kiln and buildah ALTERNATELY, ROUNDS times each, and prints
# the median wall time of each and the ratio kiln/buildah.
#
# BuildKit is the second peer when BUILDKIT_HOST names a running buildkitd
# (e.g. unix:///run/buildkit/buildkitd.sock; OCI worker, able to pull the
# base image from the plain-http registry at $PEER_REGISTRY) and buildctl
# is on PATH (or BUILDCTL names it): then fixtures a, b, c and runstep are
# also built with `buildctl build --frontend dockerfile.v0`, the result kept
# in BuildKit's own image store (--output type=image), alternating with the
# others, and the rows get BuildKit's median and kiln/BuildKit. Otherwise
# those columns say "not run". The script never installs or starts BuildKit
# (BENCHMARKS.md says how to get one).
#
# Scenarios:
#   cold     every step re-run (--no-cache for both)
#   cached   nothing changed since the previous build
#   changed  one small context file changed before each build
#   runstep  20 x `RUN true` with --no-cache (fixed cost per RUN step)
#   fresh    fixture c on a new CI runner: kiln into an empty store (the
#            base image loaded first, untimed), buildah with its store
#            holding only the base image, BuildKit after `buildctl prune
#            --all` (it pulls the base from the local registry)
#   push     fixture c to an empty registry: `kiln push` vs `buildah push`;
#            with BuildKit, a second row: a cached build of c that pushes
#            (`kiln build --push` vs `--output type=image,push=true`), the
#            layers compressed anew on both sides (gzip, the default)
#   pushmemo the same, kiln (and BuildKit) reusing the compressed layer
#            remembered from the previous push
#   fleet    a CI fleet sharing its cache through the registry, fixtures c
#            and runs (10 RUN steps writing files): runner A exports the
#            cache (`--cache-to type=registry,mode=max` vs BuildKit's
#            `--export-cache`), runner B with an empty store (new
#            KILN_ROOT; BuildKit pruned) builds from it (`--cache-from` vs
#            `--import-cache`); see run_fleet for what each side does
#   debian   a Debian bookworm build (scripts/debian-base.sh: needs
#            mmdebstrap and the network, deb.debian.org and pypi.org):
#            apt-get install through cache mounts and a pip venv, cold
#            (--no-cache, package caches warm) and cached
#   rss      kiln's peak RSS building c cold / cached / changed / fresh
#            (GNU time %M; BuildKit's daemon VmHWM for reference)
#   pull     that image into an empty store: `kiln pull` vs `skopeo copy`
#            (to an OCI layout)
#   layers500 500 x RUN on one chain, per-step time by depth (kiln only)
#   rootless fixtures a and c, cold and cached: kiln run by an unprivileged
#            user (its own user namespace, overlay with userxattr) against
#            kiln as root, alternately (kiln only; `scripts/bench.sh
#            rootless` sets up only the fixtures and a busybox base, no
#            buildah or registry). The user kiln-bench-rl is made for the
#            run (with a subordinate id range) and removed at exit.
#   platforms `--platform linux/amd64,linux/arm64` of a cross-compile
#            Dockerfile (a native `FROM --platform=$BUILDPLATFORM` stage,
#            a final RUN per platform, arm64's under QEMU), cold and
#            cached (kiln only; needs qemu-user-static and `kiln system
#            binfmt`; the arm64 busybox comes from scripts/foreign-busybox.sh)
#
# Usage: scripts/bench.sh [fixture|scenario...]
#        (default: a b c runstep fresh push pushmemo pull layers500 platforms
#         fleet rss; debian only when named: it needs the network)
# Env:   ROUNDS (default 5), BENCH_DIR (default /tmp/kiln-bench),
#        PEER_TOOLS (default ../shared/tools next to the checkout),
#        KILN_BIN (a kiln binary to use instead of building one),
#        BENCH_KEEP=1 (keep kiln's store and buildah's bench images at the end),
#        PEER_REGISTRY (default 127.0.0.1:5000) and PEER_REGISTRY_DIR
#        (default /tmp/peer-registry): the bench's registry, emptied by
#        the push and fleet scenarios and at exit (give both, and a
#        BENCH_DIR of its own, when another bench may run beside it),
#        DEBIAN_BASE_CACHE (where scripts/debian-base.sh keeps its tar;
#        default $BENCH_DIR/debian-cache),
#        BUILDKIT_HOST, BUILDCTL (default buildctl): the BuildKit peer
#        (BUILDKIT_PRUNE=0 leaves BuildKit's cache alone; by default the
#        bench's builds are pruned from it after each scenario, as buildah's)
# Every changed build of fixture c leaves a 500 MiB layer behind in both
# stores, so buildah's dangling images are pruned after each scenario, and
# both stores are emptied of the bench's images at exit.
# Run as root. Results go to stdout as a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ROUNDS=${ROUNDS:-5}
OUT=${BENCH_DIR:-/tmp/kiln-bench}
TOOLS=${PEER_TOOLS:-$REPO/../shared/tools}
PEER_ENV="$TOOLS/peer-env.sh"
PEER_BUILD="$TOOLS/peer-build.sh"
REG=${PEER_REGISTRY:-127.0.0.1:5000}
REG_DIR=${PEER_REGISTRY_DIR:-/tmp/peer-registry}
log() { printf '[bench] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
[ -x "$PEER_ENV" ] || [ -f "$PEER_ENV" ] || { log "missing $PEER_ENV"; exit 1; }

FIX="$OUT/fixtures"
ONLY_ROOTLESS=0
[ "$*" = rootless ] && ONLY_ROOTLESS=1
if [ "$ONLY_ROOTLESS" = 1 ]; then
  # kiln against kiln: the fixtures and a busybox base are all it needs.
  log "fixtures in $FIX"
  bash "$PEER_ENV" fixtures "$FIX" >&2
else
  log "peer setup (packages, base image, registry, fixtures) in $OUT"
  bash "$PEER_ENV" all "$OUT" "$REG_DIR" >&2
fi

# ext4 without a journal (this project's CI VMs) skips every inode freed in
# the last 60-360 s when it allocates one, reading the inode table for
# each: a tool creating 20,000 files right after 20,000 were deleted (the
# previous round's store, a registry wipe, a BuildKit prune) then takes
# several times as long, and by how much depends on what ran before it.
# Real machines journal their ext4; give BENCH_DIR (and PEER_REGISTRY_DIR,
# and buildkitd's --root) a journaled file system, e.g. a loop-mounted
# image made with plain `mkfs.ext4` (BENCHMARKS.md).
journal_check() {  # dir
  local src dev
  src=$(findmnt -no SOURCE,FSTYPE -T "$1" 2>/dev/null) || return 0
  case "$src" in *" ext4") ;; *) return 0 ;; esac
  dev=$(basename "${src%% *}")
  if ! ls /proc/fs/jbd2/ 2>/dev/null | grep -q "^$dev-"; then
    log "WARNING: $1 is on ext4 without a journal ($dev): file creation after deletions is"
    log "         slowed by ext4's recently-deleted inode scan; figures will be noisy (see BENCHMARKS.md)"
  fi
}
journal_check "$OUT"
journal_check "$REG_DIR"

if [ -n "${KILN_BIN:-}" ]; then
  KILN="$KILN_BIN"
else
  log "building kiln (release)"
  cargo build --release -p kiln >&2
  KILN="$REPO/target/release/kiln"
fi
export KILN_ROOT="$OUT/kiln-root"
rm -rf "$KILN_ROOT"
peer_prune() {  # drop buildah's dangling images and working containers
  buildah --storage-driver overlay rm --all >/dev/null 2>&1 || true
  buildah --storage-driver overlay rmi --prune >/dev/null 2>&1 || true
}
cleanup() {
  [ "${BENCH_KEEP:-}" = 1 ] && return
  log "removing the bench's images from buildah's store and kiln's store $KILN_ROOT"
  buildah --storage-driver overlay images --format '{{.Name}}:{{.Tag}}' 2>/dev/null \
    | grep '/bench-' | xargs -r buildah --storage-driver overlay rmi -f >/dev/null 2>&1 || true
  peer_prune
  # the registry's repositories (the next run pushes its base again)
  [ "$ONLY_ROOTLESS" = 1 ] || bash "$PEER_ENV" registry-wipe "$REG_DIR" >/dev/null 2>&1 || true
  rm -rf "$KILN_ROOT" "$OUT/pull-root" "$OUT/pull-oci" "$OUT/fresh-root" "$OUT/fleet-root" "$OUT/rss-root" || true
}
trap cleanup EXIT
if [ "$ONLY_ROOTLESS" = 1 ] && [ ! -f "$OUT/busybox.tar" ]; then
  # The base the peer setup would make, from Debian's busybox-static.
  bb_root="$OUT/busybox-rootfs"
  rm -rf "$bb_root"
  mkdir -p "$bb_root"/{bin,etc,tmp,root,proc,sys,dev}
  cp "$(command -v busybox)" "$bb_root/bin/busybox"
  for a in $("$bb_root/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -s busybox "$bb_root/bin/$a"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$bb_root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$bb_root/etc/group"
  tar -C "$bb_root" --numeric-owner -cf "$OUT/busybox-rootfs.tar" .
  "$KILN" import "$OUT/busybox-rootfs.tar" busybox:latest >&2
  "$KILN" save -o "$OUT/busybox.tar" busybox:latest >&2
  rm -rf "$bb_root" "$OUT/busybox-rootfs.tar"
fi
"$KILN" load -i "$OUT/busybox.tar" >&2
"$KILN" tag busybox:latest "$REG/busybox:latest" >&2

# runstep fixture: 20 RUN steps that do nothing.
mkdir -p "$FIX/runstep"
{
  echo "FROM $REG/busybox:latest"
  for i in $(seq 1 20); do echo "RUN true # $i"; done
} > "$FIX/runstep/Dockerfile"

# The BuildKit peer: only when a buildkitd and buildctl are given.
BUILDCTL=${BUILDCTL:-buildctl}
BK=0
if [ -n "${BUILDKIT_HOST:-}" ]; then
  if ! command -v "$BUILDCTL" >/dev/null 2>&1; then
    log "BUILDKIT_HOST is set but $BUILDCTL is not found: BuildKit not run"
  elif ! "$BUILDCTL" --addr "$BUILDKIT_HOST" debug workers >/dev/null 2>&1; then
    log "no buildkitd answers at $BUILDKIT_HOST: BuildKit not run"
  else
    BK=1
    log "BuildKit peer: $("$BUILDCTL" --version 2>/dev/null | head -1) at $BUILDKIT_HOST"
  fi
fi
bk_solve() {  # fixture, extra buildctl args... (no exporter unless given)
  local f=$1; shift
  "$BUILDCTL" --addr "$BUILDKIT_HOST" build --progress quiet \
    --frontend dockerfile.v0 --opt force-network-mode=none \
    --local context="$FIX/$f" --local dockerfile="$FIX/$f" "$@" >/dev/null 2>&1
}
bk_build() {  # fixture, extra buildctl args...
  local f=$1; shift
  bk_solve "$f" --output "type=image,name=docker.io/library/bench-$f:latest" "$@"
}
bk_prune() {  # drop BuildKit's build cache and records (its images stay)
  [ "$BK" = 1 ] && [ "${BUILDKIT_PRUNE:-1}" = 1 ] || return 0
  "$BUILDCTL" --addr "$BUILDKIT_HOST" prune --all >/dev/null 2>&1 || true
}

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

kiln_build() {  # fixture, extra args...
  local f=$1; shift
  "$KILN" build -q --network none -t "bench-$f:latest" "$@" "$FIX/$f" >/dev/null
}
peer_build() {
  local f=$1; shift
  PEER_QUIET=1 bash "$PEER_BUILD" "$FIX/$f" "bench-$f:latest" "$@" >/dev/null 2>&1
}
touch_one() {  # change one small file of a fixture
  case "$1" in
    a) echo "change $RANDOM" >> "$FIX/a/ctx/one.txt" ;;
    b) echo "change $RANDOM" >> "$FIX/b/src/main.txt" ;;
    c) echo "change $RANDOM" >> "$FIX/c/small/d00/f000.txt" ;;
  esac
}

declare -A RESULT
run_scenario() {  # fixture scenario
  local f=$1 s=$2 i t k=() p=() b=()
  # warm all so that "cached" and "changed" start from a built state
  kiln_build "$f" || { log "kiln build $f failed"; return 1; }
  peer_build "$f" || { log "buildah build $f failed"; return 1; }
  if [ "$BK" = 1 ]; then bk_build "$f" || { log "BuildKit build $f failed"; return 1; }; fi
  for i in $(seq 1 "$ROUNDS"); do
    case "$s" in
      cold)
        t=$(now); kiln_build "$f" --no-cache; k+=("$(elapsed "$t")")
        t=$(now); peer_build "$f" --no-cache; p+=("$(elapsed "$t")")
        if [ "$BK" = 1 ]; then t=$(now); bk_build "$f" --no-cache; b+=("$(elapsed "$t")"); fi ;;
      cached)
        t=$(now); kiln_build "$f"; k+=("$(elapsed "$t")")
        t=$(now); peer_build "$f"; p+=("$(elapsed "$t")")
        if [ "$BK" = 1 ]; then t=$(now); bk_build "$f"; b+=("$(elapsed "$t")"); fi ;;
      changed)
        touch_one "$f"; t=$(now); kiln_build "$f"; k+=("$(elapsed "$t")")
        touch_one "$f"; t=$(now); peer_build "$f"; p+=("$(elapsed "$t")")
        if [ "$BK" = 1 ]; then touch_one "$f"; t=$(now); bk_build "$f"; b+=("$(elapsed "$t")"); fi ;;
    esac
  done
  local km pm bm
  km=$(printf '%s\n' "${k[@]}" | median)
  pm=$(printf '%s\n' "${p[@]}" | median)
  RESULT["$f/$s"]="$km $pm"
  if [ "$BK" = 1 ]; then
    bm=$(printf '%s\n' "${b[@]}" | median)
    printf '| %s | %s | %.3f s | %.3f s | %.3f s | %.3f | %.3f |\n' "$f" "$s" "$km" "$pm" "$bm" \
      "$(echo "$km / $pm" | bc -l)" "$(echo "$km / $bm" | bc -l)"
  else
    printf '| %s | %s | %.3f s | %.3f s | not run | %.3f | not run |\n' "$f" "$s" "$km" "$pm" \
      "$(echo "$km / $pm" | bc -l)"
  fi
}

# fresh: fixture c built where nothing of it is stored yet.
# Each round's kiln store is a new directory, all deleted at the end: on
# ext4 without a journal (this machine class) the inode allocator skips
# inodes freed in the last 60-300 s (fs/ext4/ialloc.c, recently_deleted),
# so creating 20,000 files right after deleting 20,000 costs a scan of the
# inode tables that has nothing to do with the builder.
run_fresh() {
  local i t k=() p=() b=() km pm bm fresh
  for i in $(seq 1 "$ROUNDS"); do
    fresh="$OUT/fresh-root/$i"
    rm -rf "$fresh"
    KILN_ROOT="$fresh" "$KILN" load -i "$OUT/busybox.tar" >/dev/null 2>&1
    KILN_ROOT="$fresh" "$KILN" tag busybox:latest "$REG/busybox:latest" >/dev/null 2>&1
    t=$(now); KILN_ROOT="$fresh" kiln_build c; k+=("$(elapsed "$t")")
    buildah --storage-driver overlay rmi -f localhost/bench-c:latest >/dev/null 2>&1 || true
    peer_prune
    t=$(now); peer_build c; p+=("$(elapsed "$t")")
    if [ "$BK" = 1 ]; then
      "$BUILDCTL" --addr "$BUILDKIT_HOST" prune --all >/dev/null 2>&1 || true
      t=$(now); bk_build c; b+=("$(elapsed "$t")")
    fi
  done
  rm -rf "$OUT/fresh-root"
  km=$(printf '%s\n' "${k[@]}" | median)
  pm=$(printf '%s\n' "${p[@]}" | median)
  if [ "$BK" = 1 ]; then
    bm=$(printf '%s\n' "${b[@]}" | median)
    printf '| c | fresh (empty store) | %.3f s | %.3f s | %.3f s | %.3f | %.3f |\n' "$km" "$pm" "$bm" \
      "$(echo "$km / $pm" | bc -l)" "$(echo "$km / $bm" | bc -l)"
  else
    printf '| c | fresh (empty store) | %.3f s | %.3f s | not run | %.3f | not run |\n' "$km" "$pm" \
      "$(echo "$km / $pm" | bc -l)"
  fi
}

run_transfer() {  # push | pull
  local s=$1 i t k=() p=() kb=() b=()
  kiln_build c || { log "kiln build c failed"; return 1; }
  peer_build c || { log "buildah build c failed"; return 1; }
  if [ "$BK" = 1 ] && [ "$s" != pull ]; then bk_build c || { log "BuildKit build c failed"; return 1; }; fi
  for i in $(seq 1 "$ROUNDS"); do
    case "$s" in
      push|pushmemo)
        bash "$PEER_ENV" registry-wipe "$REG_DIR" >/dev/null 2>&1
        # push: the layer is compressed anew, as buildah does every time
        # (prune drops the unreferenced compressed blob kiln remembers);
        # pushmemo: kiln reuses the compressed blob of the previous round.
        [ "$s" = push ] && "$KILN" prune >/dev/null 2>&1
        t=$(now); "$KILN" push bench-c:latest "$REG/bench-kiln:latest" >/dev/null 2>&1; k+=("$(elapsed "$t")")
        bash "$PEER_ENV" registry-wipe "$REG_DIR" >/dev/null 2>&1
        t=$(now); buildah --storage-driver overlay push --quiet --tls-verify=false \
          localhost/bench-c:latest "docker://$REG/bench-buildah:latest" >/dev/null 2>&1; p+=("$(elapsed "$t")")
        if [ "$BK" = 1 ]; then
          # Against BuildKit: a cached build of c pushed by the build itself
          # (kiln: `build --push`; BuildKit: --output type=image,push=true).
          # push: the layers are compressed anew on both sides (kiln prune
          # drops kiln's remembered blob; BuildKit's cache is pruned and
          # the image built again without an exporter, so its new
          # snapshots have no compressed blob yet); pushmemo: both reuse
          # the compressed blobs of the previous round.
          bash "$PEER_ENV" registry-wipe "$REG_DIR" >/dev/null 2>&1
          bash "$PEER_ENV" push-base "$OUT" >/dev/null 2>&1
          [ "$s" = push ] && "$KILN" prune >/dev/null 2>&1
          t=$(now); "$KILN" build -q --network none -t "$REG/bench-kiln-build:latest" --push "$FIX/c" >/dev/null 2>&1 \
            || { log "kiln build --push of c failed"; return 1; }
          kb+=("$(elapsed "$t")")
          if [ "$s" = push ]; then
            "$BUILDCTL" --addr "$BUILDKIT_HOST" prune --all >/dev/null 2>&1 || true
            bk_solve c || { log "BuildKit build c failed"; return 1; }
          fi
          t=$(now); bk_solve c --output "type=image,name=$REG/bench-bk:latest,push=true,registry.insecure=true" \
            || { log "BuildKit push of c failed"; return 1; }
          b+=("$(elapsed "$t")")
        fi ;;
      pull)
        if [ "$i" = 1 ]; then
          bash "$PEER_ENV" registry-wipe "$REG_DIR" >/dev/null 2>&1
          "$KILN" push bench-c:latest "$REG/bench-pull:latest" >/dev/null 2>&1
        fi
        local fresh="$OUT/pull-root" layout="$OUT/pull-oci"
        rm -rf "$fresh" "$layout"
        t=$(now); KILN_ROOT="$fresh" "$KILN" pull "$REG/bench-pull:latest" >/dev/null 2>&1; k+=("$(elapsed "$t")")
        t=$(now); skopeo copy --quiet --src-tls-verify=false "docker://$REG/bench-pull:latest" \
          "oci:$layout:latest" >/dev/null 2>&1; p+=("$(elapsed "$t")")
        rm -rf "$fresh" "$layout" ;;
    esac
  done
  local km pm peer
  km=$(printf '%s\n' "${k[@]}" | median)
  pm=$(printf '%s\n' "${p[@]}" | median)
  peer=$([ "$s" = pull ] && echo "skopeo copy" || echo "buildah push")
  printf '| c | %s (vs %s) | %.3f s | %.3f s | — | %.3f | — |\n' "$s" "$peer" "$km" "$pm" "$(echo "$km / $pm" | bc -l)"
  if [ "$s" != pull ]; then
    if [ "$BK" = 1 ]; then
      row c "$s, cached build + push (kiln build --push vs BuildKit push=true)" "$(med "${kb[@]}")" "" "$(med "${b[@]}")"
    else
      printf '| c | %s, cached build + push (vs BuildKit push=true) | not run | — | not run | — | not run |\n' "$s"
    fi
  fi
}

# layers500: 500 x RUN on one chain (no peer: buildah's overlay stops at
# about 125 layers). Per-step seconds come from `--progress json`; the
# median of layers 1-50, 226-275 and 451-500 shows whether the time per
# layer stays flat as the stack grows.
run_layers500() {
  local dir="$FIX/layers500" i out
  mkdir -p "$dir"
  {
    echo "FROM $REG/busybox:latest"
    for i in $(seq 1 500); do echo "RUN echo $i > /layer-$((i % 7))"; done
  } > "$dir/Dockerfile"
  for i in $(seq 1 "$ROUNDS"); do
    out="$OUT/layers500-$i.json"
    local t; t=$(now)
    "$KILN" build --progress json --no-cache --network none -t bench-layers500:latest "$dir" \
      >/dev/null 2>"$out" || { log "kiln build layers500 failed"; return 1; }
    echo "total $(elapsed "$t")" >> "$OUT/layers500-$i.total"
  done
  python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
bands = {"1-50": (1, 50), "226-275": (226, 275), "451-500": (451, 500)}
per = {b: [] for b in bands}
totals = []
for r in range(1, rounds + 1):
    names, secs = {}, {}
    for line in open(f"{out}/layers500-{r}.json"):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "started":
            names[e["id"]] = e["name"]
        elif e.get("event") == "done":
            secs[e["id"]] = e["seconds"]
    runs = [secs[i] for i in sorted(secs) if "RUN echo" in names.get(i, "")]
    for b, (lo, hi) in bands.items():
        per[b].extend(runs[lo - 1:hi])
    totals.append(float(open(f"{out}/layers500-{r}.total").read().split()[-1]))
m = {b: statistics.median(v) * 1000 for b, v in per.items()}
print(f"| layers500 | per RUN step, layers 1-50 / 226-275 / 451-500 | "
      f"{m['1-50']:.1f} / {m['226-275']:.1f} / {m['451-500']:.1f} ms | "
      f"total {statistics.median(totals):.2f} s | — | last/first {m['451-500'] / m['1-50']:.2f} | — |")
PY
  rm -f "$OUT"/layers500-*.total
}

# rootless: kiln as an unprivileged user vs kiln as root.
RL_USER=kiln-bench-rl
RL_DIR="$OUT/rootless"
rl_cleanup() {
  rm -rf "$RL_DIR"
  if [ "${RL_MADE_USER:-0}" = 1 ]; then userdel -r -f "$RL_USER" >/dev/null 2>&1 || true; fi
}
as_rl_user() {
  setpriv --reuid="$RL_USER" --regid="$RL_USER" --clear-groups \
    env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="$RL_DIR" \
    KILN_ROOT="$RL_DIR/store" "$@"
}
run_rootless() {
  local f s i t k r km rm_
  if ! id "$RL_USER" >/dev/null 2>&1; then
    useradd -M -s /usr/sbin/nologin -K SUB_UID_COUNT=65536 -K SUB_GID_COUNT=65536 "$RL_USER"
    RL_MADE_USER=1
  fi
  trap 'rl_cleanup; cleanup' EXIT
  rm -rf "$RL_DIR"
  install -d -m 755 "$RL_DIR"
  install -d -o "$RL_USER" -g "$RL_USER" -m 700 "$RL_DIR/store"
  install -m 755 "$KILN" "$RL_DIR/kiln"
  chmod a+x "$OUT" "$FIX"
  chmod -R a+rX "$FIX/a" "$FIX/c" "$OUT/busybox.tar"
  as_rl_user "$RL_DIR/kiln" load -q -i "$OUT/busybox.tar" >&2
  as_rl_user "$RL_DIR/kiln" tag busybox:latest "$REG/busybox:latest" >&2
  as_rl_user "$RL_DIR/kiln" system info >&2
  rl_build() {  # fixture, extra args...
    local f=$1; shift
    as_rl_user "$RL_DIR/kiln" build -q --network none -t "bench-$f:latest" "$@" "$FIX/$f" >/dev/null
  }
  for f in a c; do
    kiln_build "$f" && rl_build "$f" || { log "warm-up build of $f failed"; return 1; }
    for s in cold cached; do
      k=(); r=()
      for i in $(seq 1 "$ROUNDS"); do
        local extra=()
        [ "$s" = cold ] && extra=(--no-cache)
        t=$(now); rl_build "$f" "${extra[@]}"; r+=("$(elapsed "$t")")
        t=$(now); kiln_build "$f" "${extra[@]}"; k+=("$(elapsed "$t")")
      done
      rm_=$(printf '%s\n' "${r[@]}" | median)
      km=$(printf '%s\n' "${k[@]}" | median)
      printf '| %s | %s, kiln rootless vs kiln as root | %.3f s | %.3f s | — | %.3f | — |\n' \
        "$f" "$s" "$rm_" "$km" "$(echo "$rm_ / $km" | bc -l)"
    done
  done
}

# platforms: a two-platform build, cold and cached (kiln only). The base
# is a busybox index made by kiln itself from the host's and Debian's
# arm64 busybox-static.
run_platforms() {
  local dir="$FIX/platforms" i t s k
  mkdir -p "$dir/base" "$dir/app"
  cp "$(command -v busybox)" "$dir/base/bb-amd64"
  cp "$(bash "$REPO/scripts/foreign-busybox.sh" "$OUT/foreign" arm64)" "$dir/base/bb-arm64"
  cat > "$dir/base/Dockerfile" <<'EOF'
FROM scratch
ARG TARGETARCH
COPY bb-$TARGETARCH /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
EOF
  cat > "$dir/app/Dockerfile" <<'EOF'
FROM --platform=$BUILDPLATFORM bench-platforms-base:latest AS build
ARG TARGETARCH
RUN i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo "$TARGETARCH" > /arch
FROM bench-platforms-base:latest
COPY --from=build /arch /arch
RUN i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; uname -m > /uname
EOF
  "$KILN" build -q --network none --platform linux/amd64,linux/arm64 \
    -t bench-platforms-base:latest "$dir/base" >/dev/null \
    || { log "kiln build of the platforms base failed"; return 1; }
  for s in cold cached; do
    k=()
    for i in $(seq 1 "$ROUNDS"); do
      t=$(now)
      "$KILN" build -q --network none --platform linux/amd64,linux/arm64 \
        -t bench-platforms:latest $([ "$s" = cold ] && echo --no-cache) "$dir/app" >/dev/null \
        || { log "kiln build platforms $s failed"; return 1; }
      k+=("$(elapsed "$t")")
    done
    printf '| platforms | %s, linux/amd64+linux/arm64 | %.3f s | (no peer) | (no peer) | | |\n' \
      "$s" "$(printf '%s\n' "${k[@]}" | median)"
  done
}

# A row: fixture, scenario, kiln, peer (buildah or "" for "—"), BuildKit
# ("" when not run). Times in seconds; the ratios are computed here.
row() {
  local f=$1 s=$2 km=$3 pm=$4 bm=$5 pc bc pr br
  if [ -n "$pm" ]; then pc=$(printf '%.3f s' "$pm"); pr=$(printf '%.3f' "$(echo "$km / $pm" | bc -l)")
  else pc="—"; pr="—"; fi
  if [ "$BK" != 1 ]; then bc="not run"; br="not run"
  elif [ -n "$bm" ]; then bc=$(printf '%.3f s' "$bm"); br=$(printf '%.3f' "$(echo "$km / $bm" | bc -l)")
  else bc="—"; br="—"; fi
  printf '| %s | %s | %.3f s | %s | %s | %s | %s |\n' "$f" "$s" "$km" "$pc" "$bc" "$pr" "$br"
}
med() { printf '%s\n' "$@" | median; }

# fleet: a CI fleet sharing its build cache through the registry.
# Runner A has built the fixture (a new commit: one file changed, so the
# layers are new and nobody has compressed them yet) and builds it again
# with the cache export: the build is cached, the time is the export
# (layers compressed and uploaded, cache manifest pushed; mode=max).
#   kiln:     kiln build -t … --cache-to type=registry,ref=…,mode=max
#   BuildKit: buildctl build --export-cache type=registry,ref=…,mode=max
#             (no --output: its image exporter would compress the layers
#             for its image store before the cache export)
# Runner B is a new runner: kiln with an empty store (a new KILN_ROOT),
# BuildKit after `buildctl prune --all`; both pull the base from the
# registry, hash/transfer the context, and take every step from the
# imported cache:
#   kiln:     kiln build -t … --cache-from type=registry,ref=…
#   BuildKit: buildctl build --import-cache type=registry,ref=…, twice
#             (pruned before each): --output type=image,name=… (its image
#             store keeps lazy references to the cache's blobs and
#             downloads no layer; `unpack=true` changes nothing with the
#             OCI worker), and --output type=oci,dest=FILE (every layer
#             downloaded and written out; kiln's store holds the layers
#             downloaded and applied)
# The registry is emptied every round. Fixtures: c, and "runs" (a COPY of
# a small file that changes every round, then 10 RUN steps each writing
# 200 small files, 1 MiB of random bytes and 2 MiB of text).
fleet_prepare() {
  local d="$FIX/runs" i
  mkdir -p "$d"
  echo 0 > "$d/round.txt"
  {
    echo "FROM $REG/busybox:latest"
    echo "COPY round.txt /round.txt"
    for i in $(seq 1 10); do
      echo "RUN mkdir -p /out/$i && n=0 && while [ \$n -lt 200 ]; do echo \"step $i file \$n\" > /out/$i/f\$n; n=\$((n+1)); done && head -c 1048576 /dev/urandom > /out/$i/random && yes \"step $i text\" | head -c 2097152 > /out/$i/text"
    done
  } > "$d/Dockerfile"
}
fleet_bump() {  # fixture round: a new commit
  case "$1" in
    c) touch_one c ;;
    runs) echo "round $2 $RANDOM" > "$FIX/runs/round.txt" ;;
  esac
}
fleet_base() {  # the registry emptied, the base pushed again (same digest)
  bash "$PEER_ENV" registry-wipe "$REG_DIR" >/dev/null 2>&1
  bash "$PEER_ENV" push-base "$OUT" >/dev/null 2>&1
}
run_fleet() {  # fixture
  local f=$1 i t ke=() ki=() be=() bi=() bo=() fresh kref bref n
  local ra="$OUT/fleet-root/a"
  kref="$REG/bench-cache-kiln-$f:latest"
  bref="$REG/bench-cache-bk-$f:latest"
  # Runner A's store: the base pulled from the registry, as runner B
  # will pull it (kiln keys a base image by its manifest digest).
  if [ ! -d "$ra" ]; then
    fleet_base
    KILN_ROOT="$ra" "$KILN" pull "$REG/busybox:latest" >/dev/null 2>&1 \
      || { log "kiln pull of the base failed"; return 1; }
  fi
  for i in $(seq 1 "$ROUNDS"); do
    fleet_bump "$f" "$i"
    fleet_base
    KILN_ROOT="$ra" kiln_build "$f" || { log "kiln build $f failed"; return 1; }
    t=$(now); KILN_ROOT="$ra" kiln_build "$f" --cache-to "type=registry,ref=$kref,mode=max" \
      || { log "kiln cache export of $f failed"; return 1; }
    ke+=("$(elapsed "$t")")
    if [ "$BK" = 1 ]; then
      bk_solve "$f" || { log "BuildKit build $f failed"; return 1; }
      t=$(now); bk_solve "$f" --export-cache "type=registry,ref=$bref,mode=max,registry.insecure=true" \
        || { log "BuildKit cache export of $f failed"; return 1; }
      be+=("$(elapsed "$t")")
    fi
    fresh="$OUT/fleet-root/$f-$i"
    rm -rf "$fresh"
    t=$(now); KILN_ROOT="$fresh" "$KILN" build --network none --progress json -t "bench-$f:latest" \
      --cache-from "type=registry,ref=$kref" "$FIX/$f" >/dev/null 2>"$OUT/fleet-b.log" \
      || { log "kiln cache import of $f failed"; return 1; }
    ki+=("$(elapsed "$t")")
    n=$(grep -c '"event": *"cached"' "$OUT/fleet-b.log" || true)
    [ "$n" -gt 0 ] || log "kiln runner B ($f, round $i) took no step from the cache"
    if [ "$BK" = 1 ]; then
      local out
      for out in "type=image,name=docker.io/library/bench-fleet-$f:latest" "type=oci,dest=$OUT/fleet-b.tar"; do
        "$BUILDCTL" --addr "$BUILDKIT_HOST" prune --all >/dev/null 2>&1 || true
        t=$(now); "$BUILDCTL" --addr "$BUILDKIT_HOST" build --progress plain \
          --frontend dockerfile.v0 --opt force-network-mode=none \
          --local context="$FIX/$f" --local dockerfile="$FIX/$f" \
          --import-cache "type=registry,ref=$bref,registry.insecure=true" --output "$out" \
          >/dev/null 2>"$OUT/fleet-b.log" || { log "BuildKit cache import of $f failed"; return 1; }
        case "$out" in type=image*) bi+=("$(elapsed "$t")") ;; *) bo+=("$(elapsed "$t")") ;; esac
        # (with type=oci BuildKit shows a step taken from the imported
        # cache as done, not CACHED: only the type=image run is checked)
        n=$(grep -c ' CACHED$' "$OUT/fleet-b.log" || true)
        case "$out" in type=image*) [ "$n" -gt 0 ] \
          || log "BuildKit runner B ($f, round $i) took no step from the cache" ;; esac
        rm -f "$OUT/fleet-b.tar"
      done
    fi
  done
  rm -f "$OUT/fleet-b.log"
  local bem="" bim="" bom=""
  [ "$BK" = 1 ] && { bem=$(med "${be[@]}"); bim=$(med "${bi[@]}"); bom=$(med "${bo[@]}"); }
  row "$f" "fleet: runner A, cache export (registry, mode=max; build cached, layers new)" "$(med "${ke[@]}")" "" "$bem"
  row "$f" "fleet: runner B, empty store, cache import + build (BuildKit: type=image, lazy: downloads no layer)" "$(med "${ki[@]}")" "" "$bim"
  row "$f" "fleet: runner B, the same kiln build (BuildKit: type=oci tar, every layer downloaded)" "$(med "${ki[@]}")" "" "$bom"
}

# debian: a Debian bookworm base (scripts/debian-base.sh, mmdebstrap,
# imported by kiln and pushed to the bench registry, from where BuildKit
# pulls it), apt-get install of a few packages through the cache mounts of
# BuildKit's documented pattern, and a pip venv. RUN steps use the host's
# network (both tools' default): deb.debian.org and pypi.org must be
# reachable. cold: --no-cache with the package cache mounts warm (apt
# still revalidates its indexes; pip still asks PyPI); cached: nothing
# changed.
run_debian() {
  local d="$FIX/debian" tar s i t k b
  tar=$(bash "$REPO/scripts/debian-base.sh" "${DEBIAN_BASE_CACHE:-$OUT/debian-cache}") \
    || { log "scripts/debian-base.sh failed (mmdebstrap? network?)"; return 1; }
  "$KILN" import -c 'CMD ["bash"]' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tar" "$REG/debian:bookworm" >/dev/null
  "$KILN" push "$REG/debian:bookworm" >/dev/null 2>&1 || { log "push of the Debian base failed"; return 1; }
  mkdir -p "$d"
  cat > "$d/Dockerfile" <<DF
FROM $REG/debian:bookworm
RUN rm -f /etc/apt/apt.conf.d/docker-clean
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \\
    --mount=type=cache,target=/var/lib/apt,sharing=locked \\
    apt-get update && apt-get install -y --no-install-recommends python3-venv jq
RUN --mount=type=cache,target=/root/.cache/pip \\
    python3 -m venv /v && /v/bin/pip install --disable-pip-version-check six==1.16.0
DF
  kd() { "$KILN" build -q -t bench-debian:latest "$@" "$d" >/dev/null; }
  bd() {
    "$BUILDCTL" --addr "$BUILDKIT_HOST" build --progress quiet --frontend dockerfile.v0 \
      --local context="$d" --local dockerfile="$d" \
      --output "type=image,name=docker.io/library/bench-debian:latest" "$@" >/dev/null 2>&1
  }
  kd || { log "kiln build debian failed"; return 1; }
  if [ "$BK" = 1 ]; then bd || { log "BuildKit build debian failed"; return 1; }; fi
  for s in cold cached; do
    k=(); b=()
    local extra=()
    [ "$s" = cold ] && extra=(--no-cache)
    for i in $(seq 1 "$ROUNDS"); do
      t=$(now); kd "${extra[@]}" || { log "kiln build debian failed"; return 1; }; k+=("$(elapsed "$t")")
      if [ "$BK" = 1 ]; then
        t=$(now); bd "${extra[@]}" || { log "BuildKit build debian failed"; return 1; }; b+=("$(elapsed "$t")")
      fi
    done
    local bm=""
    [ "$BK" = 1 ] && bm=$(med "${b[@]}")
    if [ "$s" = cold ]; then
      row debian "cold (--no-cache), apt + pip cache mounts warm" "$(med "${k[@]}")" "" "$bm"
    else
      row debian "cached" "$(med "${k[@]}")" "" "$bm"
    fi
  done
  debian_floor "$tar"
}

# The floor of the cold debian row: the Dockerfile's two RUN commands
# with no builder at all, as root in a bare chroot (a mount namespace,
# /proc, /dev and the host's resolv.conf; no other namespace, no
# seccomp, no cgroup) on an overlay of the same base on the same file
# system, the same three cache directories bind-mounted and warm; the
# overlay is made anew for every round. What a builder can take off the
# cold row is what it adds on top of this.
debian_floor() {
  local tar=$1 b="$OUT/debian-floor" i t f=() step
  command -v unshare >/dev/null && command -v chroot >/dev/null \
    || { log "debian floor: unshare/chroot missing, not measured"; return 0; }
  if [ ! -d "$b/base/usr" ]; then
    rm -rf "$b/base"; mkdir -p "$b/base"
    tar -xf "$tar" -C "$b/base" || { log "debian floor: cannot unpack the base"; return 0; }
    rm -f "$b/base/etc/apt/apt.conf.d/docker-clean"
    touch "$b/base/etc/resolv.conf"
  fi
  mkdir -p "$b/apt-cache" "$b/apt-lib" "$b/pip"
  # shellcheck disable=SC2016
  step='p=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    mount -t proc proc "$1/root/proc" && mount --rbind /dev "$1/root/dev" &&
    mount --bind /etc/resolv.conf "$1/root/etc/resolv.conf" &&
    mount --bind "$1/apt-cache" "$1/root/var/cache/apt" &&
    mount --bind "$1/apt-lib" "$1/root/var/lib/apt" &&
    mkdir -p "$1/root/root/.cache/pip" && mount --bind "$1/pip" "$1/root/root/.cache/pip" &&
    chroot "$1/root" env -i PATH=$p HOME=/root sh -c "apt-get update && apt-get install -y --no-install-recommends python3-venv jq" &&
    chroot "$1/root" env -i PATH=$p HOME=/root sh -c "python3 -m venv /v && /v/bin/pip install --disable-pip-version-check six==1.16.0"'
  # One round to warm the caches, then ROUNDS timed.
  for i in $(seq 0 "$ROUNDS"); do
    rm -rf "$b/root" "$b/upper" "$b/work"; mkdir -p "$b/root" "$b/upper" "$b/work"
    mount -t overlay overlay -o "lowerdir=$b/base,upperdir=$b/upper,workdir=$b/work" "$b/root" \
      || { log "debian floor: overlay mount failed"; return 0; }
    t=$(now)
    unshare -m --propagation private sh -c "$step" sh "$b" >/dev/null 2>&1 \
      || { umount "$b/root"; log "debian floor: the commands failed in the chroot"; return 0; }
    [ "$i" -gt 0 ] && f+=("$(elapsed "$t")")
    umount "$b/root"
  done
  rm -rf "$b/root" "$b/upper" "$b/work"
  row debian "floor: the same two RUN commands in a bare chroot (no builder, no sandbox), caches warm" "$(med "${f[@]}")" "" ""
}

# rss: kiln's peak resident set building fixture c (GNU time's %M: the
# largest of kiln and the children it waited for), cold (--no-cache),
# cached, changed, and fresh (an empty store); the largest of ROUNDS
# builds each. BuildKit for reference: the daemon's VmHWM over the same
# four builds of c (reset through /proc/PID/clear_refs first), found by
# the unix socket it listens on.
run_rss() {
  local s i m fresh bkpid="" kr=() br=()
  kiln_build c || { log "kiln build c failed"; return 1; }
  if [ "$BK" = 1 ]; then
    bk_build c || { log "BuildKit build c failed"; return 1; }
    bkpid=$(ss -xlpn 2>/dev/null | grep -F "${BUILDKIT_HOST#unix://} " | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)
  fi
  for s in cold cached changed fresh; do
    local best=0 bbest=0
    for i in $(seq 1 "$ROUNDS"); do
      local extra=() root="$KILN_ROOT"
      case "$s" in
        cold) extra=(--no-cache) ;;
        changed) touch_one c ;;
        fresh)
          root="$OUT/rss-root/$i"; rm -rf "$root"
          KILN_ROOT="$root" "$KILN" load -i "$OUT/busybox.tar" >/dev/null 2>&1
          KILN_ROOT="$root" "$KILN" tag busybox:latest "$REG/busybox:latest" >/dev/null 2>&1 ;;
      esac
      KILN_ROOT="$root" /usr/bin/time -f %M -o "$OUT/rss.txt" \
        "$KILN" build -q --network none -t bench-c:latest "${extra[@]}" "$FIX/c" >/dev/null \
        || { log "kiln build c ($s) failed"; return 1; }
      m=$(tail -1 "$OUT/rss.txt")
      [ "$m" -gt "$best" ] && best=$m
      if [ -n "$bkpid" ]; then
        echo 5 > "/proc/$bkpid/clear_refs" 2>/dev/null || true
        [ "$s" = fresh ] && "$BUILDCTL" --addr "$BUILDKIT_HOST" prune --all >/dev/null 2>&1
        [ "$s" = changed ] && touch_one c
        bk_build c "${extra[@]}" || { log "BuildKit build c ($s) failed"; return 1; }
        m=$(awk '/^VmHWM:/ {print $2}' "/proc/$bkpid/status")
        [ "$m" -gt "$bbest" ] && bbest=$m
      fi
    done
    kr+=("$((best / 1024))")
    br+=("$((bbest / 1024))")
  done
  # the stores stay until exit: deleting 60,000 files now would slow
  # the next scenario's file creation (ext4's recently_deleted, see run_fresh)
  rm -f "$OUT/rss.txt"
  local bcol="not run"
  [ -n "$bkpid" ] && bcol="buildkitd ${br[0]} / ${br[1]} / ${br[2]} / ${br[3]} MiB"
  [ "$BK" = 1 ] && [ -z "$bkpid" ] && bcol="(buildkitd's pid not found)"
  printf '| c | peak RSS, cold / cached / changed / fresh (max of %s) | %s / %s / %s / %s MiB | — | %s | — | — |\n' \
    "$ROUNDS" "${kr[0]}" "${kr[1]}" "${kr[2]}" "${kr[3]}" "$bcol"
}

fixtures=("$@")
[ ${#fixtures[@]} -gt 0 ] || fixtures=(a b c runstep fresh push pushmemo pull layers500 platforms fleet rss)
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); $(buildah --version 2>/dev/null || echo 'no buildah')"
if [ "$BK" = 1 ]; then
  echo "BuildKit: $("$BUILDCTL" --addr "$BUILDKIT_HOST" debug workers -v 2>/dev/null | awk '
    /^BuildKit:/ {v = $NF} /worker.executor:/ {e = $2} /worker.snapshotter:/ {s = $2}
    END {printf "%s, worker executor %s, snapshotter %s", v, e, s}')"
  echo "Rounds: $ROUNDS, alternating kiln / buildah / BuildKit, medians"
else
  echo "BuildKit: not run (set BUILDKIT_HOST to a running buildkitd and put buildctl on PATH)"
  echo "Rounds: $ROUNDS, alternating kiln / buildah, medians"
fi
echo
echo "| fixture | scenario | kiln | buildah | BuildKit | kiln/buildah | kiln/BuildKit |"
echo "|---|---|---|---|---|---|---|"
for f in "${fixtures[@]}"; do
  if [ "$f" = rootless ]; then
    echo "| (rootless rows: kiln rootless, kiln as root, rootless/root) | | | | | | |"
    run_rootless
  elif [ "$f" = runstep ]; then
    run_scenario runstep cold
  elif [ "$f" = layers500 ]; then
    run_layers500
  elif [ "$f" = fresh ]; then
    run_fresh
  elif [ "$f" = platforms ]; then
    run_platforms
  elif [ "$f" = push ] || [ "$f" = pushmemo ] || [ "$f" = pull ]; then
    run_transfer "$f"
  elif [ "$f" = fleet ]; then
    fleet_prepare
    run_fleet c
    run_fleet runs
  elif [ "$f" = debian ]; then
    run_debian
  elif [ "$f" = rss ]; then
    run_rss
  else
    for s in cold cached changed; do run_scenario "$f" "$s"; peer_prune; bk_prune; done
  fi
  peer_prune
  bk_prune
done
