"""A user driven by a plain WebSocket client (Python `websockets`), for the agent
console's browser tests: what the user sends, and the frames the user receives,
waited for by their content (never by time)."""

import base64
import hashlib
import hmac
import io
import json
import math
import os
import struct
import time
import tomllib
import urllib.request
import wave
import zlib

from websockets.sync.client import connect

from conftest import WAIT_S


class User:
    """A WebSocket client: the dev user, or anyone whose token is given."""

    def __init__(self, server, token=None):
        self.server = server
        self.ws = connect(server.ws_url + "?token=" + (token or server.user_token),
                          open_timeout=WAIT_S)
        self.n = 0
        self.session_id = None

    def send(self, frame):
        self.n += 1
        frame.setdefault("id", f"u-{self.n}")
        if self.session_id and frame["type"] in ("user_message", "help_request",
                                                 "file_message", "voice_message"):
            frame.setdefault("session_id", self.session_id)
        self.ws.send(json.dumps(frame))
        return frame["id"]

    def until(self, pred, what):
        """Receives frames until `pred(frame)`; returns the frames received."""
        got = []
        while True:
            try:
                f = json.loads(self.ws.recv(timeout=WAIT_S))
            except TimeoutError:
                raise AssertionError(f"user: no {what} in {WAIT_S}s; got {got}")
            got.append(f)
            if f.get("type") == "session" and not self.session_id:
                self.session_id = f["session_id"]
            if pred(f):
                return got

    def ask(self, content):
        """Sends a message and waits for the AI's whole answer; its text."""
        self.send({"type": "user_message", "content": content})
        frames = self.until(lambda f: f.get("type") == "ai_done", "ai_done")
        return "".join(f["content"] for f in frames if f.get("type") == "ai_chunk")

    def upload(self, data, name):
        req = urllib.request.Request(
            self.server.base + "/upload?name=" + name, data=data, method="POST",
            headers={"Authorization": "Bearer " + self.server.user_token,
                     "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return json.loads(r.read())

    def close(self):
        self.ws.close()


def png(width=1, height=1):
    """A real red PNG of `width` x `height` (the server follows an image's
    structure to its pixels)."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav(seconds=1.0, rate=8000):
    """A spoken-length tone as 16-bit mono WAV."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 8)))
                               for i in range(int(seconds * rate))))
    return buf.getvalue()


def signed_token(server, sub, name, roles=(), life_s=3600):
    """A token for `sub`, signed (HS256) with the secret `--dev` keeps in its data
    directory, expiring `life_s` seconds from now."""
    with open(os.path.join(server.data, "dev-secrets.toml"), "rb") as fh:
        secret = tomllib.load(fh)["jwt_secret"].encode()

    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "name": name, "roles": list(roles),
                           "exp": int(time.time()) + life_s}).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def admin_token(server, sub, name):
    """Another agent's token."""
    return signed_token(server, sub, name, roles=["admin"])
