"""Both console pages load from the binary under their CSP, without errors."""

from conftest import WAIT_S


def test_both_pages_load_without_errors_under_their_policy(server, open_page):
    open_page.allow(r"Executing inline script violates")
    for url, title in [(server.agent_url, "agent console"), (server.user_url, "chat")]:
        assert "#token=" in url, url
        page = open_page(url)
        assert title in page.title(), page.title()
        # An inline script is refused by the page's own policy: the console
        # reports it (a CSP violation), proving the policy is in force.
        blocked = page.evaluate("""() => new Promise(resolve => {
            document.addEventListener('securitypolicyviolation',
                e => resolve(e.violatedDirective), {once: true});
            const s = document.createElement('script');
            s.textContent = 'window.__ran = true';
            document.body.appendChild(s);
            setTimeout(() => resolve(null), %d);
        })""" % (WAIT_S * 1000))
        assert blocked and blocked.startswith("script-src"), blocked
        assert page.evaluate("() => window.__ran") is None
