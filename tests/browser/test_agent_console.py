"""The agent console (console/index.html, agent.js) against a real chatbox: the
user is a plain WebSocket client, the agent a browser page."""

import re

from playwright.sync_api import expect

from agent_user import User, admin_token, png, signed_token, wav
from conftest import axe_violations, screenshot

XSS = "<img src=x onerror=window.__xss=1>"


def connected(page):
    expect(page.locator("#status")).to_contain_text("Connected")


def test_takeover_story_from_the_agent_console(server, open_page):
    page = open_page(server.agent_url)
    # The token leaves the address bar and stays in the tab's session storage.
    assert "token=" not in page.url, page.url
    assert page.evaluate("() => sessionStorage.getItem('chatbox.agent.token')") == server.admin_token
    connected(page)
    expect(page.locator("#token-form")).to_be_hidden()
    user = User(server)
    first = user.ask("I cannot log in")
    assert first

    # The user asks for help: the request appears in the queue, newest first.
    user.send({"type": "help_request"})
    user.until(lambda f: f.get("type") == "help_requested", "help_requested")
    item = page.locator("#queue li").first
    expect(item).to_contain_text("Dev User")
    expect(page.locator("#queue-count")).to_have_text("1")

    # Opening it shows the transcript, the AI's answer included.
    item.get_by_role("button", name=re.compile("Open")).click()
    transcript = page.locator("#transcript")
    expect(transcript).to_contain_text("I cannot log in")
    expect(transcript).to_contain_text(first.strip()[:40])
    expect(page.locator("#v-state")).to_have_text("waiting")
    expect(page.locator("#v-mode")).to_contain_text("Watching")

    # Take over: the user is told; the agent is listed in the session.
    page.get_by_role("button", name="Take over").click()
    user.until(lambda f: f.get("type") == "admin_joined", "admin_joined")
    expect(page.locator("#v-agents")).to_have_text("Dev Admin")
    expect(page.locator("#v-state")).to_have_text("human")
    expect(page.locator("#queue li")).to_have_count(0)
    row = page.locator("#sessions-body tr", has_text=user.session_id)
    expect(row).to_contain_text("human")

    # What the user writes now appears live, as text: the markup never runs.
    user.send({"type": "user_message", "content": XSS})
    msg = transcript.locator("li.role-user .content", has_text="onerror")
    expect(msg).to_have_text(XSS)
    assert transcript.locator("img").count() == 0
    assert page.evaluate("() => window.__xss") is None

    # The agent writes; the user receives it.
    page.get_by_label("Reply as agent").fill("Hello, I am looking at your account.")
    page.keyboard.press("Enter")
    got = user.until(lambda f: f.get("type") == "admin_message", "admin_message")
    assert got[-1]["content"] == "Hello, I am looking at your account."
    assert got[-1]["admin_name"] == "Dev Admin"
    expect(transcript.locator("li.role-admin")).to_contain_text("looking at your account")

    page.get_by_role("button", name="Show", exact=True).click()
    expect(page.locator("#chart-caption")).to_have_text(re.compile(r"sessions in the window: 1 "))
    screenshot(page, "agent-console-1280")
    bad = axe_violations(page)
    assert not bad, bad

    # Hand back: the user is told, and the AI's next answer reaches the agent.
    page.get_by_role("button", name="Hand back to AI").click()
    user.until(lambda f: f.get("type") == "admin_left", "admin_left")
    expect(page.locator("#v-agents")).to_have_text("none")
    expect(page.locator("#v-mode")).to_contain_text("Watching live")
    answer = user.ask("Thanks, and where is my parcel?")
    expect(transcript).to_contain_text("where is my parcel")
    expect(transcript.locator("li.role-assistant").last).to_have_text(
        re.compile(re.escape(answer.strip()[:40])))
    user.close()

    # Ending the session (two presses: it cannot be undone).
    end = page.get_by_role("button", name="End session")
    end.click()
    page.get_by_role("button", name="Press again to end").click()
    expect(page.locator("#v-state")).to_have_text("ended")
    expect(page.get_by_role("button", name="Take over")).to_be_disabled()


