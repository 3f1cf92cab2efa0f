#!/usr/bin/env bash
# bench/cluster.sh: chatbox as a cluster on this machine, under the load harness.
#
# Starts nats-server, SecantusDB (MongoDB-compatible) and release chatbox nodes on
# loopback, waits until every node is ready (/readyz 200, and in cluster mode every
# node counting all the others in chatbox_cluster_members), runs the given loadtest
# scenarios, and prints each summary (a table) and writes its JSON. Everything it starts is
# stopped on exit (also on Ctrl-C or failure); every wait and run is bounded.
#
# Usage:
#   cargo build --release -p chatbox -p chatbox-loadtest
#   bench/cluster.sh MODE 'SCENARIO [FLAGS...]' ['SCENARIO [FLAGS...]' ...]
#
# MODE:
#   cluster  three nodes in cluster mode; each scenario runs against all three
#            addresses (--addr A,B,C: user i on node i mod 3) with all three pids
#            (--pid p1,p2,p3: CPU time and peak RSS summed over the nodes).
#   single   the same scenarios against ONE node in cluster mode (bus and MongoDB,
#            alone on the bus), then against ONE node without cluster mode (same
#            MongoDB, no bus): the cluster-mode overhead (the two single runs) and
#            a cross-node hop against a cross-core one (cluster runs against the
#            single cluster-mode node, whose SINGLE_CORES cores hand work to each
#            other over the in-process mesh).
#   both     cluster, then single.
# Each scenario is a loadtest subcommand and its flags, quoted as one word; the
# script adds --addr, --pid, --first-user, --deadline-secs and --out (the secret
# comes from CHATBOX_JWT_SECRET, made up when unset). It exits 1 when any run lost,
# refused or failed something (every run's summary is still printed and kept).
# `compare` is not for here (it starts its own servers). Example (about a minute):
#   bench/cluster.sh both 'chat --users 300 --secs 5' \
#       'takeover --users 300 --admins 6 --msg-rate 600 --secs 5'
#
# Environment (defaults in brackets):
#   CHATBOX_BIN [$CARGO_TARGET_DIR or target]/release/chatbox
#   LOADTEST_BIN [next to CHATBOX_BIN]/loadtest
#   NATS_SERVER [/var/tmp/nats-venv/bin/nats-server, else nats-server on PATH]
#   SECANTUSD [/var/tmp/chatbox-mongo-venv/bin/secantusd-py, else on PATH]
#   OUT [/tmp/chatbox-cluster-bench-DATE]  summaries OUT/RUN-SCENARIO-N[-pP].json
#                     (RUN: cluster, single-cluster-mode, single-no-cluster),
#                     with each run's stdout/stderr and every server's log
#   NODE_CORES [1]    core threads per node in cluster mode
#   SINGLE_CORES [2]  core threads of the single node (2: cross-core hops happen)
#   PIN [auto]        auto: with 2+ CPUs, chatbox nodes and nats-server on CPU 0,
#                     loadtest and SecantusDB on CPU 1; none: no pinning.
#   MEMBER_TIMEOUT_MS [10000]  cluster_member_timeout_ms of every node: generous
#                     (as in tests/cluster.rs), since a saturated CPU can starve
#                     heartbeats, and a node thought gone closes what it served
#   PROCS [1]         loadtest processes per scenario, run at once, each with the
#                     scenario's flags as given (so --users/--connections are per
#                     process) and its own users: one process holds at most about
#                     19,900 connections, so 3 nodes full need PROCS=3 or more.
#                     For connect, chat, stream, takeover (churn's end-of-run check
#                     would see the other processes' connections).
#   RUN_TIMEOUT [900] seconds one loadtest run may take (passed as --deadline-secs
#                     too); START_TIMEOUT [60] seconds for any server to be ready
#
# Pinning (PIN=auto) and why: this machine has 2 CPUs. The harness, the Python
# store and the nodes all want CPU; pinned, the nodes (all three, or the single
# one) always get the same one CPU, so the cluster and single runs compare like
# for like, and neither the load generator nor SecantusDB (a Python server that
# can take a whole CPU) steals it from them. Unpinned runs measure the machine
# instead, with numbers that swing with whatever the scheduler did.
#
# Open files: every server and the harness raise `ulimit -n` to the hard limit
# (printed); one process holds at most that many sockets (20,000 here), which is
# what bounds connections per node. One loadtest process is bounded the same way.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

MODE=${1:-}
[[ $MODE == cluster || $MODE == single || $MODE == both ]] ||
  die "usage: $0 cluster|single|both 'SCENARIO [FLAGS...]'... (see the top of $0)"
