#!/usr/bin/env bash
# Run `vmmu run` many times with distinct seeds and report every failure.
#
#   scripts/hunt.sh [-n RUNS] [-t TIMEOUT_S] [-o OUTDIR] [-- extra vmmu run flags]
#
# Each run gets its own seed. A run that exits non-zero keeps its output and
# its violation trace in OUTDIR. A run still alive after TIMEOUT_S seconds is
# treated as a hang: if gdb is installed, the backtraces of all its threads are
# saved to OUTDIR/hang-<seed>.bt before it is killed. Uses the release binary
# (build it first with `cargo build --release`).
set -u
runs=50
timeout_s=120
out=hunt-out
while getopts "n:t:o:" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    t) timeout_s=$OPTARG ;;
    o) out=$OPTARG ;;
    *) echo "usage: $0 [-n RUNS] [-t TIMEOUT_S] [-o OUTDIR] [-- vmmu run flags]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
bin=${VMMU_BIN:-target/release/vmmu}
[ -x "$bin" ] || { echo "$0: $bin not found; run cargo build --release" >&2; exit 2; }
bin=$(realpath "$bin")
mkdir -p "$out"
base=${SEED_BASE:-$RANDOM$RANDOM}
pass=0 fail=0 hang=0
for i in $(seq 1 "$runs"); do
  seed=$((base + i))
  dir=$(mktemp -d "$out/run-$seed.XXXX")
  ( cd "$dir" && exec "$bin" run --seed "$seed" "$@" >stdout 2>stderr ) &
  pid=$!
  waited=0
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$timeout_s" ]; do
    sleep 1; waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    child=$(pgrep -P "$pid" | head -1); child=${child:-$pid}
    if command -v gdb >/dev/null; then
      gdb -p "$child" -batch -ex "thread apply all bt 40" >"$out/hang-$seed.bt" 2>&1
    fi
    kill -9 "$child" "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    hang=$((hang + 1)); echo "seed $seed: HANG (backtraces in $out/hang-$seed.bt)"
    continue
  fi
  wait "$pid"; rc=$?
  if [ "$rc" -eq 0 ]; then
    pass=$((pass + 1)); rm -rf "$dir"
  else
    fail=$((fail + 1)); echo "seed $seed: exit $rc (output in $dir)"
  fi
done
echo "runs: $runs  passed: $pass  failed: $fail  hung: $hang  (flags: $*)"
[ "$fail" -eq 0 ] && [ "$hang" -eq 0 ]
