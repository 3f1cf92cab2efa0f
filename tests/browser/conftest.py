"""Browser tests: a real chatbox (`--dev`, a data directory of its own) and
Debian's chromium driven by Playwright. Set up by `.ci/browser-setup.sh`; run by
`tests/browser/run.sh` (which `.ci/run` calls).

Fixtures:
- `server`: a running `chatbox --dev`: its base URL and the two console links
  (agent, user) with their tokens, as `--dev` printed them.
- `browser`: one headless chromium for the whole run.
- `open_page(url, width=1280, height=800)`: a page in a fresh context (its own
  storage), whose console errors and uncaught exceptions fail the test.
"""

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading

import pytest
from playwright.sync_api import expect, sync_playwright

ARTIFACTS = os.environ.get("CHATBOX_BROWSER_ARTIFACTS", tempfile.gettempdir())
WAIT_S = 20
# Playwright's assertions wait 5 s by default: too short on a loaded 2-core CI
# machine; they wait as long as the rest of the harness does.
expect.set_options(timeout=WAIT_S * 1000)


class Server:
    def __init__(self, proc, lines):
        self.proc = proc
        self.lines = lines
        self.base = None
        self.agent_url = None
        self.user_url = None
        self.user_token = None
        self.admin_token = None

    def read_banner(self):
        while None in (self.base, self.agent_url, self.user_url, self.user_token, self.admin_token):
            try:
                line = self.lines.get(timeout=WAIT_S).strip()
            except queue.Empty:
                raise AssertionError("chatbox --dev printed no banner in time")
            if m := re.match(r"chatbox listening on (\S+)", line):
                self.base = m.group(1)
            elif line.startswith("agent console:"):
                self.agent_url = line.split(":", 1)[1].strip()
            elif line.startswith("user chat:"):
                self.user_url = line.split(":", 1)[1].strip()
            elif line.startswith("user token:"):
                self.user_token = line.split(":", 1)[1].strip()
            elif line.startswith("admin token:"):
                self.admin_token = line.split(":", 1)[1].strip()

    @property
    def ws_url(self):
        return self.base.replace("http://", "ws://") + "/ws"


def start_server(extra_env=None):
    binary = os.environ.get("CHATBOX_BIN")
    assert binary, "set CHATBOX_BIN to the chatbox binary (tests/browser/run.sh does)"
    data = tempfile.mkdtemp(prefix="chatbox-browser-")
    env = dict(os.environ)
    env.update({
        "CHATBOX_LISTEN": "127.0.0.1:0",
        "CHATBOX_DATA_DIR": data,
        "CHATBOX_CORES": "2",
        # Slow enough to see an answer arrive chunk by chunk, and to press Stop.
        "CHATBOX_DEMO_CHUNK_DELAY_MS": "40",
        "RUST_LOG": "warn",
    })
    env.update(extra_env or {})
    proc = subprocess.Popen([binary, "--dev"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    server = Server(proc, lines)
    server.data = data
    server.read_banner()
    return server


def stop_server(server):
    server.proc.terminate()
    try:
        server.proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    shutil.rmtree(server.data, ignore_errors=True)


@pytest.fixture
def server():
    s = start_server()
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def browser():
    chromium = os.environ.get("CHATBOX_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic",
                  "--no-first-run"],
        )
        yield b
        b.close()


class Pages:
    """Opens pages in fresh contexts and collects their console errors and
    uncaught exceptions; `allow(pattern)` excuses errors a test provokes."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.problems = []
        self.allowed = []

    def __call__(self, url, width=1280, height=800):
        context = self.browser.new_context(viewport={"width": width, "height": height})
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_S * 1000)
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.goto(url)
        return page

    def allow(self, pattern):
        self.allowed.append(re.compile(pattern))

    def close(self):
        for c in self.contexts:
            c.close()
        left = [p for p in self.problems if not any(a.search(p) for a in self.allowed)]
        assert not left, left


@pytest.fixture
def open_page(browser):
    """Opens `url` in a fresh context; fails the test on any console error or
    uncaught exception in it (see `Pages`)."""
    pages = Pages(browser)
    yield pages
    pages.close()


def screenshot(page, name):
    """Keeps a screenshot as a CI artifact."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def axe_violations(page, impacts=("serious", "critical")):
    """Runs axe-core in the page: (rule, help, targets) of each violation of these
    impacts. axe is evaluated through the DevTools protocol: a <script> tag would
    be refused by the console's own CSP (no inline script)."""
    with open(os.environ["CHATBOX_AXE_JS"], encoding="utf-8") as fh:
        page.evaluate(fh.read() + "\n;void 0")
    result = page.evaluate("async () => await axe.run(document)")
    bad = [v for v in result["violations"] if v.get("impact") in impacts]
    return [(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in bad]