def test_phone_width_and_accessibility(server, open_page):
    user = User(server)
    user.ask("Phone check")
    user.send({"type": "help_request"})
    user.until(lambda f: f.get("type") == "help_requested", "help_requested")
    page = open_page(server.agent_url, width=375, height=740)
    connected(page)
    # A request made before the page opened is in the queue too (from the API).
    expect(page.locator("#queue li")).to_have_count(1)
    # Keyboard alone: Enter on the request's button opens it and moves focus there.
    page.locator("#queue li button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#transcript")).to_contain_text("Phone check")
    expect(page.locator("#view")).to_be_focused()
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 375, f"the page scrolls sideways at 375px: {width}"
    screenshot(page, "agent-console-375")
    bad = axe_violations(page)
    assert not bad, bad
    # The dark scheme keeps its contrast too.
    page.emulate_media(color_scheme="dark")
    screenshot(page, "agent-console-375-dark")
    bad = axe_violations(page)
    assert not bad, bad
    user.close()


def test_sessions_list_filters_and_pages(server, open_page):
    user = User(server)
    for i in range(11):
        user.session_id = None
        user.ask(f"question {i}")
    user.send({"type": "help_request"})
    user.until(lambda f: f.get("type") == "help_requested", "help_requested")
    page = open_page(server.agent_url)
    connected(page)
    rows = page.locator("#sessions-body tr")
    expect(rows).to_have_count(11)
    # Help requests arrive newest first; the sound is off until switched on.
    sound = page.get_by_label("Sound on help requests")
    expect(sound).not_to_be_checked()
    first_waiting = user.session_id
    user.session_id = None
    user.ask("another question")
    user.ask("and one more")  # the only session with four messages
    sound.check()
    user.send({"type": "help_request"})
    user.until(lambda f: f.get("type") == "help_requested", "help_requested")
    items = page.locator("#queue li")
    expect(items).to_have_count(2)
    expect(items.first).to_have_attribute("data-session", user.session_id)
    expect(items.last).to_have_attribute("data-session", first_waiting)
    expect(page.locator("#queue-card")).to_have_attribute("data-sounds", "1")
    expect(rows).to_have_count(12)
    # Ten a page: the second page holds the other two.
    page.get_by_label("Per page").select_option("10")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(10)
    page.get_by_role("button", name="Next page").click()
    expect(rows).to_have_count(2)
    expect(page.locator("#page-no")).to_have_text("Page 2")
    page.get_by_role("button", name="Previous page").click()
    expect(rows).to_have_count(10)
    # Filter by state: only the sessions waiting for a human, oldest first.
    page.get_by_label("State").select_option("waiting")
    page.get_by_label("Order").select_option("asc")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text(first_waiting)
    expect(rows.last).to_contain_text(user.session_id)
    # Sorted by messages, ascending: the one with four comes last.
    page.get_by_label("State").select_option("")
    page.get_by_label("Sort by").select_option("message_count")
    page.get_by_label("Per page").select_option("25")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(12)
    expect(rows.last).to_contain_text(user.session_id)
    expect(rows.last.locator("td").nth(4)).to_have_text("4")
    # Another user's sessions: there are none.
    page.get_by_label("User", exact=True).fill("nobody")
    page.get_by_role("button", name="Apply").click()
    expect(rows.first).to_have_text("No sessions match.")
    user.close()


def test_attachments_download_and_voice_transcripts(server, open_page):
    user = User(server)
    user.ask("I will send a screenshot")
    image = png()
    f = user.upload(image, "shot.png")
    user.send({"type": "file_message", "file_id": f["file_id"], "content": "see this"})
    user.until(lambda x: x.get("type") == "ai_done", "ai_done")
    v = user.upload(wav(), "note.wav")
    user.send({"type": "voice_message", "file_id": v["file_id"]})
    got = user.until(lambda x: x.get("type") in ("transcript", "error"), "transcript")
    assert got[-1]["type"] == "transcript", got[-1]
    said = got[-1]["content"]
    user.until(lambda x: x.get("type") == "ai_done", "ai_done")

    page = open_page(server.agent_url)
    connected(page)
    page.locator("#sessions-body button").first.click()
    transcript = page.locator("#transcript")
    expect(transcript).to_contain_text("see this")
    expect(transcript).to_contain_text(said)
    expect(transcript).to_contain_text("Voice note")
    # The attachment downloads through the admin token (fetch + blob URL).
    with page.expect_download() as dl:
        transcript.get_by_role("button", name=re.compile("Download shot.png")).click()
    d = dl.value
    assert d.suggested_filename == "shot.png"
    with open(d.path(), "rb") as fh:
        assert fh.read() == image
    user.close()


