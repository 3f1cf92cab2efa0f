"""Helpers of .ci/api-checks.sh: mint an HS256 JWT, and seed a running chatbox
with a few sessions through its WebSocket (real clients, real frames).

    python3 api_seed.py token SECRET SUB [admin]
    python3 api_seed.py seed WS_URL SECRET
    python3 api_seed.py upload BASE_URL TOKEN
    python3 api_seed.py spec SPEC_IN SPEC_OUT FILE_ID
    python3 api_seed.py tally PREFIX HAR_FILE...

`tally` counts the statuses schemathesis got per documented operation (from its
HAR report) and fails when an operation never got a 2xx: a run in which every
request was refused (a token the server does not take, data deleted too early)
would otherwise pass, every refusal being documented.

Seeding makes the admin API's answers non-trivial: three users with finished AI
answers (tokens counted), one session waiting for a human, one taken over by an
admin (admin_join, admin_message, admin_leave: an audit trail and an admin
message), one ended. It takes well under a second with the demo provider.

`upload` stores one small GIF for the token's user through `POST /upload` and
prints its id; `spec` writes a copy of the API description whose `file_id`
example is that id, so that schemathesis's examples phase downloads a file that
exists (200, and 206/416 with the `Range` examples) instead of only 404s.
"""

import asyncio
import base64
import hashlib
import hmac
import collections
import json
import re
import secrets
import sys
import time
import urllib.request

import websockets


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, sub: str, admin: bool, ttl: int = 3600) -> str:
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"sub": sub, "name": sub, "exp": int(time.time()) + ttl,
              "roles": ["admin"] if admin else []}
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64(sig)


async def until(ws, pred, what):
    """The next frame matching `pred`; an `error` frame or 10 s of silence fails."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if pred(frame):
            return frame
        if frame.get("type") == "error":
            raise SystemExit(f"seed: error frame while waiting for {what}: {frame}")


# Client message ids unique per run: a resent id is acked as a duplicate and not
# answered, so a second seeding of the same data directory would wait forever.
RUN = secrets.token_hex(4)


async def chat(url, secret, user, texts):
    """One new session of `user`, each text answered; returns its id."""
    async with websockets.connect(url, additional_headers={
            "Authorization": "Bearer " + token(secret, user, False)}) as ws:
        sid = None
        for i, text in enumerate(texts):
            msg = {"type": "user_message", "id": f"{RUN}-{user}-{i}", "content": text}
            if sid:
                msg["session_id"] = sid
            await ws.send(json.dumps(msg))
            done = await until(ws, lambda f: f.get("type") == "ai_done", "ai_done")
            sid = done["session_id"]
        return sid


async def seed(url, secret):
    sessions = {}
    for user in ("alice", "bob", "carol"):
        sessions[user] = await chat(url, secret, user,
                                    [f"hello from {user}", "my order is late"])
    async with websockets.connect(url, additional_headers={
            "Authorization": "Bearer " + token(secret, "dave", False)}) as ws:
        await ws.send(json.dumps({"type": "user_message", "id": f"{RUN}-dave-0",
                                  "content": "I want a human"}))
        done = await until(ws, lambda f: f.get("type") == "ai_done", "ai_done")
        await ws.send(json.dumps({"type": "help_request",
                                  "session_id": done["session_id"]}))
        await until(ws, lambda f: f.get("type") == "help_requested", "help_requested")
    async with websockets.connect(url, additional_headers={
            "Authorization": "Bearer " + token(secret, "agent-1", True)}) as ws:
        sid = sessions["bob"]
        await ws.send(json.dumps({"type": "admin_join", "session_id": sid}))
        await until(ws, lambda f: f.get("type") == "admin_joined", "admin_joined")
        await ws.send(json.dumps({"type": "admin_message", "session_id": sid,
                                  "content": "An agent here: let me check."}))
        await until(ws, lambda f: f.get("type") == "admin_message", "admin_message")
        await ws.send(json.dumps({"type": "admin_leave", "session_id": sid}))
        await until(ws, lambda f: f.get("type") == "admin_left", "admin_left")
    # The admin API ends one (http://host:port/prefix from ws://host:port/prefix/ws).
    base = "http" + url[len("ws"):-len("/ws")]
    req = urllib.request.Request(
        f"{base}/admin/sessions/{sessions['carol']}/end", method="POST",
        headers={"Authorization": "Bearer " + token(secret, "agent-1", True)})
    with urllib.request.urlopen(req, timeout=10) as answer:
        assert answer.status == 200, answer.status
    print(json.dumps(sessions))


# A 1x1 transparent GIF: a real file of an allowed type.
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01"
       b"\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def upload(base, bearer):
    req = urllib.request.Request(
        f"{base}/upload?name=seed.gif", data=GIF, method="POST",
        headers={"Authorization": "Bearer " + bearer,
                 "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=10) as answer:
        assert answer.status == 201, answer.status
        body = json.load(answer)
    assert body["mime"] == "image/gif" and body["size"] == len(GIF), body
    print(body["file_id"])


def spec(spec_in, spec_out, file_id):
    import yaml  # schemathesis's own dependency, in the same venv
    with open(spec_in) as f:
        doc = yaml.safe_load(f)
    doc["components"]["parameters"]["FileId"]["example"] = file_id
    with open(spec_out, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


OPERATIONS = [
    ("GET", r"/healthz"), ("GET", r"/readyz"), ("GET", r"/metrics"), ("GET", r"/ws"),
    ("GET", r"/admin/sessions"), ("GET", r"/admin/sessions/[^/]+"),
    ("POST", r"/admin/sessions/[^/]+/end"), ("GET", r"/admin/metrics"),
    ("GET", r"/admin/users/[^/]+/export"), ("DELETE", r"/admin/users/[^/]+"),
    ("POST", r"/admin/users/[^/]+/disconnect"),
    ("POST", r"/upload"), ("GET", r"/files/[^/]+"),
]


def tally(prefix, har_files):
    """Statuses per documented operation; exit 1 if one tested never got a 2xx."""
    entries = []
    for har_file in har_files:
        with open(har_file) as f:
            entries += json.load(f)["log"]["entries"]
    counts = collections.defaultdict(collections.Counter)
    for e in entries:
        method = e["request"]["method"]
        path = e["request"]["url"].split("?")[0].split(prefix, 1)[-1]
        for op_method, pattern in OPERATIONS:
            if method == op_method and re.fullmatch(pattern, path):
                counts[f"{method} {pattern}"][e["response"]["status"]] += 1
                break
        else:
            counts["(undocumented method or path)"][e["response"]["status"]] += 1
    missing = []
    for op, statuses in sorted(counts.items()):
        print(f"  {op}: " + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())))
        if not op.startswith("(") and not any(200 <= s < 300 for s in statuses):
            missing.append(op)
    if missing:
        raise SystemExit(f"never answered with a 2xx: {', '.join(missing)}")


def main():
    if sys.argv[1] == "token":
        print(token(sys.argv[2], sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "admin"))
    elif sys.argv[1] == "seed":
        asyncio.run(seed(sys.argv[2], sys.argv[3]))
    elif sys.argv[1] == "upload":
        upload(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "spec":
        spec(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "tally":
        tally(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
