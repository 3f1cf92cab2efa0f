#!/usr/bin/env bash
# API description checks (issue 14): validates docs/openapi.yaml, then runs
# schemathesis against the release binary with an admin token, and the file
# endpoints (upload, download) with a user's token too: no 5xx, and every
# response's status, content type, headers and body as documented.
#
#   .ci/api-checks.sh RELEASE_BINARY
#
# Offline but for PyPI: the tools go into their own venv (reused when its pins
# match). The server runs on 127.0.0.1 with a temporary data directory, test
# secrets (not --dev) and the offline demo model, and is seeded through its
# WebSocket with a few sessions (.ci/api_seed.py, about a second) so that the
# admin API answers with real transcripts, exports and metrics; one file is
# uploaded for the test user, and schemathesis runs on a copy of the spec whose
# `file_id` example is that file's id, so downloads get 200/206, not only 404.
set -euo pipefail

BIN=$(realpath "${1:?usage: .ci/api-checks.sh RELEASE_BINARY}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SPEC="$ROOT/docs/openapi.yaml"
VENV=/var/tmp/chatbox-api-venv
PINS="schemathesis==4.32.5 openapi-spec-validator==0.9.0 websockets==17.4"
# Per operation; with the coverage and stateful phases this is ~1,000 requests.
MAX_EXAMPLES=${CHATBOX_API_MAX_EXAMPLES:-60}

step() { printf '\n== %s\n' "$*"; }

step "tools ($PINS)"
if [ ! -x "$VENV/bin/schemathesis" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
    rm -rf "$VENV"
    timeout 60 python3 -m venv "$VENV"
    # shellcheck disable=SC2086 # word splitting of the pins is wanted
    timeout 600 "$VENV/bin/pip" install --quiet $PINS
    echo "$PINS" > "$VENV/.pins"
fi
PY="$VENV/bin/python"

step "validate $SPEC"
timeout 60 "$VENV/bin/openapi-spec-validator" "$SPEC"

WORK=$(mktemp -d /tmp/chatbox-api-checks.XXXXXX)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(timeout 10 "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SECRET="api-checks-jwt-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
BASE="http://127.0.0.1:$PORT/chatbox"

step "start $BIN on 127.0.0.1:$PORT"
# The admin and upload rate limits are raised so that the run tests answers,
# not the limiters (their 429s are documented and tested in tests/); everything
# else is at its default.
env -i PATH="$PATH" \
    CHATBOX_LISTEN="127.0.0.1:$PORT" \
    CHATBOX_CORES=2 \
    CHATBOX_DATA_DIR="$WORK/data" \
    CHATBOX_JWT_SECRET="$SECRET" \
    CHATBOX_ENCRYPTION_KEY="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
    CHATBOX_LLM_PROVIDER=demo \
    CHATBOX_DEMO_CHUNK_DELAY_MS=0 \
    CHATBOX_ADMIN_RATE_LIMIT_PER_MINUTE=1000000 \
    CHATBOX_UPLOAD_RATE_LIMIT_PER_MINUTE=1000000 \
    RUST_LOG=warn \
    "$BIN" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
ready=
for _ in $(seq 100); do
    if curl -fsS --max-time 2 "$BASE/readyz" > /dev/null 2>&1; then ready=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ready" ]; then
    echo "server did not become ready:" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi

step "seed sessions through the WebSocket"
timeout 60 "$PY" "$ROOT/.ci/api_seed.py" seed "ws://127.0.0.1:$PORT/chatbox/ws" "$SECRET"

ADMIN=$("$PY" "$ROOT/.ci/api_seed.py" token "$SECRET" api-checks-admin admin)
USER=$("$PY" "$ROOT/.ci/api_seed.py" token "$SECRET" api-checks-user)

step "seed a file of the user's"
FILE_ID=$(timeout 30 "$PY" "$ROOT/.ci/api_seed.py" upload "$BASE" "$USER")
echo "file $FILE_ID"
RUN_SPEC="$WORK/openapi.yaml"
timeout 30 "$PY" "$ROOT/.ci/api_seed.py" spec "$SPEC" "$RUN_SPEC" "$FILE_ID"
# Someone else's file is the same 404 as no file (schemathesis cannot tell).
OTHER=$("$PY" "$ROOT/.ci/api_seed.py" token "$SECRET" api-checks-other)
status=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' \
    -H "Authorization: Bearer $OTHER" "$BASE/files/$FILE_ID")
if [ "$status" != 404 ]; then
    echo "another user's download of $FILE_ID: $status, want 404" >&2
    exit 1
fi
CHECKS=not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance,response_headers_conformance
st() {
    # --request-timeout bounds each request, timeout the whole pass. Run from
    # $WORK: schemathesis keeps a .schemathesis/ cache in its working directory.
    (cd "$WORK" && timeout 150 "$VENV/bin/schemathesis" run "$RUN_SPEC" --url "$BASE" \
        --checks "$CHECKS" --request-timeout 10 --no-color \
        --suppress-health-check too_slow,filter_too_much "$@")
}

step "schemathesis: every operation but the delete, with an admin token"
# GET /ws is left out of this pass: with a valid token a conforming upgrade
# succeeds, and after a 101 the test client's pooled connection speaks
# WebSocket, so its next request is read as frames (the server answers close
# 1002 "reserved opcode", correctly). The refusals are checked below, the
# upgrade itself by the seeding's real WebSocket clients.
# DELETE /admin/users/{id} has a pass of its own, after this one: the stateful
# phase follows links from the session list, and a delete there wipes the seeded
# users before the transcript and end operations ever see a real session.
st -H "Authorization: Bearer $ADMIN" --exclude-path /ws \
    --exclude-operation-id deleteUser \
    --max-examples "$MAX_EXAMPLES" --phases examples,coverage,fuzzing,stateful \
    --report har --report-har-path "$WORK/admin.har"
step "schemathesis: upload and download with a user's token"
# Before the delete pass, which could (if unlikely) draw the user's id. The
# stateful phase downloads what it uploaded (the 201's link).
st -H "Authorization: Bearer $USER" \
    --include-operation-id uploadFile --include-operation-id getFile \
    --max-examples "$MAX_EXAMPLES" --phases examples,coverage,fuzzing,stateful \
    --report har --report-har-path "$WORK/user.har"
step "schemathesis: the delete, with an admin token"
st -H "Authorization: Bearer $ADMIN" --include-operation-id deleteUser \
    --max-examples "$MAX_EXAMPLES" --phases examples,coverage,fuzzing \
    --report har --report-har-path "$WORK/delete.har"
echo "statuses per operation, admin token:"
"$PY" "$ROOT/.ci/api_seed.py" tally /chatbox "$WORK/admin.har" "$WORK/delete.har"
echo "statuses per operation, user token:"
"$PY" "$ROOT/.ci/api_seed.py" tally /chatbox "$WORK/user.har"

step "schemathesis: admin API with a user's token (403); WebSocket and files without one (401)"
st -H "Authorization: Bearer $USER" --include-path-regex '^/admin/' \
    --max-examples 5 --phases examples,fuzzing
st --include-path /ws --max-examples "$MAX_EXAMPLES" --phases examples,coverage,fuzzing
st --include-operation-id uploadFile --include-operation-id getFile \
    --max-examples 5 --phases examples,fuzzing

step "server log (warnings and errors)"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server died during the run:" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi
grep -E ' (WARN|ERROR) ' "$WORK/server.log" | tail -20 || true
echo "api checks passed"
