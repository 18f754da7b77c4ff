#!/usr/bin/env bash
# scripts/bench.sh — kiln against buildah on the same machine, same run.
#
# Sets up the peer tools and the three fixtures with
# ../shared/tools/peer-env.sh (buildah, a local registry, a busybox base
# image made from Debian's busybox-static; fixture a: one stage, b: three
# stages, c: COPY . of 20,000 files + 500 MiB), then for every fixture and
# scenario runs kiln and buildah ALTERNATELY, ROUNDS times each, and prints
# the median wall time of each and the ratio kiln/buildah.
#
# Scenarios:
#   cold     every step re-run (--no-cache for both)
#   cached   nothing changed since the previous build
#   changed  one small context file changed before each build
#   runstep  20 x `RUN true` with --no-cache (fixed cost per RUN step)
#   push     fixture c to an empty registry: `kiln push` vs `buildah push`
#   pushmemo the same, kiln reusing the compressed layer it remembered
#   pull     that image into an empty store: `kiln pull` vs `skopeo copy`
#            (to an OCI layout)
#   layers500 500 x RUN on one chain, per-step time by depth (kiln only)
#   platforms `--platform linux/amd64,linux/arm64` of a cross-compile
#            Dockerfile (a native `FROM --platform=$BUILDPLATFORM` stage,
#            a final RUN per platform, arm64's under QEMU), cold and
#            cached (kiln only; needs qemu-user-static and `kiln system
#            binfmt`; the arm64 busybox comes from scripts/foreign-busybox.sh)
#
# Usage: scripts/bench.sh [fixture...]
#        (default: a b c runstep push pushmemo pull layers500 platforms)
# Env:   ROUNDS (default 5), BENCH_DIR (default /tmp/kiln-bench),
#        PEER_TOOLS (default ../shared/tools next to the checkout),
#        KILN_BIN (a kiln binary to use instead of building one),
#        BENCH_KEEP=1 (keep kiln's store and buildah's bench images at the end)
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

log "peer setup (packages, base image, registry, fixtures) in $OUT"
bash "$PEER_ENV" all "$OUT" >&2
FIX="$OUT/fixtures"

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
  rm -rf "$KILN_ROOT" "$OUT/pull-root" "$OUT/pull-oci" || true
}
trap cleanup EXIT
"$KILN" load -i "$OUT/busybox.tar" >&2
"$KILN" tag busybox:latest "$REG/busybox:latest" >&2

# runstep fixture: 20 RUN steps that do nothing.
mkdir -p "$FIX/runstep"
{
  echo "FROM $REG/busybox:latest"
  for i in $(seq 1 20); do echo "RUN true # $i"; done
} > "$FIX/runstep/Dockerfile"

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
  local f=$1 s=$2 i t k=() p=()
  # warm both so that "cached" and "changed" start from a built state
  kiln_build "$f" || { log "kiln build $f failed"; return 1; }
  peer_build "$f" || { log "buildah build $f failed"; return 1; }
  for i in $(seq 1 "$ROUNDS"); do
    case "$s" in
      cold)
        t=$(now); kiln_build "$f" --no-cache; k+=("$(elapsed "$t")")
        t=$(now); peer_build "$f" --no-cache; p+=("$(elapsed "$t")") ;;
      cached)
        t=$(now); kiln_build "$f"; k+=("$(elapsed "$t")")
        t=$(now); peer_build "$f"; p+=("$(elapsed "$t")") ;;
      changed)
        touch_one "$f"; t=$(now); kiln_build "$f"; k+=("$(elapsed "$t")")
        touch_one "$f"; t=$(now); peer_build "$f"; p+=("$(elapsed "$t")") ;;
    esac
  done
  local km pm
  km=$(printf '%s\n' "${k[@]}" | median)
  pm=$(printf '%s\n' "${p[@]}" | median)
  RESULT["$f/$s"]="$km $pm"
  printf '| %s | %s | %.3f s | %.3f s | %.3f |\n' "$f" "$s" "$km" "$pm" "$(echo "$km / $pm" | bc -l)"
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
  printf '| c | %s (vs %s) | %.3f s | %.3f s | %.3f |\n' "$s" "$peer" "$km" "$pm" "$(echo "$km / $pm" | bc -l)"
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
      f"total {statistics.median(totals):.2f} s | last/first {m['451-500'] / m['1-50']:.2f} |")
PY
  rm -f "$OUT"/layers500-*.total
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
    printf '| platforms | %s, linux/amd64+linux/arm64 | %.3f s | (no peer) | |\n' \
      "$s" "$(printf '%s\n' "${k[@]}" | median)"
  done
}

fixtures=("$@")
[ ${#fixtures[@]} -gt 0 ] || fixtures=(a b c runstep push pushmemo pull layers500 platforms)
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); $(buildah --version)"
echo "Rounds: $ROUNDS, alternating kiln / buildah, medians"
echo
echo "| fixture | scenario | kiln | buildah | kiln/buildah |"
echo "|---|---|---|---|---|"
for f in "${fixtures[@]}"; do
  if [ "$f" = runstep ]; then
    run_scenario runstep cold
  elif [ "$f" = layers500 ]; then
    run_layers500
  elif [ "$f" = platforms ]; then
    run_platforms
  elif [ "$f" = push ] || [ "$f" = pushmemo ] || [ "$f" = pull ]; then
    run_transfer "$f"
  else
    for s in cold cached changed; do run_scenario "$f" "$s"; peer_prune; done
  fi
  peer_prune
done