shift
(($# > 0)) || die "name at least one scenario, e.g. 'chat --users 300 --secs 5'"
SCENARIOS=("$@")

HERE=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$HERE/target}
CHATBOX_BIN=${CHATBOX_BIN:-$TARGET/release/chatbox}
LOADTEST_BIN=${LOADTEST_BIN:-$(dirname "$CHATBOX_BIN")/loadtest}
pick() { if [[ -x $1 ]]; then echo "$1"; else command -v "$2" || true; fi; }
NATS_SERVER=${NATS_SERVER:-$(pick /var/tmp/nats-venv/bin/nats-server nats-server)}
SECANTUSD=${SECANTUSD:-$(pick /var/tmp/chatbox-mongo-venv/bin/secantusd-py secantusd-py)}
for bin in "$CHATBOX_BIN" "$LOADTEST_BIN" "$NATS_SERVER" "$SECANTUSD"; do
  [[ -n $bin && -x $bin ]] || die "missing executable '$bin' (see Environment at the top of $0)"
done
OUT=${OUT:-/tmp/chatbox-cluster-bench-$(date -u +%Y%m%dT%H%M%SZ)}
NODE_CORES=${NODE_CORES:-1}
SINGLE_CORES=${SINGLE_CORES:-2}
MEMBER_TIMEOUT_MS=${MEMBER_TIMEOUT_MS:-10000}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
START_TIMEOUT=${START_TIMEOUT:-60}
PIN=${PIN:-auto}
PROCS=${PROCS:-1}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/chatbox-cluster-bench.XXXXXX)

SERVER_CPUS="" HARNESS_CPUS=""
if [[ $PIN == auto ]] && (($(nproc) >= 2)); then
  SERVER_CPUS=0 HARNESS_CPUS=1
  say "pinning: chatbox nodes and nats-server on CPU 0; loadtest and SecantusDB on CPU 1"
else
  say "no pinning ($(nproc) CPUs, PIN=$PIN)"
fi
# Runs a command pinned to CPUs $1 (none when empty), with the open-files limit
# raised to the hard limit.
pinned() {
  local cpus=$1
  shift
  ulimit -n "$(ulimit -Hn)"
  if [[ -n $cpus ]]; then exec taskset -c "$cpus" "$@"; else exec "$@"; fi
}

PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    timeout 15 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  timeout 10 python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (bounded) until `curl URL` prints a line matching $2.
wait_for() {
  local url=$1 want=$2 what=$3
  timeout "$START_TIMEOUT" bash -c \
    "until curl -fsS --max-time 2 '$url' 2>/dev/null | grep -qE '$want'; do sleep 0.1; done" ||
    die "$what did not become ready within ${START_TIMEOUT}s (logs in $OUT)"
}

