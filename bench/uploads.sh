#!/usr/bin/env bash
# Upload cost of removing location metadata: the same size of JPEG (walked and
# cleaned as it streams) and of PDF (stored as it comes), uploaded in turns to one
# release chatbox pinned to one core (its pool included), the client on another.
# Prints the median time of each and their ratio. Usage: bench/uploads.sh [MiB] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-8}
ROUNDS=${2:-15}
BIN=${CHATBOX_BIN:-${CARGO_TARGET_DIR:-target}/release/chatbox}
DIR=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
python3 - "$DIR" "$MIB" <<'PY'
import os, struct, sys
d, mib = sys.argv[1], int(sys.argv[2])
body = os.urandom(mib << 20)
def seg(m, p): return b"\xff" + bytes([m]) + struct.pack(">H", len(p) + 2) + p
tiff = bytes.fromhex("4d4d002a00000008000201120003000000010006000088250004000000010000002600000000"
                     "00020001000200000002" "4e000000" "000200050000000300000044" "00000000") + bytes(24)
jpeg = b"\xff\xd8" + seg(0xE1, b"Exif\0\0" + tiff) + seg(0xDA, b"\x01\x01\0\0\x3f\0") \
    + body.replace(b"\xff", b"\xfe") + b"\xff\xd9"
open(os.path.join(d, "photo.jpg"), "wb").write(jpeg)
open(os.path.join(d, "doc.pdf"), "wb").write(b"%PDF-1.4\n" + body[:len(jpeg) - 9])
PY
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CHATBOX_DATA_DIR="$DIR/data" CHATBOX_LISTEN="127.0.0.1:$PORT" CHATBOX_CORES=1 \
  CHATBOX_UPLOAD_BYTES_MAX=$(( (MIB + 1) << 20 )) CHATBOX_UPLOAD_QUOTA_BYTES=0 \
  CHATBOX_UPLOAD_RATE_LIMIT_PER_MINUTE=100000 RUST_LOG=warn \
  taskset -c 1 "$BIN" --dev > "$DIR/out" 2>/dev/null &
PID=$!
for _ in $(seq 1 100); do grep -q "user token" "$DIR/out" 2>/dev/null && break; sleep 0.1; done
TOKEN=$(awk '/user token:/ {print $3}' "$DIR/out")
up() {
  taskset -c 0 curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" \
    --data-binary @"$DIR/$1" "http://127.0.0.1:$PORT/chatbox/upload?name=$1"
}
for _ in $(seq 1 "$ROUNDS"); do
  up photo.jpg >> "$DIR/jpg.t"
  up doc.pdf >> "$DIR/pdf.t"
done
python3 - "$DIR" "$MIB" <<'PY'
import statistics, sys
d, mib = sys.argv[1], int(sys.argv[2])
j = statistics.median(float(x) for x in open(f"{d}/jpg.t"))
p = statistics.median(float(x) for x in open(f"{d}/pdf.t"))
print(f"{mib} MiB upload, median of each: JPEG (location removed) {j*1000:.1f} ms, "
      f"PDF (as it comes) {p*1000:.1f} ms, ratio {j/p:.2f}")
PY
