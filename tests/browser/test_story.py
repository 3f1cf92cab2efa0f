"""The whole takeover story in two browser contexts: the user on the chat page
(chat.html, the widget) and the agent on the console, against one real chatbox.
Every step waits for what the other side must show, never for time."""

import re

from playwright.sync_api import expect

from conftest import screenshot
from test_widget import demo_answer, send, wait_answer_done


def watch_text(page, selector):
    """Records every distinct text the next new match of `selector` shows as the
    page changes (window.__seen), to tell a stream from a finished text."""
    page.evaluate("""(sel) => {
        window.__seen = [];
        const next = document.querySelectorAll(sel).length;
        new MutationObserver(() => {
            const el = document.querySelectorAll(sel)[next];
            const t = el ? el.textContent : '';
            const s = window.__seen;
            if (t && s[s.length - 1] !== t) s.push(t);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", selector)


def streamed_states(page, selector, final):
    """Waits until `selector`'s last match shows `final`; the states it went
    through (`watch_text`)."""
    expect(page.locator(selector).last).to_have_text(final)
    return page.evaluate("() => window.__seen")


def test_user_and_agent_carry_a_conversation_through_takeover_and_back(server, open_page):
    user = open_page(server.user_url)
    expect(user.locator(".cbw-status")).to_have_text("Connected")
    send(user, "My order never arrived")
    wait_answer_done(user)

    # The user asks for a person; the agent's queue shows the request.
    agent = open_page(server.agent_url)
    expect(agent.locator("#status")).to_contain_text("Connected")
    user.get_by_role("button", name="Talk to a human").click()
    expect(user.locator(".cbw-note").last).to_contain_text("asked for a person")
    item = agent.locator("#queue li").first
    expect(item).to_contain_text("Dev User")
    item.get_by_role("button", name=re.compile("Open")).click()
    transcript = agent.locator("#transcript")
    expect(transcript).to_contain_text("My order never arrived")

    # Watching: the AI's next answer streams into the console as the user sees it,
    # and the user is not told anyone watches.
    expect(agent.locator("#v-mode")).to_contain_text("Watching live")
    answers = "#transcript li.role-assistant .content"
    watch_text(agent, answers)
    send(user, "Is anyone there?")
    states = streamed_states(agent, answers, demo_answer("Is anyone there?"))
    assert len(states) >= 5, f"the agent saw the answer whole, not streamed: {states}"
    assert all(demo_answer("Is anyone there?").startswith(s) for s in states), states
    wait_answer_done(user, 2)
    expect(user.locator(".cbw-agent")).to_be_hidden()

    # Take over: the user sees the agent's name; the agent's words reach the user.
    agent.get_by_role("button", name="Take over").click()
    expect(user.locator(".cbw-agent")).to_have_text("You are talking to Dev Admin")
    expect(agent.locator("#v-agents")).to_have_text("Dev Admin")
    agent.get_by_label("Reply as agent").fill("Hi, I am Ann from support. Let me check.")
    agent.keyboard.press("Enter")
    expect(user.locator(".cbw-admin .cbw-body")).to_have_text("Hi, I am Ann from support. Let me check.")
    send(user, "Order 1234, thanks")
    expect(transcript.locator("li.role-user").last).to_contain_text("Order 1234, thanks")
    assert user.locator(".cbw-assistant").count() == 2, "the AI stays quiet under a human"

    # A reload mid-takeover keeps the conversation and still names the agent.
    user.reload()
    expect(user.locator(".cbw-agent")).to_have_text("You are talking to Dev Admin")
    expect(user.locator(".cbw-admin .cbw-body")).to_have_text("Hi, I am Ann from support. Let me check.")
    expect(user.locator(".cbw-user .cbw-body").last).to_have_text("Order 1234, thanks")
    screenshot(user, "story-user-1280")
    screenshot(agent, "story-agent-1280")

    # Hand back: the user is told, and the AI answers again, watched live.
    agent.get_by_role("button", name="Hand back to AI").click()
    expect(user.locator(".cbw-note").last).to_contain_text("Dev Admin left")
    expect(user.locator(".cbw-agent")).to_be_hidden()
    expect(agent.locator("#v-mode")).to_contain_text("Watching live")
    watch_text(agent, answers)
    send(user, "One more question")
    states = streamed_states(agent, answers, demo_answer("One more question"))
    assert len(states) >= 5, states
    wait_answer_done(user, 3)
    assert user.locator(".cbw-assistant .cbw-body").last.text_content() == demo_answer("One more question")
    expect(agent.locator("#v-state")).to_have_text("ai")