export CHATBOX_JWT_SECRET=${CHATBOX_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
ENCRYPTION_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

NATS_PORT=$(free_port)
MONGO_PORT=$(free_port)
say "nats-server on 127.0.0.1:$NATS_PORT, SecantusDB on 127.0.0.1:$MONGO_PORT"
(pinned "$SERVER_CPUS" "$NATS_SERVER" -a 127.0.0.1 -p "$NATS_PORT") >"$OUT/nats.log" 2>&1 &
PIDS+=($!)
(pinned "$HARNESS_CPUS" "$SECANTUSD" --host 127.0.0.1 --port "$MONGO_PORT" \
  --storage-path "$WORK/mongo") >"$OUT/secantusd.log" 2>&1 &
PIDS+=($!)
timeout "$START_TIMEOUT" bash -c "until (exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT) 2>/dev/null; do sleep 0.1; done" ||
  die "nats-server did not start (see $OUT/nats.log)"
timeout "$START_TIMEOUT" bash -c "until (exec 3<>/dev/tcp/127.0.0.1/$MONGO_PORT) 2>/dev/null; do sleep 0.1; done" ||
  die "SecantusDB did not start (see $OUT/secantusd.log)"

# Starts one chatbox node: start_node NAME CORES DATABASE CLUSTER(yes|no).
# Sets NODE_PID and NODE_ADDR.
start_node() {
  local name=$1 cores=$2 db=$3 cluster=$4 port
  port=$(free_port)
  local env=(
    CHATBOX_LISTEN="127.0.0.1:$port" CHATBOX_CORES="$cores"
    CHATBOX_ENCRYPTION_KEY="$ENCRYPTION_KEY" CHATBOX_DATA_DIR="$WORK/$name"
    CHATBOX_MONGO_URI="mongodb://127.0.0.1:$MONGO_PORT" CHATBOX_MONGO_DATABASE="$db"
    # The harness measures the server, not its abuse limits (as loadtest compare).
    CHATBOX_RATE_LIMIT_PER_MINUTE=1000000 CHATBOX_WS_FRAMES_PER_MINUTE_MAX=1000000
    CHATBOX_CONNECTIONS_PER_ADDRESS_MAX=1000000
    CHATBOX_HANDSHAKES_PER_ADDRESS_PER_SECOND=1000000
    RUST_LOG="${RUST_LOG:-warn}"
  )
  if [[ $cluster == yes ]]; then
    env+=(CHATBOX_NATS_URL="nats://127.0.0.1:$NATS_PORT" CHATBOX_NODE_ID="$name"
      CHATBOX_CLUSTER_MEMBER_TIMEOUT_MS="$MEMBER_TIMEOUT_MS")
  fi
  mkdir -p "$WORK/$name"
  (pinned "$SERVER_CPUS" env "${env[@]}" "$CHATBOX_BIN") >"$OUT/$name.log" 2>&1 &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  NODE_ADDR=127.0.0.1:$port
  wait_for "http://$NODE_ADDR/chatbox/readyz" . "$name"
  say "$name ready at $NODE_ADDR (pid $NODE_PID, $cores core(s), cluster mode: $cluster," \
    "open files $(awk '/Max open files/ {print $4}' "/proc/$NODE_PID/limits"))"
}

# Stops the chatbox nodes given by pid (SIGTERM, then bounded wait).
stop_nodes() {
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    timeout 30 tail --pid="$pid" -f /dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}

# Runs every scenario against the nodes: run_all LABEL ADDRS PIDS. With PROCS > 1
# each scenario runs as PROCS loadtest processes at once, process p with users from
# --first-user p*1000000 (its own users and admins); only the first samples the
# pids (it runs as long as the others, so its `server` field is the whole cost).
run_all() {
  local label=$1 addrs=$2 pids=$3 n=0
  for spec in "${SCENARIOS[@]}"; do
    n=$((n + 1))
    read -r -a words <<<"$spec"
    say "$label: loadtest $spec (--addr $addrs --pid $pids; $PROCS process(es))"
    local jobs=() names=() p
    for ((p = 0; p < PROCS; p++)); do
      local name="$label-${words[0]}-$n" extra=(--first-user "$((p * 1000000))")
      if ((PROCS > 1)); then name+="-p$p"; fi
      if ((p == 0)); then extra+=(--pid "$pids"); fi
      # RUST_LIB_BACKTRACE=0: a failed run says why in one line, not a backtrace.
      (pinned "$HARNESS_CPUS" env RUST_LIB_BACKTRACE=0 timeout "$((RUN_TIMEOUT + 30))" \
        "$LOADTEST_BIN" "${words[@]}" --addr "$addrs" "${extra[@]}" \
        --deadline-secs "$RUN_TIMEOUT" --out "$OUT/$name.json") \
        >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
      jobs+=($!) names+=("$name")
    done
    local i status
    for i in "${!jobs[@]}"; do
      status=0
      wait "${jobs[$i]}" || status=$?
      cat "$OUT/${names[$i]}.stderr" >&2
      cat "$OUT/${names[$i]}.stdout"
      if ((status != 0)); then
        say "${names[$i]}: loadtest exited $status (lost or refused something, see above)"
      fi
      RESULTS+=("${names[$i]} ${words[0]} $status $OUT/${names[$i]}.json")
    done
  done
}

RESULTS=()
if [[ $MODE == cluster || $MODE == both ]]; then
  addrs=() pids=()
  for i in 0 1 2; do
    start_node "node-$i" "$NODE_CORES" chatbox_bench_cluster yes
    addrs+=("$NODE_ADDR") pids+=("$NODE_PID")
  done
  for a in "${addrs[@]}"; do
    wait_for "http://$a/chatbox/metrics" '^chatbox_cluster_members 3$' "membership of 3 at $a"
  done
  say "three nodes see each other"
  run_all cluster "$(IFS=,; echo "${addrs[*]}")" "$(IFS=,; echo "${pids[*]}")"
  stop_nodes "${pids[@]}"
fi
if [[ $MODE == single || $MODE == both ]]; then
  start_node single-cluster "$SINGLE_CORES" chatbox_bench_single_cluster yes
  run_all single-cluster-mode "$NODE_ADDR" "$NODE_PID"
  stop_nodes "$NODE_PID"
  start_node single-plain "$SINGLE_CORES" chatbox_bench_single_plain no
  run_all single-no-cluster "$NODE_ADDR" "$NODE_PID"
  stop_nodes "$NODE_PID"
fi

# One line per run: the numbers the comparisons read.
say "summaries (JSON in $OUT)"
printf '%-32s %-9s %-5s %s\n' run scenario exit key-numbers
for r in "${RESULTS[@]}"; do
  read -r label scenario status file <<<"$r"
  nums=$(timeout 10 jq -c '{connected, pongs_after_hold, refused, failed, dropped,
      acks_per_sec, rtt_p50: .rtt_us.p50, rtt_p99: .rtt_us.p99,
      chunks_per_sec, first_chunk_p99: .first_chunk_us.p99, messages_per_sec,
      delivery_p50: .delivery_us.p50, delivery_p99: .delivery_us.p99,
      sent, lost, duplicated, errors, cpu_secs: .server.cpu_secs,
      rss_kib_peak: .server.rss_kib_peak} | with_entries(select(.value != null))' \
    "$file" 2>/dev/null || echo '(no summary)')
  printf '%-32s %-9s %-5s %s\n' "$label" "$scenario" "$status" "$nums"
  ((status == 0)) || FAILED=1
done
# Every run's summary is printed and kept; the script fails if any run did.
exit "${FAILED:-0}"