def test_metrics_chart(server, open_page):
    user = User(server)
    user.ask("count me")
    page = open_page(server.agent_url)
    connected(page)
    page.get_by_label("Window").select_option(label="last hour")
    page.get_by_label("Show").select_option("messages")
    page.get_by_role("button", name="Show", exact=True).click()
    bars = page.locator("#chart svg rect.bar")
    expect(bars).to_have_count(12)
    expect(page.locator("#chart-caption")).to_have_text(
        "Total messages in the window: 2 (12 intervals).")
    # The last interval holds the two messages: its bar is the tallest, not flat.
    heights = [float(h) for h in bars.evaluate_all("rs => rs.map(r => r.getAttribute('height'))")]
    assert heights[-1] > 0 and heights[-1] == max(heights), heights
    expect(page.locator("#m-totals")).to_contain_text("Sessions")
    screenshot(page, "agent-metrics-1280")
    user.close()


def test_without_a_token_the_console_asks_for_one(server, open_page):
    page = open_page(server.agent_url.split("#")[0])
    expect(page.locator("#status")).to_have_text("No admin token.")
    expect(page.locator("#app")).to_be_hidden()
    page.get_by_label("Admin token", exact=True).fill(server.admin_token)
    page.get_by_role("button", name="Use token").click()
    connected(page)
    expect(page.locator("#token-form")).to_be_hidden()
    bad = axe_violations(page)
    assert not bad, bad


def test_agents_in_a_session_see_each_other(server, open_page):
    user = User(server)
    user.ask("Two agents, please")
    user.send({"type": "help_request"})
    user.until(lambda f: f.get("type") == "help_requested", "help_requested")
    sid = user.session_id
    # Another agent takes the session first (a client of their own).
    other = User(server, admin_token(server, "agent-2", "Second Agent"))
    other.send({"type": "admin_join", "session_id": sid})
    other.until(lambda f: f.get("type") == "admin_joined", "admin_joined")

    page = open_page(server.agent_url)
    connected(page)
    page.locator("#sessions-body button", has_text=sid).click()
    expect(page.locator("#v-state")).to_have_text("human")
    # Watching, the agent already sees who has the session.
    expect(page.locator("#v-agents")).to_have_text("Second Agent")
    expect(page.get_by_role("button", name="Take over")).to_be_enabled()
    page.get_by_role("button", name="Take over").click()
    # The agent already there is announced to the one who joins, and vice versa.
    expect(page.locator("#v-agents")).to_have_text("Second Agent, Dev Admin")
    other.until(lambda f: f.get("type") == "admin_joined" and f["admin_name"] == "Dev Admin",
                "admin_joined of Dev Admin")
    other.send({"type": "admin_message", "session_id": sid, "content": "I am here too"})
    expect(page.locator("#transcript li.role-admin")).to_contain_text("Second Agent")
    other.send({"type": "admin_leave", "session_id": sid})
    expect(page.locator("#v-agents")).to_have_text("Dev Admin")
    # Ending it tells the user.
    page.get_by_role("button", name="End session").click()
    page.get_by_role("button", name="Press again to end").click()
    user.until(lambda f: f.get("type") == "session_ended", "session_ended")
    expect(page.locator("#v-state")).to_have_text("ended")
    expect(page.locator("#v-mode")).to_have_text("This session has ended.")
    other.close()
    user.close()


def test_a_token_about_to_expire_is_renewed_on_the_open_socket(server, open_page):
    short = signed_token(server, "agent-s", "Short Agent", roles=["admin"], life_s=4)
    page = open_page(server.agent_url.split("#")[0] + "#token=" + short)
    connected(page)
    # Ahead of its expiry the console asks for a fresh token...
    form = page.locator("#renew-form")
    expect(form).to_be_visible()
    expect(page.locator("#renew-text")).to_contain_text("expires at")
    # ...and one for another agent is refused by the server: the form stays.
    page.get_by_label("Fresh admin token").fill(admin_token(server, "agent-other", "Other"))
    page.get_by_role("button", name="Renew").click()
    expect(page.locator("#status")).to_contain_text("unauthorized")
    expect(form).to_be_visible()
    fresh = signed_token(server, "agent-s", "Short Agent", roles=["admin"])
    page.get_by_label("Fresh admin token").fill(fresh)
    page.get_by_role("button", name="Renew").click()
    expect(page.locator("#status")).to_have_text("Token renewed.")
    expect(form).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('chatbox.agent.token')") == fresh
