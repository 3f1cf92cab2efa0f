// chatbox chat widget: one <script> tag on any page, plain JavaScript, no build
// (embedding, token sources and what it stores: docs/WIDGET.md). The WebSocket and
// upload URLs come from this script's own src: it talks to the server that served it.
// Message content is never inserted as HTML: the small markdown renderer below
// builds DOM nodes with createElement/textContent and links only http(s) URLs.
"use strict";

(function () {
  const script = document.currentScript;
  if (!script) return;
  const SRC = new URL(script.src, location.href);
  // .../chatbox/console/widget.js -> .../chatbox/
  const BASE = new URL("../", SRC);
  const WS_URL = new URL("ws", BASE);
  // Fewer bytes than this is a recording's container header alone, no sound.
  const VOICE_BYTES_MIN = 1024;
  WS_URL.protocol = BASE.protocol === "https:" ? "wss:" : "ws:";
  const UPLOAD_URL = new URL("upload", BASE);
  const BACKOFF_MS = [300, 1000, 2000, 4000, 8000, 15000];
  const FRAGMENT_KEY = "chatbox.widget.token";

  // ---- markdown: a small, safe subset rendered to DOM nodes ---------------

  /** Links only absolute http(s) URLs; anything else (javascript:, data:, relative) is not a link. */
  function safeUrl(raw) {
    try {
      const u = new URL(raw);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (_) {
      return null;
    }
  }

  const INLINE = /`([^`\n]+)`|\*\*([^*\n]+?)\*\*|\*([^*\s][^*\n]*?)\*|\[([^\]\n]+)\]\(([^)\s]+)\)|(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])/g;

  /** Appends `text` to `parent` as text nodes, code, strong, em and links. */
  function renderInline(text, parent) {
    let last = 0;
    INLINE.lastIndex = 0;
    const matches = [...text.matchAll(INLINE)];
    for (const m of matches) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      last = m.index + m[0].length;
      if (m[1] !== undefined) {
        const c = document.createElement("code");
        c.textContent = m[1];
        parent.appendChild(c);
      } else if (m[2] !== undefined) {
        const s = document.createElement("strong");
        renderInline(m[2], s);
        parent.appendChild(s);
      } else if (m[3] !== undefined) {
        const e = document.createElement("em");
        renderInline(m[3], e);
        parent.appendChild(e);
      } else if (m[4] !== undefined) {
        const href = safeUrl(m[5]);
        if (href) parent.appendChild(link(href, m[4]));
        else parent.appendChild(document.createTextNode(m[0]));
      } else if (m[6] !== undefined) {
        parent.appendChild(link(m[6], m[6]));
      }
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function link(href, label) {
    const a = document.createElement("a");
    a.href = href;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    renderInline(label, a);
    return a;
  }

  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;

  /** Renders `text` (markdown subset) into a fragment of DOM nodes. */
  function renderMarkdown(text) {
    const out = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (/^\s*```/.test(line)) {
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```/.test(lines[i])) code.push(lines[i++]);
        i++; // the closing fence (or the end of a still-streaming block)
        const pre = document.createElement("pre");
        const c = document.createElement("code");
        c.textContent = code.join("\n");
        pre.appendChild(c);
        out.appendChild(pre);
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const re = BULLET.test(line) ? BULLET : NUMBERED;
        const list = document.createElement(re === BULLET ? "ul" : "ol");
        while (i < lines.length && re.test(lines[i])) {
          const li = document.createElement("li");
          renderInline(lines[i].match(re)[1], li);
          list.appendChild(li);
          i++;
        }
        out.appendChild(list);
      } else if (line.trim() === "") {
        i++;
      } else {
        const p = document.createElement("p");
        let first = true;
        while (i < lines.length && lines[i].trim() !== "" && !/^\s*```/.test(lines[i]) &&
               !BULLET.test(lines[i]) && !NUMBERED.test(lines[i])) {
          if (!first) p.appendChild(document.createElement("br"));
          renderInline(lines[i].replace(/^#{1,6}\s+/, ""), p);
          first = false;
          i++;
        }
        out.appendChild(p);
      }
    }
    return out;
  }

  // ---- small helpers ---------------------------------------------------------

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  let uid = 0;
  function clientId(prefix) {
    uid += 1;
    return `${prefix}-${Date.now().toString(36)}-${uid}-${Math.random().toString(36).slice(2, 8)}`;
  }

  function tokenClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part)) || {};
    } catch (_) {
      return {};
    }
  }

  const tokenSubject = (token) => tokenClaims(token).sub || "";

  // How long before a token's `exp` the widget fetches the next one: a minute, or
  // half the token's life when it is shorter; never sooner than a second after the
  // last (a token endpoint handing out expired tokens must not be hammered).
  const REFRESH_LEAD_MS = 60000;
  const REFRESH_GAP_MS = 1000;
  // setTimeout fires at once past 2^31-1 ms (24.8 days).
  const TIMER_MS_MAX = 2 ** 31 - 1;

  /** Milliseconds from now until `token` should be replaced, or null (no `exp`). */
  function refreshDelay(token) {
    const exp = tokenClaims(token).exp;
    if (typeof exp !== "number") return null;
    const left = exp * 1000 - Date.now();
    return Math.max(REFRESH_GAP_MS, left - Math.min(REFRESH_LEAD_MS, left / 2));
  }

  const sizeText = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(0)} KB`
    : `${(n / 1048576).toFixed(1)} MB`);

  function storage(kind) {
    try {
      return window[kind];
    } catch (_) {
      return null; // blocked (third-party storage rules): the widget still works
    }
  }

  /** The token from the URL fragment, removed from the address bar at once. */
  function tokenFromFragment() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    const session = storage("sessionStorage");
    if (m) {
      const token = decodeURIComponent(m[1]);
      history.replaceState(null, "", location.pathname + location.search);
      if (session) session.setItem(FRAGMENT_KEY, token);
      return token;
    }
    // A reload: the fragment is gone, the tab still holds the token.
    return session ? session.getItem(FRAGMENT_KEY) : null;
  }

  async function fetchToken(url) {
    const r = await fetch(url, { credentials: "include" });
    if (!r.ok) throw new Error(`token endpoint answered ${r.status}`);
    const text = await r.text();
    try {
      const j = JSON.parse(text);
      return typeof j === "string" ? j : j.token;
    } catch (_) {
      return text.trim();
    }
  }

  // ---- the widget -----------------------------------------------------------

  class Widget {
    constructor(root) {
      this.root = root;
      this.ws = null;
      this.token = null;
      this.sessionId = null;
      this.sessionKey = null;
      this.messages = new Map(); // message_id or client id -> {li, body, text, role}
      this.streaming = null; // {id, seq} of the answer arriving now
      this.pending = new Map(); // client id -> frame sent but not acknowledged
      this.agents = new Set(); // names of the agents in the chat
      this.dirty = new Set(); // streamed messages not drawn since their last chunk
      this.frame = 0; // the animation frame that will draw them
      this.nextToken = null; // a refreshed token the server has not taken yet
      this.attempt = 0;
      this.stopped = false;
      this.recorder = null;
      this.olderBefore = null; // the `before_seq` of the page before the oldest shown
      this.loadingOlder = false;
      this.build();
    }

    // Long: the widget's whole DOM, built once, in reading order.
    build() {
      const n = ++uid;
      const box = el("section", "cbw");
      box.setAttribute("aria-label", "Support chat");
      const head = el("header", "cbw-head");
      this.title = el("h2", "cbw-title", "Chat with support");
      this.status = el("p", "cbw-status", "Connecting…");
      this.status.setAttribute("role", "status");
      this.agent = el("p", "cbw-agent");
      this.agent.hidden = true;
      head.append(this.title, this.status, this.agent);

      this.log = el("div", "cbw-log");
      this.log.setAttribute("role", "log");
      this.log.setAttribute("aria-live", "polite");
      this.log.setAttribute("aria-label", "Conversation");
      this.log.tabIndex = 0;
      this.more = el("button", "cbw-btn cbw-more", "Load earlier messages");
      this.more.type = "button";
      this.more.hidden = true;
      this.list = el("ol", "cbw-msgs");
      this.log.append(this.more, this.list);

      const form = el("form", "cbw-form");
      const label = el("label", "cbw-sr", "Your message");
      label.htmlFor = `cbw-input-${n}`;
      this.input = el("textarea", "cbw-input");
      this.input.id = label.htmlFor;
      this.input.rows = 2;
      this.input.placeholder = "Type your message…";
      this.input.maxLength = 8000;
      const actions = el("div", "cbw-actions");
      this.sendBtn = el("button", "cbw-btn cbw-send", "Send");
      this.sendBtn.type = "submit";
      this.stopBtn = el("button", "cbw-btn cbw-stop", "Stop");
      this.stopBtn.type = "button";
      this.stopBtn.hidden = true;
      this.humanBtn = el("button", "cbw-btn cbw-human", "Talk to a human");
      this.humanBtn.type = "button";
      const fileLabel = el("label", "cbw-btn cbw-attach", "Attach file");
      this.fileInput = el("input", "cbw-file");
      this.fileInput.type = "file";
      this.fileInput.accept = "image/*,application/pdf,audio/*";
      fileLabel.appendChild(this.fileInput);
      this.voiceBtn = el("button", "cbw-btn cbw-voice", "Record voice note");
      this.voiceBtn.type = "button";
      this.voiceBtn.setAttribute("aria-pressed", "false");
      this.voiceBtn.hidden = !(window.MediaRecorder && navigator.mediaDevices &&
                               navigator.mediaDevices.getUserMedia);
      actions.append(this.sendBtn, this.stopBtn, this.humanBtn, fileLabel, this.voiceBtn);
      form.append(label, this.input, actions);
      box.append(head, this.log, form);
      this.root.replaceChildren(box);

      form.addEventListener("submit", (e) => {
        e.preventDefault();
        this.sendText();
      });
      this.input.addEventListener("keydown", (e) => {
        // Enter sends, Shift+Enter is a new line.
        if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
          e.preventDefault();
          this.sendText();
        } else if (e.key === "Escape" && this.streaming) {
          this.cancel(); // the Stop button's shortcut
        }
      });
      this.stopBtn.addEventListener("click", () => this.cancel());
      this.more.addEventListener("click", () => this.loadOlder());
      // Scrolled back to the top: the page before comes in above.
      this.log.addEventListener("scroll", () => {
        if (this.log.scrollTop < 40) this.loadOlder();
      }, { passive: true });
      this.humanBtn.addEventListener("click", () => this.askHuman());
      this.fileInput.addEventListener("change", () => this.sendFile());
      this.voiceBtn.addEventListener("click", () => this.toggleVoice());
      // The label shows the focus of the (transparent) file input laid over it.
      this.fileInput.addEventListener("focus", () => fileLabel.classList.add("cbw-focus"));
      this.fileInput.addEventListener("blur", () => fileLabel.classList.remove("cbw-focus"));
      this.updateButtons();
    }

    async start() {
      try {
        this.token = await this.loadToken();
      } catch (e) {
        this.setStatus("Could not get a chat token. Reload the page to try again.");
        console.warn("chatbox widget:", e);
        return;
      }
      if (!this.token) {
        this.setStatus("No chat token: open this page from a link that carries one.");
        return;
      }
      this.loadSession();
      // A socket can stay "open" long after the network went away (nothing is sent
      // to notice it): when the browser says it is offline, drop it and reconnect
      // as soon as it is back, instead of waiting for a timeout.
      window.addEventListener("offline", () => {
        const ws = this.ws;
        if (!ws) return;
        // Detached at once: its close may take as long as the network is away.
        this.onClose(ws, { code: 4000 });
        ws.close(4000, "offline");
      });
      window.addEventListener("online", () => {
        if (!this.ws && !this.stopped) {
          clearTimeout(this.retry);
          this.retry = null;
          this.attempt = 0;
          this.connect();
        }
      });
      this.connect();
    }

    async loadToken() {
      if (script.dataset.token) return script.dataset.token;
      if (script.dataset.tokenUrl) return fetchToken(script.dataset.tokenUrl);
      return tokenFromFragment();
    }

    connect() {
      const url = new URL(WS_URL);
      url.searchParams.set("token", this.token);
      const ws = new WebSocket(url.href);
      this.ws = ws;
      ws.addEventListener("open", () => {
        this.attempt = 0;
        this.setStatus("Connected");
        this.scheduleRefresh();
        if (this.sessionId) {
          const frame = { type: "resume", session_id: this.sessionId };
          if (this.streaming) frame.after_seq = this.streaming.seq;
          this.send(frame);
        }
        // Messages not acknowledged before the drop: the same id is safe to resend.
        for (const frame of this.pending.values()) this.send(frame);
        this.updateButtons();
      });
      ws.addEventListener("message", (e) => {
        if (ws !== this.ws) return; // a socket already given up on
        let frame;
        try {
          frame = JSON.parse(e.data);
        } catch (_) {
          return; // a broadcast that is not JSON
        }
        this.onFrame(frame);
      });
      ws.addEventListener("close", (e) => this.onClose(ws, e));
    }

    async onClose(ws, e) {
      if (ws !== this.ws) return;
      this.ws = null;
      this.updateButtons();
      if (this.stopped) return;
      if (e.code === 4003) {
        this.setStatus("Disconnected by support. Reload the page to chat again.");
        return;
      }
      if (e.code === 4001) {
        if (!script.dataset.tokenUrl) {
          this.setStatus("Your chat token has expired. Reload the page to continue.");
          return;
        }
        try {
          this.adoptToken(await fetchToken(script.dataset.tokenUrl));
        } catch (_) { /* retried with the backoff below */ }
      }
      const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
      this.attempt += 1;
      const delay = base / 2 + Math.random() * base / 2;
      this.setStatus("Connection lost. Reconnecting…");
      this.retry = setTimeout(() => {
        this.retry = null;
        // Offline, an attempt can only fail: the "online" event reconnects instead.
        if (navigator.onLine !== false) this.connect();
      }, delay);
    }

    /** Names the agent(s) in the chat; "" hides the line. */
    showAgent(names) {
      this.agent.textContent = names ? `You are talking to ${names}` : "";
      this.agent.hidden = !names;
    }

    /**
     * With a token endpoint, the next token is fetched before this one expires and
     * handed to the open socket (`auth_refresh`), so a long chat is never cut.
     */
    scheduleRefresh() {
      clearTimeout(this.refreshTimer);
      const delay = script.dataset.tokenUrl ? refreshDelay(this.token) : null;
      if (delay === null) return;
      if (delay > TIMER_MS_MAX) {
        this.refreshTimer = setTimeout(() => this.scheduleRefresh(), TIMER_MS_MAX);
        return;
      }
      this.refreshTimer = setTimeout(async () => {
        let token;
        try {
          token = await fetchToken(script.dataset.tokenUrl);
        } catch (e) {
          console.warn("chatbox widget: token refresh failed", e);
          return; // an expiry (4001) fetches again before reconnecting
        }
        if (tokenSubject(token) !== tokenSubject(this.token)) {
          // Someone else signed in on the site: their chat, on a socket of their own.
          this.adoptToken(token);
          if (this.ws) this.ws.close(4000, "another user");
          return;
        }
        // Used once the server has taken it (`auth_refreshed`).
        this.nextToken = token;
        if (!this.send({ type: "auth_refresh", id: "refresh", token })) this.scheduleRefresh();
      }, delay);
    }

    /**
     * Takes `token` for the next connection. A token for another user starts over:
     * the conversation shown and the session kept are the previous user's.
     */
    adoptToken(token) {
      const switched = tokenSubject(token) !== tokenSubject(this.token);
      this.token = token;
      if (!switched) return;
      this.list.replaceChildren();
      this.messages.clear();
      this.pending.clear();
      this.streaming = null;
      this.agents.clear();
      this.showAgent("");
      this.loadSession();
    }

    /** The session kept for this token's user (per page origin), if any. */
    loadSession() {
      this.sessionKey = `chatbox.widget.session.${BASE.href}.${tokenSubject(this.token)}`;
      const local = storage("localStorage");
      this.sessionId = local ? local.getItem(this.sessionKey) : null;
    }

    send(frame) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(frame));
      return true;
    }

    setStatus(text) {
      if (this.status.textContent !== text) this.status.textContent = text;
    }

    connected() {
      return !!this.ws && this.ws.readyState === WebSocket.OPEN;
    }

    updateButtons() {
      const up = this.connected();
      const creating = !this.sessionId && this.pending.size > 0;
      this.sendBtn.disabled = !up || creating;
      this.stopBtn.hidden = !this.streaming;
      this.stopBtn.disabled = !up;
      this.humanBtn.disabled = !up || !this.sessionId;
      this.fileInput.disabled = !up || creating;
      this.voiceBtn.disabled = !up || creating;
    }

    rememberSession(id) {
      this.sessionId = id;
      const local = storage("localStorage");
      if (local) local.setItem(this.sessionKey, id);
    }

    forgetSession() {
      this.sessionId = null;
      const local = storage("localStorage");
      if (local) local.removeItem(this.sessionKey);
    }

    // ---- sending -------------------------------------------------------------

    sendText() {
      const content = this.input.value.trim();
      if (!content || this.sendBtn.disabled) return;
      const id = clientId("m");
      const frame = { type: "user_message", id, content };
      this.submit(frame, { role: "user", content });
      this.input.value = "";
    }

    submit(frame, message) {
      if (this.sessionId) frame.session_id = this.sessionId;
      this.pending.set(frame.id, frame);
      this.addMessage(frame.id, message);
      this.send(frame);
      this.updateButtons();
      this.scrollDown();
    }

    cancel() {
      if (this.sessionId) this.send({ type: "cancel", session_id: this.sessionId });
    }

    askHuman() {
      if (this.sessionId) this.send({ type: "help_request", id: clientId("h"), session_id: this.sessionId });
    }

    async upload(blob, name) {
      const url = new URL(UPLOAD_URL);
      url.searchParams.set("name", name);
      const r = await fetch(url.href, {
        method: "POST",
        headers: { Authorization: `Bearer ${this.token}` },
        body: blob,
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error((body.error && body.error.message) || `upload failed (${r.status})`);
      return body;
    }

    async sendFile() {
      const file = this.fileInput.files && this.fileInput.files[0];
      this.fileInput.value = "";
      if (!file) return;
      await this.uploadAndSend(file, file.name || "file", file.type.startsWith("audio/"));
    }

    async uploadAndSend(blob, name, voice) {
      this.setStatus(`Uploading ${name}…`);
      let info;
      try {
        info = await this.upload(blob, name);
      } catch (e) {
        this.note(`Could not send ${name}: ${e.message}`, "cbw-error");
        this.setStatus(this.connected() ? "Connected" : "Connection lost. Reconnecting…");
        return;
      }
      this.setStatus("Connected");
      const id = clientId(voice ? "v" : "f");
      const frame = { type: voice ? "voice_message" : "file_message", id, file_id: info.file_id };
      const caption = voice ? "" : this.input.value.trim();
      if (caption) {
        frame.content = caption;
        this.input.value = "";
      }
      this.submit(frame, { role: "user", content: caption, file: info });
    }

    async toggleVoice() {
      if (this.recorder) {
        this.recorder.stop();
        return;
      }
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      } catch (_) {
        this.note("The microphone is not available; attach an audio file instead.", "cbw-error");
        return;
      }
      const chunks = [];
      const rec = new MediaRecorder(stream);
      this.recorder = rec;
      let recorded = 0;
      rec.addEventListener("dataavailable", (e) => {
        if (!e.data.size) return;
        chunks.push(e.data);
        recorded += e.data.size;
        // Marks the button once there is sound to send (tests wait on it).
        if (recorded >= VOICE_BYTES_MIN) this.voiceBtn.dataset.hasSound = "";
      });
      rec.addEventListener("stop", () => {
        stream.getTracks().forEach((t) => t.stop());
        this.recorder = null;
        this.voiceBtn.textContent = "Record voice note";
        this.voiceBtn.setAttribute("aria-pressed", "false");
        const type = (rec.mimeType || "audio/webm").split(";")[0];
        const ext = type.includes("mp4") ? "m4a" : type.includes("ogg") ? "ogg" : "webm";
        const blob = new Blob(chunks, { type });
        delete this.voiceBtn.dataset.hasSound;
        // A recorder stopped at once yields its container's header alone (a
        // couple of hundred bytes, no sound): told, not sent.
        if (blob.size >= VOICE_BYTES_MIN) this.uploadAndSend(blob, `voice-note.${ext}`, true);
        else this.note("Nothing was recorded; hold on a moment longer before stopping.", "cbw-error");
      });
      // A slice every 250 ms: a note stopped early still has what was captured.
      rec.start(250);
      this.voiceBtn.textContent = "Stop recording and send";
      this.voiceBtn.setAttribute("aria-pressed", "true");
    }

    // ---- receiving -------------------------------------------------------------

    // Long: one switch over every frame type the widget handles.
    onFrame(f) {
      switch (f.type) {
        case "session":
          if (f.created || !this.sessionId) this.rememberSession(f.session_id);
          if (Array.isArray(f.messages)) this.showHistory(f.messages);
          // After a reload or a drop: who (if anyone) has taken the chat over.
          this.agents = new Set(Array.isArray(f.agents) ? f.agents : []);
          this.showAgent([...this.agents].join(", "));
          break;
        case "auth_refreshed":
          if (this.nextToken) this.token = this.nextToken;
          this.nextToken = null;
          this.scheduleRefresh();
          break;
        case "ack": {
          const frame = this.pending.get(f.id);
          this.pending.delete(f.id);
          if (frame && f.session_id && !this.sessionId) this.rememberSession(f.session_id);
          const m = this.messages.get(f.id);
          if (m && f.message_id) {
            this.messages.delete(f.id);
            this.messages.set(f.message_id, m);
            m.li.dataset.messageId = f.message_id;
            m.li.classList.remove("cbw-pending");
          }
          break;
        }
        case "history":
          this.showOlder(f);
          return; // keeps the reader's place: no scrolling to the end
        case "ai_chunk":
          this.onChunk(f);
          break;
        case "ai_done":
          this.onDone(f);
          break;
        case "transcript": {
          const m = this.messages.get(f.message_id);
          if (m) this.setText(m, f.content);
          break;
        }
        case "help_requested":
          this.note("You asked for a person. Someone from support will join shortly.");
          break;
        case "admin_joined":
          this.agents.add(f.admin_name);
          this.showAgent([...this.agents].join(", "));
          this.note(`${f.admin_name} joined the chat.`);
          break;
        case "admin_left":
          // Another agent may still be in the chat.
          this.agents.delete(f.admin_name);
          this.showAgent([...this.agents].join(", "));
          this.note(`${f.admin_name} left the chat. The assistant answers again.`);
          break;
        case "admin_message":
          if (!this.messages.has(f.message_id)) {
            this.addMessage(f.message_id, { role: "admin", content: f.content, name: f.admin_name });
          }
          break;
        case "session_ended":
          this.note("This conversation has ended. Your next message starts a new one.");
          this.forgetSession();
          break;
        case "error":
          this.onError(f);
          break;
        default:
          break;
      }
      this.updateButtons();
      this.scrollDown();
    }

    /**
     * Chunks are shown strictly in `seq` order, each once: a chunk already shown
     * (replayed by `resume`) is dropped, and one that comes early (live chunks can
     * reach a resumed connection before the replay of those it missed) waits
     * until the gap before it is filled.
     */
    onChunk(f) {
      let m = this.messages.get(f.message_id);
      if (!m) {
        m = this.addMessage(f.message_id, { role: "assistant", content: "" });
        m.seq = 0;
      }
      if (m.done || !(f.seq > (m.seq || 0))) return;
      m.seq = m.seq || 0;
      m.ahead = m.ahead || new Map();
      if (m.ahead.size < 4096) m.ahead.set(f.seq, f.content || "");
      let add = "";
      while (m.ahead.has(m.seq + 1)) {
        m.seq += 1;
        add += m.ahead.get(m.seq);
        m.ahead.delete(m.seq);
      }
      m.li.classList.add("cbw-streaming");
      m.li.setAttribute("aria-busy", "true");
      this.streaming = { id: f.message_id, seq: m.seq };
      if (add) this.redrawSoon(m, m.text + add);
      if (m.doneFrame && !m.ahead.size) this.onDone(m.doneFrame);
    }

    onDone(f) {
      const m = this.messages.get(f.message_id);
      if (m && m.ahead && m.ahead.size) {
        m.doneFrame = f; // chunks before it are still on their way (a resume's replay)
        return;
      }
      if (this.streaming && this.streaming.id === f.message_id) this.streaming = null;
      if (!m) return;
      if (this.dirty.has(m)) this.setText(m, m.text); // the end is shown at once
      m.done = true;
      m.li.classList.remove("cbw-streaming");
      m.li.removeAttribute("aria-busy");
      if (f.cancelled) this.markStopped(m);
    }

    markStopped(m) {
      if (m.li.querySelector(".cbw-stopped")) return;
      m.li.classList.add("cbw-cancelled");
      m.li.appendChild(el("p", "cbw-stopped", "Stopped"));
    }

    onError(f) {
      if (f.id === "refresh") {
        // Refused: the current token still holds until its expiry (4001), after
        // which the widget fetches again and reconnects.
        this.nextToken = null;
        console.warn("chatbox widget: token refresh refused:", f.message);
        return;
      }
      if (f.id && this.pending.has(f.id)) {
        const m = this.messages.get(f.id);
        this.sentBefore = new Map([[f.id, this.pending.get(f.id)]]);
        this.pending.delete(f.id);
        if (m) m.li.classList.add("cbw-failed");
      }
      if (f.code === "forbidden" && !f.id && this.sessionId) {
        // The stored session is not ours any more (another user, or gone): start over.
        this.forgetSession();
        return;
      }
      const frame = f.id && this.sentBefore && this.sentBefore.get(f.id);
      if (f.code === "invalid_message" && frame && frame.session_id && /ended/.test(f.message || "")) {
        // The conversation was ended (by support, or idle): this message starts a new one.
        this.forgetSession();
        delete frame.session_id;
        this.pending.set(frame.id, frame);
        this.messages.get(frame.id)?.li.classList.remove("cbw-failed");
        this.send(frame);
        return;
      }
      if (f.code === "rate_limited" && f.id && f.id.startsWith("h-")) {
        const s = Math.ceil((f.retry_after_ms || 60000) / 1000);
        this.note(`Support was just here. You can ask for a person again in ${s} s.`, "cbw-error");
        return;
      }
      const text = {
        rate_limited: "You are sending messages too fast; wait a moment.",
        llm_unavailable: "The assistant is not available right now. Try again, or talk to a human.",
        transcription_failed: "The voice note could not be understood. Try again or type your message.",
      }[f.code] || f.message || "Something went wrong.";
      this.note(text, "cbw-error");
    }

    /** The stored history (on resume): the list is rebuilt from it, keeping what it cannot hold yet. */
    showHistory(messages) {
      const first = messages.length ? messages[0].seq : undefined;
      const older = [];
      const keep = [];
      const stored = new Set(messages.map((h) => h.message_id));
      for (const [id, m] of this.messages) {
        const inHistory = stored.has(id);
        const live = this.streaming && this.streaming.id === id;
        // Pages loaded earlier (older than this history) stay above it.
        if (m.pos !== undefined && first !== undefined && m.pos < first) older.push([id, m]);
        else if (!inHistory && (live || this.pending.has(id))) keep.push([id, m]);
      }
      if (!older.length) this.olderBefore = first > 1 ? first : null;
      this.messages.clear();
      this.list.replaceChildren();
      for (const [id, m] of older) {
        this.messages.set(id, m);
        this.list.appendChild(m.li);
      }
      for (const h of messages) this.addStored(h);
      for (const [id, m] of keep) {
        this.messages.set(id, m);
        this.list.appendChild(m.li);
      }
      if (this.streaming && !keep.some(([id]) => id === this.streaming.id)) this.streaming = null;
      this.more.hidden = !this.olderBefore;
      this.scrollDown(true);
    }

    addStored(h, before) {
      const m = this.addMessage(h.message_id, {
        role: h.role, content: h.content || "", file: h.file, name: h.admin_name,
      }, before);
      m.done = true;
      m.pos = h.seq;
      if (h.cancelled) this.markStopped(m);
      return m;
    }

    loadOlder() {
      if (!this.olderBefore || this.loadingOlder || !this.sessionId) return;
      if (this.send({ type: "history", session_id: this.sessionId, before_seq: this.olderBefore, limit: 30 })) {
        this.loadingOlder = true;
      }
    }

    /** A `history` page: prepended above what is shown, the reader's view kept in place. */
    showOlder(f) {
      this.loadingOlder = false;
      if (f.session_id !== this.sessionId) return;
      const height = this.log.scrollHeight;
      const top = this.list.firstChild;
      for (const h of f.messages || []) {
        if (!this.messages.has(h.message_id)) this.addStored(h, top);
      }
      this.olderBefore = f.before_seq || null;
      this.more.hidden = !this.olderBefore;
      this.log.scrollTop += this.log.scrollHeight - height;
    }

    // ---- rendering ----------------------------------------------------------------

    addMessage(id, { role, content, file, name }, before) {
      const li = el("li", `cbw-msg cbw-${role}`);
      if (!id.startsWith("m_")) li.classList.add("cbw-pending");
      else li.dataset.messageId = id;
      const who = { user: "You", assistant: "Assistant", admin: name || "Support agent", system: "Notice" }[role] || role;
      li.appendChild(el("p", "cbw-who", who));
      if (file) {
        const f = el("p", "cbw-file-info", `${file.mime && file.mime.startsWith("audio/") || /webm|mp4/.test(file.mime || "") ? "🎤 Voice note" : "📎 " + (file.name || "file")} (${sizeText(file.size || 0)})`);
        li.appendChild(f);
      }
      const body = el("div", "cbw-body");
      li.appendChild(body);
      this.list.insertBefore(li, before || null);
      const m = { li, body, text: "", role };
      this.messages.set(id, m);
      this.setText(m, content);
      return m;
    }

    setText(m, text) {
      m.text = text;
      this.dirty.delete(m);
      m.body.replaceChildren(renderMarkdown(text));
    }

    /**
     * A streamed answer is drawn at most once per animation frame: rendering its
     * whole markdown on every chunk would cost the page quadratic time in the
     * answer's length.
     */
    redrawSoon(m, text) {
      m.text = text;
      this.dirty.add(m);
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        for (const d of [...this.dirty]) this.setText(d, d.text);
        this.scrollDown();
      });
    }

    note(text, cls) {
      const li = el("li", `cbw-note${cls ? " " + cls : ""}`, text);
      this.list.appendChild(li);
    }

    scrollDown(force) {
      const log = this.log;
      const near = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
      if (force || near) log.scrollTop = log.scrollHeight;
    }
  }

  function mount() {
    let root = document.querySelector("[data-chatbox-widget]");
    if (!root) {
      root = document.createElement("div");
      root.setAttribute("data-chatbox-widget", "");
      document.body.appendChild(root);
    }
    if (!document.querySelector("link[data-chatbox-widget-css]")) {
      const css = document.createElement("link");
      css.rel = "stylesheet";
      css.href = new URL("widget.css", SRC).href;
      css.setAttribute("data-chatbox-widget-css", "");
      document.head.appendChild(css);
    }
    const w = new Widget(root);
    w.start();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", mount);
  else mount();
})();
