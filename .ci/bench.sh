#!/usr/bin/env bash
# CI's short side-by-side benchmarks: chatbox against the tokio-tungstenite
# baseline (`loadtest compare`, each server pinned with all its threads to CPU 0,
# loadtest on the others, when the machine has a CPU to spare), the same five
# short runs .ci/run made before (chat, idle, churn, stream, takeover, same sizes).
# Each run's JSON goes to ARTIFACTS_DIR/compare-SCENARIO.json (and its table to
# compare-SCENARIO.txt); then `loadtest check` prints every ratio beside the
# figure recorded in PERF.md (bench/recorded.toml).
#
# Fails only on what is stable on a shared machine: any error, refusal, lost
# message or connection (in either server's runs), or chatbox above 2 KiB per
# idle connection. Ratios and latencies are printed, never judged.
#
# Usage: .ci/bench.sh LOADTEST_BIN CHATBOX_BIN BASELINE_BIN ARTIFACTS_DIR
set -euo pipefail

if (($# != 4)); then
  echo "usage: $0 LOADTEST_BIN CHATBOX_BIN BASELINE_BIN ARTIFACTS_DIR" >&2
  exit 2
fi
LOADTEST=$1 CHATBOX=$2 BASELINE=$3 ARTIFACTS=$4
for bin in "$LOADTEST" "$CHATBOX" "$BASELINE"; do
  [[ -x $bin ]] || { echo "bench: $bin is not an executable" >&2; exit 2; }
done
HERE=$(cd "$(dirname "$0")/.." && pwd)
RECORDED=$HERE/bench/recorded.toml
mkdir -p "$ARTIFACTS"
started=$SECONDS

# One compare: NAME then its flags. A run that fails (loadtest exits 1 after
# writing its JSON) is remembered, and judged with the others below.
failed=()
runs=()
compare() {
  local name=$1
  shift
  echo "== bench: compare --scenario $name $*"
  local status=0
  # RUST_LIB_BACKTRACE=0: a failed run says why in one line.
  RUST_LIB_BACKTRACE=0 timeout 300 "$LOADTEST" compare --scenario "$name" "$@" \
    --chatbox "$CHATBOX" --baseline "$BASELINE" --deadline-secs 240 \
    --out "$ARTIFACTS/compare-$name.json" | tee "$ARTIFACTS/compare-$name.txt" || status=$?
  if ((status != 0)); then
    echo "bench: compare $name exited $status"
    failed+=("$name")
  fi
  if [[ -f $ARTIFACTS/compare-$name.json ]]; then
    runs+=("$ARTIFACTS/compare-$name.json")
  else
    echo "bench: compare $name wrote no JSON"
    [[ " ${failed[*]-} " == *" $name "* ]] || failed+=("$name")
  fi
}

compare chat --users 50 --secs 3 --rounds 1
compare idle --sizes 500,2000 --rounds 1 --hold-secs 1
compare churn --users 20 --secs 2 --rounds 1
compare stream --users 200 --secs 2 --rounds 1
compare takeover --users 200 --admins 4 --msg-rate 500 --secs 2 --rounds 1

echo "== bench: ratios beside the figures recorded in PERF.md ($RECORDED)"
status=0
if ((${#runs[@]} > 0)); then
  timeout 60 "$LOADTEST" check --recorded "$RECORDED" --run "${runs[@]}" \
    | tee "$ARTIFACTS/bench-check.txt" || status=$?
fi
echo "== bench: $((SECONDS - started)) s"
if ((status != 0 || ${#failed[@]} > 0)); then
  echo "bench: FAILED (check exited $status; runs that failed: ${failed[*]:-none})" >&2
  exit 1
fi
echo "bench: ok"
