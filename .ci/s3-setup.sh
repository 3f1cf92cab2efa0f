#!/usr/bin/env bash
# Installs moto (an S3-compatible server, in its server mode) for the S3 file
# store tests, in a venv of its own that later runs reuse, and prints what to
# export. The tests start and stop `moto_server` themselves (tests/common/stores.rs).
#
# Use from .ci/run (after the SecantusDB step, which exports CHATBOX_TEST_MONGO_URI):
#   eval "$(.ci/s3-setup.sh)"
# then, besides `cargo test --workspace -- --include-ignored` (which runs
# tests/file_stores.rs), tests/files.rs once per shared store:
#   CHATBOX_TEST_FILE_STORE=s3 cargo test --test files -- --include-ignored
#   CHATBOX_TEST_FILE_STORE=gridfs cargo test --test files -- --include-ignored
set -euo pipefail

VENV="${CHATBOX_MOTO_VENV:-/var/tmp/chatbox-moto-venv}"
MOTO_VERSION="5.2.5"

if [ ! -x "$VENV/bin/moto_server" ]; then
  timeout 60 python3 -m venv "$VENV" >&2
  timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "moto[server]==$MOTO_VERSION" >&2
fi
# It must start and answer: a broken venv fails here, not in the middle of the tests.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true' EXIT
ok=
for _ in $(seq 1 300); do
  if timeout 2 python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/moto-api/', timeout=1)" 2>/dev/null; then
    ok=1
    break
  fi
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$ok" ]; then
  echo "moto_server did not answer on 127.0.0.1:$PORT" >&2
  exit 1
fi
echo "export CHATBOX_TEST_MOTO_SERVER=$VENV/bin/moto_server"
