#!/usr/bin/env bash
# bench/hop.sh: the cost of a cross-node hop. Two release nodes in cluster mode
# (one core each) and nats-server share CPU 0; SecantusDB and the client (hop,
# loadtest/src/bin/hop.rs) run on CPU 1. `hop` measures the round trip of a frame
# the owner answers without storage, for users owned by node-1: connected to
# node-1 (no hop) and to node-0 (the edge forwards each frame over the bus and the
# answer comes back the same way). Three alternating runs of each.
#
#   cargo build --release -p chatbox -p chatbox-loadtest
#   bench/hop.sh            # prints one JSON line per run
#
# Environment: CHATBOX_BIN, HOP_BIN (default: $CARGO_TARGET_DIR/release/...),
# NATS_SERVER, SECANTUSD (defaults as in bench/cluster.sh), CONNECTIONS [20],
# ROUNDS [500].
set -euo pipefail
TARGET=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}
CHATBOX_BIN=${CHATBOX_BIN:-$TARGET/release/chatbox}
HOP_BIN=${HOP_BIN:-$TARGET/release/hop}
NATS_SERVER=${NATS_SERVER:-/var/tmp/nats-venv/bin/nats-server}
SECANTUSD=${SECANTUSD:-/var/tmp/chatbox-mongo-venv/bin/secantusd-py}
for bin in "$CHATBOX_BIN" "$HOP_BIN" "$NATS_SERVER" "$SECANTUSD"; do
  [[ -x $bin ]] || { echo "hop.sh: missing executable $bin" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/chatbox-hop.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ready() { # URL: bounded wait for a 200
  for _ in $(seq 300); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done
  echo "hop.sh: $1 never answered" >&2; exit 1
}
NATS_PORT=$(port) MONGO_PORT=$(port)
taskset -c 0 "$NATS_SERVER" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
mkdir -p "$WORK/mongo"
taskset -c 1 "$SECANTUSD" --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$WORK/mongo" \
  >"$WORK/mongo.log" 2>&1 & PIDS+=($!)
export CHATBOX_JWT_SECRET=${CHATBOX_JWT_SECRET:-hop-secret-0123456789abcdef0123456789abcdef}
export CHATBOX_ENCRYPTION_KEY=${CHATBOX_ENCRYPTION_KEY:-$(printf 'ab%.0s' {1..32})}
ADDRS=()
for i in 0 1; do
  p=$(port)
  mkdir -p "$WORK/d$i"
  CHATBOX_DATA_DIR=$WORK/d$i CHATBOX_LISTEN=127.0.0.1:$p CHATBOX_CORES=1 \
    CHATBOX_NATS_URL=nats://127.0.0.1:$NATS_PORT CHATBOX_MONGO_URI=mongodb://127.0.0.1:$MONGO_PORT \
    CHATBOX_MONGO_DATABASE=hop CHATBOX_NODE_ID=node-$i CHATBOX_CLUSTER_MEMBER_TIMEOUT_MS=10000 \
    CHATBOX_LLM_PROVIDER=demo timeout 900 taskset -c 0 "$CHATBOX_BIN" >"$WORK/n$i.log" 2>&1 & PIDS+=($!)
  ADDRS+=("127.0.0.1:$p")
done
for a in "${ADDRS[@]}"; do ready "http://$a/chatbox/readyz"; done
for _ in $(seq 300); do
  curl -s "http://${ADDRS[0]}/chatbox/metrics" | grep -q '^chatbox_cluster_members 2' && break
  sleep 0.1
done
HOP=(timeout 300 taskset -c 1 "$HOP_BIN" --nodes node-0,node-1 --owner node-1
  --connections "${CONNECTIONS:-20}" --rounds "${ROUNDS:-500}")
for _ in 1 2 3; do
  "${HOP[@]}" --addr "${ADDRS[1]}"   # the owner itself: no hop
  "${HOP[@]}" --addr "${ADDRS[0]}"   # through the edge: a hop each way
done
