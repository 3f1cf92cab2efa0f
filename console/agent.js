// chatbox agent console: help-request queue, sessions, a session view with
// takeover, and metrics. Plain JavaScript, no framework, no build step.
// Message content is only ever set with textContent: never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "chatbox.agent.token";
  const SVG = "http://www.w3.org/2000/svg";
  const LIST_REFRESH_MS = 5000;
  const EVENT_REFRESH_MS = 250;
  const METRICS_REFRESH_MS = 30000;
  // The renewal form shows this long before the token's `exp` (or at half its
  // life when shorter): the agent pastes a fresh token, sent as `auth_refresh`.
  const RENEW_LEAD_MS = 5 * 60 * 1000;
  const TIMER_MS_MAX = 2 ** 31 - 1;
  const QUEUE_MAX = 200;
  const CHART_BUCKETS = 12;

  const $ = (id) => document.getElementById(id);
  // The path prefix (`/chatbox`): everything before `/console/`.
  const prefix = location.pathname.replace(/\/console(\/.*)?$/, "");

  const state = {
    token: null,
    ws: null,
    wsBackoff: 500,
    filters: {},
    listReq: 0,
    cursors: [null], // cursor of each page shown so far; the last is the current
    nextCursor: null,
    queue: new Map(), // session_id -> <li>
    // The session shown: {id, joined, agents: Set of names, messages: Map
    // message_id -> <li>, seqs: Map message_id -> last chunk seq rendered}.
    open: null,
    audio: null,
    seq: 0,
  };

  // ---- helpers ----

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function fmtTime(ms) {
    if (ms === null || ms === undefined) return "–";
    const d = new Date(ms);
    return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }

  function fmtSize(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1048576).toFixed(1) + " MiB";
  }

  async function api(path, opts) {
    const res = await fetch(prefix + path, {
      method: (opts && opts.method) || "GET",
      headers: { Authorization: "Bearer " + state.token },
    });
    if (res.status === 401) {
      signOut("The admin token was refused (401). Paste a valid one.");
      throw new Error("unauthorized");
    }
    if (!res.ok) {
      let msg = res.status + "";
      try {
        const body = await res.json();
        if (body && body.error) msg += " " + body.error.code + ": " + body.error.message;
      } catch (_) { /* not JSON: the status says enough */ }
      throw new Error(msg);
    }
    return res;
  }

  // ---- token ----

  function readToken() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      // The token must not stay in the address bar (history, screen shares).
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(decodeURIComponent(escape(atob(part)))) || {};
    } catch (_) {
      return {};
    }
  }

  // Shows the renewal form ahead of the token's expiry (the socket closes with
  // 4001 at `exp` unless a fresh token reaches it first).
  function scheduleRenew() {
    clearTimeout(state.renewTimer);
    const exp = claimsOf(state.token).exp;
    if (typeof exp !== "number") return;
    const left = exp * 1000 - Date.now();
    // setTimeout fires at once past 2^31-1 ms (24.8 days): wait that long, then look again.
    const delay = Math.max(0, left - Math.min(RENEW_LEAD_MS, left / 2));
    if (delay > TIMER_MS_MAX) {
      state.renewTimer = setTimeout(scheduleRenew, TIMER_MS_MAX);
      return;
    }
    state.renewTimer = setTimeout(() => {
      $("renew-text").textContent = "Your admin token expires at " + fmtTime(exp * 1000) +
        ". Paste a fresh one to stay connected.";
      $("renew-form").hidden = false;
    }, delay);
  }

  function setupRenew() {
    $("renew-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const t = $("renew-input").value.trim();
      if (!t) return;
      state.renewing = t;
      send({ type: "auth_refresh", token: t, id: "renew" });
    });
  }

  function renewed() {
    if (!state.renewing) return;
    state.token = state.renewing;
    state.renewing = null;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("renew-input").value = "";
    $("renew-form").hidden = true;
    setStatus("Token renewed.");
    scheduleRenew();
  }

  function signOut(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    if (state.ws) state.ws.close();
    clearTimeout(state.renewTimer);
    $("renew-form").hidden = true;
    $("app").hidden = true;
    $("token-form").hidden = false;
    setStatus(why);
  }

  // ---- notifications ----

  function beep() {
    if (!$("sound").checked) return;
    try {
      if (!state.audio) state.audio = new AudioContext();
      const ctx = state.audio;
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.frequency.value = 880;
      gain.gain.setValueAtTime(0.15, ctx.currentTime);
      gain.gain.exponentialRampToValueAtTime(0.001, ctx.currentTime + 0.3);
      osc.connect(gain).connect(ctx.destination);
      osc.start();
      osc.stop(ctx.currentTime + 0.3);
      // Counted on the page, so that a test (or a curious agent) can tell it rang.
      const card = $("queue-card");
      card.dataset.sounds = String(Number(card.dataset.sounds || 0) + 1);
    } catch (_) { /* no audio here: the queue still shows the request */ }
  }

  function notifyDesktop(f) {
    if (!$("desktop").checked || !("Notification" in window)) return;
    if (Notification.permission !== "granted") return;
    const who = f.user_name || f.user_id;
    new Notification("Help requested", { body: who + " is waiting", tag: f.session_id });
  }

  function setupAlerts() {
    $("sound").checked = localStorage.getItem("chatbox.agent.sound") === "1";
    $("desktop").checked = localStorage.getItem("chatbox.agent.desktop") === "1";
    $("sound").addEventListener("change", () => {
      localStorage.setItem("chatbox.agent.sound", $("sound").checked ? "1" : "0");
      if ($("sound").checked && !state.audio) {
        try { state.audio = new AudioContext(); } catch (_) { /* none */ }
      }
    });
    $("desktop").addEventListener("change", async () => {
      const box = $("desktop");
      if (box.checked && "Notification" in window && Notification.permission !== "granted") {
        const p = await Notification.requestPermission();
        if (p !== "granted") {
          box.checked = false;
          setStatus("Desktop notifications are blocked by the browser.");
        }
      }
      localStorage.setItem("chatbox.agent.desktop", box.checked ? "1" : "0");
    });
  }

  // ---- queue ----

  function queueAdd(f, quiet) {
    const id = f.session_id;
    const old = state.queue.get(id);
    if (old) old.remove();
    const li = el("li", "queue-item");
    li.dataset.session = id;
    const who = el("span", "who", f.user_name || f.user_id || "unknown user");
    const when = el("span", "when muted", fmtTime(f.at));
    const btn = el("button", "open", "Open");
    btn.type = "button";
    btn.setAttribute("aria-label", "Open the session of " + who.textContent);
    btn.addEventListener("click", () => openSession(id));
    li.append(who, " ", when, " ", btn);
    $("queue").prepend(li);
    state.queue.set(id, li);
    while (state.queue.size > QUEUE_MAX) {
      const [first] = state.queue.keys();
      queueRemove(first);
    }
    queueCount();
    if (!quiet) {
      beep();
      notifyDesktop(f);
    }
  }

  function queueRemove(id) {
    const li = state.queue.get(id);
    if (li) li.remove();
    state.queue.delete(id);
    queueCount();
  }

  function queueCount() {
    $("queue-count").textContent = String(state.queue.size);
    $("queue-empty").hidden = state.queue.size > 0;
  }

  async function seedQueue() {
    try {
      const res = await api("/admin/sessions?state=waiting&sort_by=start_time&order=asc&limit=200");
      const body = await res.json();
      for (const s of body.sessions) {
        if (!state.queue.has(s.session_id)) {
          queueAdd({ session_id: s.session_id, user_id: s.user_id, at: s.last_activity }, true);
        }
      }
    } catch (e) {
      setStatus("Could not load waiting sessions: " + e.message);
    }
  }

  // ---- sessions list ----

  // The filters as last applied: the periodic refresh must not apply what the
  // agent is still typing.
  function applyFilters() {
    const f = {};
    const st = $("f-state").value;
    const user = $("f-user").value.trim();
    if (st) f.state = st;
    if (user) f.user_id = user;
    f.sort_by = $("f-sort").value;
    f.order = $("f-order").value;
    f.limit = $("f-limit").value;
    state.filters = f;
    state.cursors = [null];
  }

  function listQuery() {
    const q = new URLSearchParams(state.filters);
    const cursor = state.cursors[state.cursors.length - 1];
    if (cursor) q.set("cursor", cursor);
    return q.toString();
  }

  // A burst of session events (help requests reach every admin) refreshes the
  // list once, not once per event.
  function refreshSoon() {
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(() => {
      state.refreshTimer = null;
      loadSessions();
    }, EVENT_REFRESH_MS);
  }

  async function loadSessions() {
    // Refreshes overlap (timer, frames, buttons): only the latest one renders.
    const n = ++state.listReq;
    let body;
    try {
      body = await (await api("/admin/sessions?" + listQuery())).json();
    } catch (e) {
      setStatus("Could not load sessions: " + e.message);
      return;
    }
    if (n !== state.listReq) return;
    const tbody = $("sessions-body");
    const rows = body.sessions.map(sessionRow);
    if (rows.length === 0) {
      const tr = el("tr");
      const td = el("td", "muted", "No sessions match.");
      td.colSpan = 6;
      tr.append(td);
      rows.push(tr);
    }
    // A refresh must not take the keyboard focus away from the row it was on.
    const focused = tbody.contains(document.activeElement)
      ? document.activeElement.closest("tr").dataset.session : null;
    tbody.replaceChildren(...rows);
    if (focused) {
      const again = tbody.querySelector('tr[data-session="' + CSS.escape(focused) + '"] button');
      if (again) again.focus();
    }
    state.nextCursor = body.next_cursor;
    $("next-page").disabled = !body.next_cursor;
    $("prev-page").disabled = state.cursors.length < 2;
    $("page-no").textContent = "Page " + state.cursors.length;
  }

  function sessionRow(s) {
    const tr = el("tr");
    tr.dataset.session = s.session_id;
    const link = el("button", "linkish", s.session_id);
    link.type = "button";
    link.setAttribute("aria-label", "Open session " + s.session_id);
    link.addEventListener("click", () => openSession(s.session_id));
    const first = el("td");
    first.append(link);
    const badge = el("span", "badge st-" + s.state, s.state);
    const stateCell = el("td");
    stateCell.append(badge);
    tr.append(first, el("td", null, s.user_id), stateCell, el("td", null, fmtTime(s.start_time)),
      el("td", "num", s.message_count), el("td", "num", s.total_tokens));
    return tr;
  }

  function setupList() {
    applyFilters();
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      applyFilters();
      loadSessions();
    });
    $("next-page").addEventListener("click", () => {
      if (!state.nextCursor) return;
      state.cursors.push(state.nextCursor);
      loadSessions();
    });
    $("prev-page").addEventListener("click", () => {
      if (state.cursors.length > 1) state.cursors.pop();
      loadSessions();
    });
    $("refresh").addEventListener("click", loadSessions);
    setInterval(() => {
      if (state.token && !document.hidden) loadSessions();
    }, LIST_REFRESH_MS);
  }

  // ---- the session view ----

  function renderMessage(m) {
    const open = state.open;
    let li = open.messages.get(m.message_id);
    if (!li) {
      li = el("li", "msg");
      li.dataset.message = m.message_id;
      const head = el("div", "msg-head");
      head.append(el("span", "role"), " ", el("time", "muted"));
      li.append(head, el("div", "content"), el("div", "extra"));
      open.messages.set(m.message_id, li);
      insertInOrder(li, m);
    }
    const role = m.role || "user";
    li.className = "msg role-" + role + (m.cancelled ? " cancelled" : "");
    const who = role === "admin" ? "Agent " + (m.author || m.admin_name || "")
      : role === "assistant" ? "AI" : role === "user" ? "User " + (m.author || m.user_id || "")
      : role;
    li.querySelector(".role").textContent = who.trim() + (m.cancelled ? " (stopped)" : "");
    if (m.created_at) li.querySelector("time").textContent = fmtTime(m.created_at);
    const content = li.querySelector(".content");
    if (m.error) {
      content.textContent = "[withheld: " + m.error + "]";
    } else if (m.content !== undefined) {
      content.textContent = m.content;
    }
    if (m.file) renderFile(li.querySelector(".extra"), m);
    return li;
  }

  // Keeps the transcript ordered by seq when the stored transcript tells it;
  // live messages (no seq) go at the end.
  function insertInOrder(li, m) {
    const list = $("transcript");
    if (typeof m.seq === "number") {
      li.dataset.seq = String(m.seq);
      // Stored messages mostly come in order: after the last one, nothing to scan.
      const last = list.lastElementChild;
      if (!last || (last.dataset.seq && Number(last.dataset.seq) < m.seq)) {
        list.append(li);
        return;
      }
      for (const other of list.children) {
        const s = Number(other.dataset.seq);
        if (other.dataset.seq && s > m.seq) {
          list.insertBefore(li, other);
          return;
        }
      }
    }
    list.append(li);
  }

  function isVoice(mime) {
    return /^audio\//.test(mime) || mime === "video/webm" || mime === "video/mp4";
  }

  function renderFile(box, m) {
    const f = m.file;
    box.replaceChildren();
    if (isVoice(f.mime)) box.append(el("span", "tag", "Voice note, transcript above"), " ");
    const name = f.name || f.file_id;
    const btn = el("button", "file", "Download " + name + " (" + f.mime + ", " + fmtSize(f.size) + ")");
    btn.type = "button";
    btn.addEventListener("click", () => download(f, name, btn));
    box.append(btn);
  }

  // A link cannot carry the Authorization header: fetch with it, then hand the
  // bytes to the browser as a blob URL.
  async function download(f, name, btn) {
    btn.disabled = true;
    try {
      const blob = await (await api("/files/" + encodeURIComponent(f.file_id))).blob();
      const url = URL.createObjectURL(blob);
      const a = el("a");
      a.href = url;
      a.download = name;
      a.textContent = "Save " + name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      setStatus("Download failed: " + e.message);
    } finally {
      btn.disabled = false;
    }
  }

  function setMode() {
    const o = state.open;
    const ended = $("v-state").textContent === "ended";
    $("join").disabled = o.joined || ended;
    $("leave").disabled = !o.joined;
    $("end").disabled = ended;
    $("reply").disabled = !o.joined;
    $("send").disabled = !o.joined;
    $("v-agents").textContent = o.agents.size ? [...o.agents].join(", ") : "none";
    $("v-mode").textContent = ended ? "This session has ended."
      : o.joined ? "You have taken over: the AI is paused and new messages appear live."
      : "Watching live: the user does not see you. Take over to write.";
  }

  // Follows the open session live (admin_watch): the AI's answer streams here as
  // the user sees it; the user is not told.
  function follow(o) {
    if (state.open === o) send({ type: o.joined ? "admin_join" : "admin_watch", session_id: o.id });
  }

  async function openSession(id) {
    if (state.open && state.open.id !== id) {
      send({ type: "admin_leave", session_id: state.open.id });
    }
    const fresh = !state.open || state.open.id !== id;
    if (fresh) {
      state.open = { id, joined: false, agents: new Set(), messages: new Map(), seqs: new Map() };
      $("transcript").replaceChildren();
    }
    $("view-empty").hidden = true;
    $("view-body").hidden = false;
    $("v-id").textContent = id;
    resetEnd();
    setMode();
    await loadTranscript();
    $("view").focus();
    if (fresh) follow(state.open);
  }

  async function loadTranscript() {
    const o = state.open;
    if (!o) return;
    let body;
    try {
      body = await (await api("/admin/sessions/" + encodeURIComponent(o.id))).json();
    } catch (e) {
      setStatus("Could not load the session: " + e.message);
      return;
    }
    if (state.open !== o) return;
    $("v-user").textContent = body.session.user_id;
    $("v-state").textContent = body.session.state;
    if (body.session.state !== "waiting") queueRemove(o.id);
    for (const m of body.messages) renderMessage(m);
    setMode();
  }

  function closeView() {
    if (state.open) send({ type: "admin_leave", session_id: state.open.id });
    state.open = null;
    $("view-body").hidden = true;
    $("view-empty").hidden = false;
    $("transcript").replaceChildren();
  }

  function resetEnd() {
    const b = $("end");
    b.dataset.armed = "";
    b.textContent = "End session";
  }

  async function endSession() {
    const b = $("end");
    // Two presses: ending cannot be undone, and a dialog would block the page.
    if (!b.dataset.armed) {
      b.dataset.armed = "1";
      b.textContent = "Press again to end";
      return;
    }
    resetEnd();
    const o = state.open;
    try {
      await api("/admin/sessions/" + encodeURIComponent(o.id) + "/end", { method: "POST" });
      setStatus("Session " + o.id + " ended.");
      o.joined = false;
      o.agents.clear();
      await loadTranscript();
      refreshSoon();
    } catch (e) {
      setStatus("Could not end the session: " + e.message);
    }
  }

  function setupView() {
    $("join").addEventListener("click", () => {
      send({ type: "admin_join", session_id: state.open.id });
    });
    $("leave").addEventListener("click", () => {
      send({ type: "admin_leave", session_id: state.open.id });
    });
    $("end").addEventListener("click", endSession);
    $("end").addEventListener("blur", resetEnd);
    $("close-view").addEventListener("click", closeView);
    $("compose").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("reply").value;
      if (!text.trim() || !state.open || !state.open.joined) return;
      send({ type: "admin_message", session_id: state.open.id, content: text, id: "a-" + (++state.seq) });
      $("reply").value = "";
    });
    $("reply").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        $("compose").requestSubmit();
      }
    });
  }

  // ---- WebSocket ----

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      setStatus("Not connected; try again in a moment.");
      return;
    }
    state.ws.send(JSON.stringify(frame));
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + prefix + "/ws?token=" + encodeURIComponent(state.token));
    state.ws = ws;
    ws.addEventListener("open", () => {
      state.wsBackoff = 500;
      setStatus("Connected. Waiting for help requests.");
      scheduleRenew();
      // A session joined or followed before a reconnect is joined or followed again.
      if (state.open) follow(state.open);
    });
    ws.addEventListener("message", (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(f);
    });
    ws.addEventListener("close", (ev) => {
      if (state.ws !== ws || !state.token) return;
      if (ev.code === 4001) {
        signOut("The admin token expired: paste a fresh one.");
        return;
      }
      setStatus("Disconnected; reconnecting…");
      setTimeout(connect, state.wsBackoff);
      state.wsBackoff = Math.min(state.wsBackoff * 2, 15000);
    });
  }

  function inOpen(f) {
    return state.open && f.session_id === state.open.id;
  }

  // Long: one case per server frame an admin receives.
  function onFrame(f) {
    const o = state.open;
    switch (f.type) {
      case "help_requested":
        queueAdd(f, false);
        setStatus("Help requested by " + (f.user_name || f.user_id) + ".");
        if (inOpen(f)) { $("v-state").textContent = "waiting"; setMode(); }
        refreshSoon();
        break;
      case "session":
        if (inOpen(f) && f.messages) {
          for (const m of f.messages) renderMessage(m);
          o.agents = new Set(f.agents || []);
          setMode();
        }
        break;
      case "admin_joined":
        if (inOpen(f)) {
          o.agents.add(f.admin_name);
          if (f.you) o.joined = true;
          $("v-state").textContent = "human";
          queueRemove(f.session_id);
          setMode();
        }
        refreshSoon();
        break;
      case "admin_left":
        if (inOpen(f)) {
          o.agents.delete(f.admin_name);
          if (o.agents.size === 0) $("v-state").textContent = "ai";
          if (f.you && o.joined) {
            // Handed back: the seat is gone; keep following the session.
            o.joined = false;
            follow(o);
          }
          setMode();
        }
        refreshSoon();
        break;
      case "admin_message":
        if (inOpen(f)) renderMessage({ message_id: f.message_id, role: "admin", author: f.admin_name, content: f.content, created_at: Date.now() });
        break;
      case "user_message":
        if (inOpen(f)) renderMessage({ message_id: f.message_id, role: "user", author: f.user_id, content: f.content, file: f.file, created_at: Date.now() });
        break;
      case "transcript":
        if (inOpen(f)) renderMessage({ message_id: f.message_id, content: f.content, role: "user" });
        break;
      case "ai_chunk":
        // A (re)join replays the running answer from seq 1: each chunk once.
        if (inOpen(f) && f.seq > (o.seqs.get(f.message_id) || 0)) {
          o.seqs.set(f.message_id, f.seq);
          const li = o.messages.get(f.message_id) || renderMessage({ message_id: f.message_id, role: "assistant", content: "" });
          li.querySelector(".content").append(document.createTextNode(f.content));
        }
        break;
      case "ai_done":
        if (inOpen(f) && f.cancelled) renderMessage({ message_id: f.message_id, role: "assistant", cancelled: true });
        break;
      case "session_ended":
        queueRemove(f.session_id);
        if (inOpen(f)) {
          o.joined = false;
          o.agents.clear();
          $("v-state").textContent = "ended";
          setMode();
        }
        refreshSoon();
        break;
      case "auth_refreshed":
        renewed();
        break;
      case "error":
        if (f.id === "renew") state.renewing = null;
        setStatus("Server: " + f.code + (f.message ? " – " + f.message : ""));
        break;
      default:
        break;
    }
  }

  // ---- metrics ----

  const SERIES_LABEL = {
    sessions: "sessions", messages: "messages", help_requests: "help requests",
    takeovers: "takeovers", total_tokens: "tokens",
  };

  function seriesValue(m, key) {
    return key === "total_tokens" ? (m.tokens_in || 0) + (m.tokens_out || 0) : (m[key] || 0);
  }

  async function loadMetrics() {
    const span = Number($("m-window").value);
    const key = $("m-series").value;
    const to = Date.now();
    const from = to - span;
    const step = span / CHART_BUCKETS;
    try {
      const total = await (await api("/admin/metrics?from=" + from + "&to=" + to)).json();
      renderTotals(total.metrics);
      const buckets = [];
      for (let i = 0; i < CHART_BUCKETS; i++) {
        const a = Math.round(from + i * step);
        const b = Math.round(from + (i + 1) * step);
        buckets.push(api("/admin/metrics?from=" + a + "&to=" + b).then((r) => r.json())
          .then((m) => ({ at: a, value: seriesValue(m.metrics, key) })));
      }
      drawChart(await Promise.all(buckets), SERIES_LABEL[key], span);
    } catch (e) {
      setStatus("Could not load metrics: " + e.message);
    }
  }

  function renderTotals(m) {
    const rows = [
      ["Sessions", m.sessions], ["Messages", m.messages], ["From users", m.user_messages],
      ["From the AI", m.assistant_messages], ["From agents", m.admin_messages],
      ["Help requests", m.help_requests], ["Takeovers", m.takeovers],
      ["Tokens in / out", (m.tokens_in || 0) + " / " + (m.tokens_out || 0)],
      ["Responses", m.responses],
      ["Avg response", m.response_ms_avg == null ? "–" : Math.round(m.response_ms_avg) + " ms"],
      ["Max response", m.response_ms_max == null ? "–" : m.response_ms_max + " ms"],
    ];
    const box = $("m-totals");
    box.replaceChildren();
    for (const [k, v] of rows) {
      const d = el("div");
      d.append(el("dt", null, k), el("dd", null, v === undefined ? "–" : v));
      box.append(d);
    }
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function bucketLabel(ms, span) {
    const d = new Date(ms);
    return span > 86400000 ? (d.getMonth() + 1) + "/" + d.getDate()
      : String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  // Long: lays out axes, bars and labels of one bar chart.
  function drawChart(points, label, span) {
    // As wide as its box (within bounds), so that labels keep their size on a phone.
    const W = Math.max(300, Math.min(600, $("chart").clientWidth || 600));
    const H = 220, L = 40, B = 30, T = 12, R = 8;
    const max = Math.max(1, ...points.map((p) => p.value));
    const chart = svg("svg", {
      viewBox: "0 0 " + W + " " + H, role: "img", class: "bars",
      "aria-labelledby": "chart-title chart-desc",
    });
    chart.append(svg("title", { id: "chart-title" }, label + " per interval"));
    const desc = points.map((p) => bucketLabel(p.at, span) + ": " + p.value).join(", ");
    chart.append(svg("desc", { id: "chart-desc" }, desc));
    const plotW = W - L - R, plotH = H - T - B;
    // Gridlines at whole numbers only: 0, the top, and the middle when whole.
    const ticks = max % 2 === 0 ? [0, max / 2, max] : [0, max];
    for (const v of ticks) {
      const frac = v / max;
      const y = T + plotH * (1 - frac);
      chart.append(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
      chart.append(svg("text", { x: L - 6, y: y + 4, class: "axis", "text-anchor": "end" },
        String(v)));
    }
    const bw = plotW / points.length;
    points.forEach((p, i) => {
      const h = plotH * (p.value / max);
      const x = L + i * bw;
      const bar = svg("rect", { x: x + 2, y: T + plotH - h, width: Math.max(1, bw - 4), height: h, class: "bar" });
      bar.append(svg("title", {}, bucketLabel(p.at, span) + ": " + p.value + " " + label));
      chart.append(bar);
      if (i % 2 === 0) {
        chart.append(svg("text", { x: x + bw / 2, y: H - 10, class: "axis", "text-anchor": "middle" },
          bucketLabel(p.at, span)));
      }
    });
    $("chart").replaceChildren(chart);
    const total = points.reduce((a, p) => a + p.value, 0);
    $("chart-caption").textContent = "Total " + label + " in the window: " + total +
      " (" + points.length + " intervals).";
  }

  function setupMetrics() {
    $("metrics-form").addEventListener("submit", (e) => {
      e.preventDefault();
      loadMetrics();
    });
    setInterval(() => {
      if (state.token && !document.hidden) loadMetrics();
    }, METRICS_REFRESH_MS);
  }

  // ---- start ----

  function start() {
    $("token-form").hidden = true;
    $("app").hidden = false;
    connect();
    seedQueue();
    loadSessions();
    loadMetrics();
  }

  function init() {
    setupAlerts();
    setupList();
    setupView();
    setupMetrics();
    setupRenew();
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const t = $("token-input").value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t);
      $("token-input").value = "";
      state.token = t;
      start();
    });
    state.token = readToken();
    if (!state.token) {
      $("token-form").hidden = false;
      setStatus("No admin token.");
      return;
    }
    start();
  }

  init();
})();
