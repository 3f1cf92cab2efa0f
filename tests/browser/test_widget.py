"""The chat widget (console/widget.js) on our own chat page, against a real
chatbox --dev whose demo model streams a chunk every 40 ms.

The agent side, where a test needs one, is a plain WebSocket client (Python
`websockets`) with the admin token."""

import urllib.request

import pytest

from agent_user import User, png
from conftest import WAIT_S, axe_violations, screenshot, start_server, stop_server


def demo_answer(prompt):
    """What the demo model answers to `prompt` (src/llm/demo.rs)."""
    shown = " ".join(prompt.split())[:200]
    return ("[demo] This answer comes from chatbox's offline demo provider, not a language "
            f"model. You wrote: \"{shown}\". Set CHATBOX_LLM_PROVIDER to openai or anthropic "
            "to get real answers.")


def send(page, text):
    box = page.get_by_label("Your message")
    box.fill(text)
    box.press("Enter")


def wait_answer_done(page, n=1):
    """Waits until `n` assistant answers are shown and none is streaming."""
    page.locator(".cbw-assistant").nth(n - 1).wait_for()
    page.locator(".cbw-streaming").wait_for(state="detached")


def answer_texts(page):
    return page.eval_on_selector_all(".cbw-assistant .cbw-body", "els => els.map(e => e.textContent)")


def record_states(page):
    """Records every distinct text of the first answer as the page changes."""
    page.evaluate("""() => {
        window.__states = [];
        const log = document.querySelector('.cbw-log');
        new MutationObserver(() => {
            const b = document.querySelector('.cbw-assistant .cbw-body');
            if (!b) return;
            const t = b.textContent, s = window.__states;
            if (s[s.length - 1] !== t) s.push(t);
        }).observe(log, {subtree: true, childList: true, characterData: true});
    }""")


