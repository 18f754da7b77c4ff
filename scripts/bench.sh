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
#   push     fixture c to an empty registry: `kiln push` vs `buildah push`
#   pushmemo the same, kiln reusing the compressed layer it remembered
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
# Usage: scripts/bench.sh [fixture...]
#        (default: a b c runstep fresh push pushmemo pull layers500 platforms)
# Env:   ROUNDS (default 5), BENCH_DIR (default /tmp/kiln-bench),
#        PEER_TOOLS (default ../shared/tools next to the checkout),
#        KILN_BIN (a kiln binary to use instead of building one),
#        BENCH_KEEP=1 (keep kiln's store and buildah's bench images at the end),
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
  bash "$PEER_ENV" all "$OUT" >&2
fi

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
  rm -rf "$KILN_ROOT" "$OUT/pull-root" "$OUT/pull-oci" "$OUT/fresh-root" || true
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
bk_build() {  # fixture, extra buildctl args...
  local f=$1; shift
  "$BUILDCTL" --addr "$BUILDKIT_HOST" build --progress quiet \
    --frontend dockerfile.v0 --opt force-network-mode=none \
    --local context="$FIX/$f" --local dockerfile="$FIX/$f" \
    --output "type=image,name=docker.io/library/bench-$f:latest" "$@" >/dev/null 2>&1
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

REG_DIR=${PEER_REGISTRY_DIR:-/tmp/peer-registry}
run_transfer() {  # push | pull
  local s=$1 i t k=() p=()
  kiln_build c || { log "kiln build c failed"; return 1; }
  peer_build c || { log "buildah build c failed"; return 1; }
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
          localhost/bench-c:latest "docker://$REG/bench-buildah:latest" >/dev/null 2>&1; p+=("$(elapsed "$t")") ;;
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

fixtures=("$@")
[ ${#fixtures[@]} -gt 0 ] || fixtures=(a b c runstep fresh push pushmemo pull layers500 platforms)
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
  else
    for s in cold cached changed; do run_scenario "$f" "$s"; peer_prune; bk_prune; done
  fi
  peer_prune
  bk_prune
done
