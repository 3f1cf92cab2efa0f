"""The widget embedded in a customer's own page on another origin (the snippet of
docs/WIDGET.md: a container, one script tag, a token URL on the customer's
backend), and a voice note sent from it."""

import http.server
import json
import os
import threading
import time

from agent_user import signed_token, wav
from conftest import WAIT_S, start_server, stop_server
from test_widget import close_before_server_stops, demo_answer, send, wait_answer_done

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Example shop</title><link rel="icon" href="data:,"></head>
<body><main><h1>Example shop</h1><p>Questions? Ask us below.</p>
<div data-chatbox-widget></div></main>
<script src="{base}/console/widget.js" data-token-url="/token" defer></script>
</body></html>"""


class Customer:
    """A customer's site: a page embedding the widget and a token endpoint."""

    def __init__(self):
        self.base = None  # chatbox's base URL, known once it runs
        self.token = None  # a token, or a function making one per request
        self.token_requests = 0
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/":
                    body, kind = PAGE.format(base=site.base).encode(), "text/html; charset=utf-8"
                elif self.path == "/token":
                    site.token_requests += 1
                    token = site.token() if callable(site.token) else site.token
                    body, kind = json.dumps({"token": token}).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_snippet_works_on_a_customer_page_on_another_origin(open_page):
    customer = Customer()
    server = start_server({"CHATBOX_ALLOWED_ORIGINS": customer.origin})
    try:
        customer.base, customer.token = server.base, server.user_token
        page = open_page(customer.origin + "/", width=375, height=740)
        page.wait_for_selector(".cbw-status:text('Connected')")
        assert customer.token_requests == 1
        # The widget's styles came with it, from chatbox.
        assert page.evaluate("() => getComputedStyle(document.querySelector('.cbw')).display") == "flex"
        send(page, "do you ship abroad?")
        wait_answer_done(page)
        assert page.locator(".cbw-assistant .cbw-body").inner_text() == demo_answer("do you ship abroad?")

        # A voice note: uploaded across origins (CORS), sent as voice_message, its
        # transcript shown in place of the note, then answered.
        page.set_input_files(".cbw-file", files=[{"name": "note.wav", "mimeType": "audio/wav",
                                                  "buffer": wav()}])
        page.wait_for_selector(".cbw-user .cbw-file-info:has-text('Voice note')")
        page.wait_for_selector(".cbw-user .cbw-body:has-text('(demo transcript)')")
        wait_answer_done(page, 2)
        second = page.locator(".cbw-assistant .cbw-body").nth(1).inner_text()
        assert "(demo transcript)" in second, second
    finally:
        close_before_server_stops(open_page)
        stop_server(server)
        customer.close()


def test_a_voice_note_is_recorded_with_the_microphone_and_answered(browser, server):
    # Chromium's fake microphone (a tone), granted without a prompt: a browser of
    # its own, since the shared one has no microphone at all.
    mic = browser.browser_type.launch(
        executable_path=os.environ.get("CHATBOX_CHROMIUM", "/usr/bin/chromium"),
        args=["--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
              "--use-fake-device-for-media-stream"])
    problems = []
    try:
        context = mic.new_context(permissions=["microphone"], viewport={"width": 375, "height": 740})
        page = context.new_page()
        page.set_default_timeout(WAIT_S * 1000)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(server.user_url)
        page.wait_for_selector(".cbw-status:text('Connected')")
        record = page.get_by_role("button", name="Record voice note")
        record.click()
        stop = page.get_by_role("button", name="Stop recording and send")
        assert stop.get_attribute("aria-pressed") == "true"
        # Stopped once sound was captured, not the container's header alone (a
        # loaded machine may take a while to start the fake microphone).
        page.wait_for_selector("button[data-has-sound]")
        stop.click()
        page.wait_for_selector(".cbw-user .cbw-file-info:has-text('Voice note')")
        page.wait_for_selector(".cbw-user .cbw-body:has-text('(demo transcript)')")
        assert "webm" in page.locator(".cbw-user .cbw-body").inner_text()
        wait_answer_done(page)
        assert "(demo transcript)" in page.locator(".cbw-assistant .cbw-body").inner_text()
        context.close()
    finally:
        mic.close()
    assert not problems, problems


def test_a_short_lived_token_is_renewed_before_it_expires_on_the_same_socket(open_page):
    customer = Customer()
    server = start_server({"CHATBOX_ALLOWED_ORIGINS": customer.origin})
    life_s = 4
    issued = []  # the exp of every token handed out

    def short_token():
        issued.append(int(time.time()) + life_s)
        return signed_token(server, "shop-42", "Shop Customer", life_s=life_s)
    try:
        customer.base, customer.token = server.base, short_token
        page = open_page("about:blank")
        sockets = []
        page.on("websocket", lambda w: sockets.append(w))
        with page.expect_websocket() as opened:
            page.goto(customer.origin + "/")
        ws = opened.value
        page.wait_for_selector(".cbw-status:text('Connected')")
        first_exp = issued[0]
        # Each token is replaced on the open socket before it runs out: wait (on
        # the server's answers) until the first one has expired.
        refreshed = 0
        while refreshed < 2 or time.time() <= first_exp + 1:
            ws.wait_for_event("framereceived", lambda f: '"auth_refreshed"' in f,
                              timeout=WAIT_S * 1000)
            refreshed += 1
        assert not ws.is_closed() and len(sockets) == 1, (ws.is_closed(), sockets)
        send(page, "still there?")
        wait_answer_done(page)
        assert page.locator(".cbw-assistant .cbw-body").inner_text() == demo_answer("still there?")
        assert len(sockets) == 1, "the chat went on without a reconnect"
    finally:
        close_before_server_stops(open_page)
        stop_server(server)
        customer.close()


def test_a_token_for_another_user_starts_a_fresh_chat_for_them(open_page):
    customer = Customer()
    server = start_server({"CHATBOX_ALLOWED_ORIGINS": customer.origin})
    users = ["shop-7", "shop-8"]  # the site's login changes between two fetches

    def token():
        sub = users.pop(0) if len(users) > 1 else users[0]
        return signed_token(server, sub, sub.title(), life_s=4)
    try:
        customer.base, customer.token = server.base, token
        page = open_page("about:blank")
        with page.expect_websocket() as opened:
            page.goto(customer.origin + "/")
        first = opened.value
        page.wait_for_selector(".cbw-status:text('Connected')")
        send(page, "my private order 1234")
        wait_answer_done(page)
        # The refresh brings shop-8's token: shop-7's chat leaves the screen and
        # shop-8 chats on a socket of their own.
        with page.expect_websocket(timeout=WAIT_S * 1000) as reopened:
            first.wait_for_event("close", timeout=WAIT_S * 1000)
        second = reopened.value
        assert "shop-8" not in first.url and second is not first
        page.wait_for_selector(".cbw-status:text('Connected')")
        assert page.locator(".cbw-msg").count() == 0, page.locator(".cbw-log").inner_text()
        send(page, "hello from shop-8")
        wait_answer_done(page)
        assert page.locator(".cbw-user .cbw-body").all_inner_texts() == ["hello from shop-8"]
    finally:
        close_before_server_stops(open_page)
        stop_server(server)
        customer.close()