def test_answer_streams_in_token_by_token(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    # The streamed text is announced politely to screen readers.
    assert page.get_attribute(".cbw-log", "aria-live") == "polite"
    record_states(page)
    send(page, "hello there")
    page.wait_for_selector(".cbw-user:has-text('hello there')")
    page.wait_for_selector(".cbw-streaming")
    wait_answer_done(page)
    states = page.evaluate("() => window.__states")
    full = demo_answer("hello there")
    assert states[-1] == full
    # Seen growing: many distinct states, each a prefix of the next.
    growing = [s for s in states if s]
    assert len(growing) >= 5, growing
    for a, b in zip(growing, growing[1:]):
        assert b.startswith(a) and len(b) > len(a), (a, b)


def test_stop_ends_the_answer_early_and_shows_it_stopped(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    send(page, "please tell me everything")
    page.wait_for_selector(".cbw-streaming")
    stop = page.get_by_role("button", name="Stop")
    stop.click()
    page.wait_for_selector(".cbw-assistant.cbw-cancelled .cbw-stopped:text('Stopped')")
    assert page.locator(".cbw-streaming").count() == 0
    assert not stop.is_visible()
    text = answer_texts(page)[0]
    full = demo_answer("please tell me everything")
    assert full.startswith(text) and len(text) < len(full), text


XSS = ("<img src=x onerror=window.__xss=1> **bold** and [click me](javascript:window.__xss=2) "
       "and [docs](https://example.com/docs) and `<b>code</b>`")


def assert_safe(page, scope):
    """In `scope`: markup shown as text, no image, no javascript: link, nothing ran."""
    assert page.locator(f"{scope} img").count() == 0
    assert page.locator(f"{scope} b").count() == 0
    assert page.locator(f"{scope} a[href^='javascript']").count() == 0
    texts = page.eval_on_selector_all(f"{scope} .cbw-body", "els => els.map(e => e.textContent)")
    assert any("<img src=x onerror=window.__xss=1>" in t for t in texts), texts
    assert any("[click me](javascript:window.__xss=2)" in t for t in texts), texts
    link = page.locator(f"{scope} a:has-text('docs')").first
    assert link.get_attribute("href") == "https://example.com/docs"
    assert "noopener" in link.get_attribute("rel")
    assert page.locator(f"{scope} strong:text('bold')").count() >= 1
    assert page.locator(f"{scope} code:text('<b>code</b>')").count() >= 1
    assert page.evaluate("() => window.__xss") is None


def test_markup_and_script_links_in_messages_are_shown_as_text(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    send(page, XSS)
    wait_answer_done(page)
    # The user's own message and the answer echoing it.
    assert_safe(page, ".cbw-user")
    assert_safe(page, ".cbw-assistant")


def test_a_dropped_socket_reconnects_and_the_answer_is_whole_and_not_doubled(open_page):
    # Slower chunks: the drop lands in the middle of the answer.
    server = start_server({"CHATBOX_DEMO_CHUNK_DELAY_MS": "150"})
    try:
        page = open_page(server.user_url)
        page.wait_for_selector(".cbw-status:text('Connected')")
        prompt = "what happens when my network drops in the middle of an answer"
        send(page, prompt)
        page.wait_for_selector(".cbw-assistant .cbw-body:has-text('offline demo')")
        page.context.set_offline(True)
        page.wait_for_selector(".cbw-status:text('Reconnecting')")
        page.context.set_offline(False)
        page.wait_for_selector(".cbw-status:text('Connected')")
        wait_answer_done(page)
        assert answer_texts(page) == [demo_answer(prompt)]
        assert page.locator(".cbw-user").count() == 1
        assert page.locator(".cbw-cancelled").count() == 0
    finally:
        close_before_server_stops(open_page)
        stop_server(server)


def test_a_reload_keeps_the_session_and_its_history(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    # The token left the address bar as soon as the page read it.
    assert "token=" not in page.url
    send(page, "first question")
    wait_answer_done(page)
    session = page.evaluate("() => Object.entries(localStorage).find(([k]) => k.includes('session'))[1]")
    page.reload()
    page.wait_for_selector(".cbw-user:has-text('first question')")
    wait_answer_done(page)
    assert answer_texts(page) == [demo_answer("first question")]
    assert page.locator(".cbw-user").count() == 1
    send(page, "second question")
    wait_answer_done(page, 2)
    assert answer_texts(page)[1] == demo_answer("second question")
    after = page.evaluate("() => Object.entries(localStorage).find(([k]) => k.includes('session'))[1]")
    assert after == session


def close_before_server_stops(pages):
    """Closes the test's pages first: a widget whose server went away would try to
    reconnect, and the browser logs each refused attempt as a console error."""
    for context in pages.contexts:
        context.close()
    pages.contexts.clear()


def test_talk_to_a_human_shows_the_agent_and_their_messages(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    send(page, "I need a person")
    wait_answer_done(page)
    agent = User(server, server.admin_token)
    is_type = lambda kind: lambda f: f.get("type") == kind  # noqa: E731
    page.get_by_role("button", name="Talk to a human").click()
    sid = agent.until(is_type("help_requested"), "help_requested")[-1]["session_id"]
    page.wait_for_selector(".cbw-note:has-text('asked for a person')")
    agent.send({"type": "admin_join", "session_id": sid})
    page.wait_for_selector(".cbw-agent:text('You are talking to Dev Admin')")
    agent.send({"type": "admin_message", "session_id": sid, "content": XSS})
    page.wait_for_selector(".cbw-admin .cbw-who:text('Dev Admin')")
    assert_safe(page, ".cbw-admin")
    # What the user writes now reaches the agent, and the AI stays quiet.
    send(page, "thanks for joining")
    relayed = agent.until(is_type("user_message"), "user_message")[-1]
    assert relayed["content"] == "thanks for joining"
    agent.send({"type": "admin_leave", "session_id": sid})
    page.wait_for_selector(".cbw-note:has-text('Dev Admin left')")
    assert page.locator(".cbw-agent").is_hidden()
    agent.close()
    assert page.locator(".cbw-assistant").count() == 1


def test_a_file_is_uploaded_and_sent_into_the_conversation(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    page.get_by_label("Your message").fill("this is my screen")
    page.set_input_files(".cbw-file", files=[{"name": "screen.png", "mimeType": "image/png",
                                              "buffer": png(2, 2)}])
    page.wait_for_selector(".cbw-user .cbw-file-info:has-text('screen.png')")
    page.wait_for_selector(".cbw-user[data-message-id]")
    wait_answer_done(page)
    assert "this is my screen" in page.locator(".cbw-user .cbw-body").inner_text()


@pytest.mark.parametrize("width,height", [(1280, 800), (375, 740)])
def test_accessible_at_desktop_and_phone_width(server, open_page, width, height):
    page = open_page(server.user_url, width=width, height=height)
    page.wait_for_selector(".cbw-status:text('Connected')")
    send(page, "Can you show me a list?\n\n- one\n- **two**\n\n```\ncode here\n```")
    wait_answer_done(page)
    # Keyboard: the message box is reachable and labelled; every button has a name.
    page.get_by_label("Your message").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Send"
    for scheme in ("dark", "light"):
        page.emulate_media(color_scheme=scheme)
        violations = axe_violations(page)
        assert not violations, (scheme, violations)
        if scheme == "dark":
            screenshot(page, f"widget-{width}x{height}-dark")
    # Nothing wider than the phone's screen.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    screenshot(page, f"widget-{width}x{height}")


def test_earlier_messages_load_when_scrolling_back(open_page):
    # Only the latest 4 messages come with `resume`; the rest page in on scroll.
    server = start_server({"CHATBOX_HISTORY_MESSAGES_MAX": "4", "CHATBOX_DEMO_CHUNK_DELAY_MS": "1"})
    try:
        page = open_page(server.user_url, width=375, height=740)
        page.wait_for_selector(".cbw-status:text('Connected')")
        questions = [f"question number {i}" for i in range(6)]
        for i, q in enumerate(questions):
            send(page, q)
            wait_answer_done(page, i + 1)
        page.reload()
        page.wait_for_selector(".cbw-user:has-text('question number 5')")
        assert page.locator(".cbw-msg").count() == 4
        more = page.get_by_role("button", name="Load earlier messages")
        assert more.is_visible()
        # Scrolling to the top of the conversation asks for the page before.
        page.eval_on_selector(".cbw-log", "log => { log.scrollTop = 0; }")
        page.wait_for_selector(".cbw-user:has-text('question number 0')")
        more.wait_for(state="hidden")
        users = page.eval_on_selector_all(".cbw-user .cbw-body", "els => els.map(e => e.textContent)")
        assert users == questions
        assert answer_texts(page) == [demo_answer(q) for q in questions]
    finally:
        close_before_server_stops(open_page)
        stop_server(server)


def end_session(server, session_id):
    req = urllib.request.Request(f"{server.base}/admin/sessions/{session_id}/end", method="POST",
                                 headers={"Authorization": f"Bearer {server.admin_token}"})
    with urllib.request.urlopen(req, timeout=WAIT_S) as r:
        assert r.status in (200, 204), r.status


def stored_session(page):
    return page.evaluate(
        "() => (Object.entries(localStorage).find(([k]) => k.includes('session')) || [])[1] || null")


def test_an_ended_conversation_is_shown_and_the_next_message_starts_a_new_one(server, open_page):
    page = open_page(server.user_url)
    page.wait_for_selector(".cbw-status:text('Connected')")
    send(page, "first conversation")
    wait_answer_done(page)
    first = stored_session(page)
    # Ended while the widget watches: it says so.
    end_session(server, first)
    page.wait_for_selector(".cbw-note:has-text('conversation has ended')")
    send(page, "second conversation")
    wait_answer_done(page, 2)
    second = stored_session(page)
    assert second and second != first
    # Ended while the widget was away (offline, so it never saw session_ended):
    # its next message is refused for the old session and goes to a new one.
    page.context.set_offline(True)
    page.wait_for_selector(".cbw-status:text('Reconnecting')")
    end_session(server, second)
    page.context.set_offline(False)
    page.wait_for_selector(".cbw-status:text('Connected')")
    send(page, "third conversation")
    page.wait_for_selector(".cbw-assistant .cbw-body:has-text('third conversation')")
    page.locator(".cbw-streaming").wait_for(state="detached")
    assert stored_session(page) not in (first, second, None)
    assert page.locator(".cbw-failed").count() == 0
