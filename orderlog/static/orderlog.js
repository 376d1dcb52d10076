/**
 * orderlog.js: a dependency-free browser client for the orderlog WebSocket protocol (v1).
 *
 *   import { OrderlogClient } from "/orderlog.js";
 *   const client = new OrderlogClient("ws://127.0.0.1:8765/v1/ws", token, {
 *     onStatus: (s) => console.log(s.text),           // connected / reconnecting in 3 s / resumed from seq 41
 *   });
 *   client.subscribe("orders", { since: 0, onEvent: (e) => console.log(e.seq, e.type) });
 *   // or start from the projection: the rows as of a seq N, then the events after N (v1.2)
 *   client.subscribe("orders", { snapshot: true, onSnapshot: (rows, frame) => ..., onEvent: ... });
 *   client.start();
 *   const ack = await client.command("place_order", { orderId: "o-1", data: { items: [{ sku: "kibble", quantity: 1 }] } });
 *
 * It behaves like the Python client (orderlog/client): it reconnects on its own with
 * exponential backoff and jitter (the n-th wait in a row is drawn between half and all of
 * min(30 s, 1 s x 2^(n-1)): 0.5-1 s, 1-2 s, 2-4 s ... 15-30 s; it starts over after a
 * connection that stayed up 10 s), resubscribes every channel after the last seq it delivered
 * together with the log_id and the anchor (the newest event delivered with its hash) of what it
 * delivered, drops duplicates (seq <= last), resubscribes from the last seq when an event's
 * `prev` shows a hole, and resends unacknowledged requests with the same id, so a command is
 * applied at most once. When the server's log is not the one the subscription's events came
 * from (another log, a restored backup, a failover), the resume is refused: onError gets
 * `resync_required`, the subscription ends, and the app drops its state and subscribes again
 * from since 0. Built on the browser's native WebSocket; no build step.
 *
 * The token goes in a first `auth` message, not in the URL, so it does not end up in proxy logs
 * or the browser's console. `{tokenInUrl: true}` sends it as `?token=` instead (for a server
 * that wants it in the handshake). Instead of a token, pass a token provider: a function, sync
 * or async, that returns a fresh one. It is called before every connect, and before the token
 * expires (30 s before, or after 80 % of its remaining life at welcome if that is shorter), and
 * its token is sent in band (`auth`, a new welcome follows); a close for an expired token then
 * reconnects with a fresh one instead of signing out. A provider that fails before the first
 * connect signs out (state "unauthorized"); later, it only delays the reconnect.
 *
 * Fast on big replays: a burst of WebSocket messages is queued as it arrives and handled in
 * one task (parse, check, deliver), and an "event" DOM event is built only when someone
 * listens for it.
 *
 * Events (the client is an EventTarget; each also has a callback option):
 *   "status"  detail {state, text, ...}   state: connecting | connected | resumed | reconnecting | unauthorized | closed;
 *                                        on reconnecting, `opened` says whether the last socket opened at all
 *   "event"   detail EVENT               every event delivered on any subscription
 *   "welcome" detail WELCOME
 *   "error"   detail {code, message}     an error reply that no request or subscription claimed
 */

export const BACKOFF_START_MS = 1000;
export const BACKOFF_CAP_MS = 30000;
export const STABLE_AFTER_MS = 10000; // connected this long: the backoff starts over
const UNAUTHORIZED = 4001; // the server's close code for a refused token
const SUB_ID = "sub-"; // subscribe requests carry id "sub-N" so a refusal finds its subscription
const AUTH_ID = "auth-"; // in-band refreshes carry id "auth-N"
const REFRESH_LEAD_MS = 30000; // a provider's token is refreshed this long before expiry at the latest ...
const REFRESH_SHARE = 0.2; // ... or after 80 % of the life it had left at welcome, if shorter
const TOKEN_EXPIRED = "token expired"; // the close reason after which a fresh token may help

/** An `error` reply: `code` is the protocol's error code. */
export class OrderlogError extends Error {
  constructor(code, message, details) {
    super(`${code}: ${message}`);
    this.name = "OrderlogError";
    this.code = code;
    this.details = details || {};
  }
}

/** A random hex id (works outside secure contexts too, unlike crypto.randomUUID). */
export function randomId(bytes = 16) {
  const buf = new Uint8Array(bytes);
  crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The WebSocket URL of the server that served this page (same host and port, /v1/ws). */
export function defaultUrl(location = globalThis.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/ws`;
}

class Subscription {
  constructor(client, channel, since, requestId, options) {
    this.client = client;
    this.channel = channel;
    this.last = since; // the last seq delivered (null: live only, until `subscribed` says where)
    this.anchor = options.anchor || null; // {seq, hash}: the newest event delivered with its hash
    this.logId = options.logId || null; // the log that the delivered events come from
    this.requestId = requestId;
    this.onEvent = options.onEvent || null;
    this.onLive = options.onLive || null;
    this.onError = options.onError || null;
    this.onSubscribed = options.onSubscribed || null;
    this.onSnapshot = options.onSnapshot || null;
    this.snapshot = Boolean(options.snapshot) && since === null; // start from the projection
    this.snapshotSeq = null; // the seq of the snapshot being received
    this.snapshotHash = null; // the hash of event snapshotSeq, if this user's feeds carry it
    this.resubscribing = false; // a resubscribe is on its way: ignore events until it is answered
    this.resumed = false; // the next `subscribed` answers a resubscribe after a reconnect
  }

  /** Stop this subscription (sends `unsubscribe` if connected). */
  close() {
    this.client.unsubscribe(this.channel);
  }
}

export class OrderlogClient extends EventTarget {
  /**
   * @param {string|string[]} url  ws:// or wss:// URL of the /v1/ws endpoint, or the URLs of
   *                          several nodes of one log: after a failed connect or a lost
   *                          connection the client moves to the next one, in a circle
   * @param {string|function} token  a JWT, sent in a first `auth` message (browsers cannot set
   *                          headers), or a provider: a function (sync or async) returning one
   * @param {object} options  onStatus(status), backoffStart, backoffCap, stableAfter (ms),
   *                          tokenInUrl (send the token as ?token= instead),
   *                          WebSocket (a constructor, for tests)
   */
  constructor(url, token, options = {}) {
    super();
    this.urls = Array.isArray(url) ? [...url] : [url];
    if (!this.urls.length || !this.urls.every((u) => typeof u === "string" && u)) {
      throw new TypeError("OrderlogClient needs a server URL (or a non-empty list of them)");
    }
    this._urlIndex = 0;
    this.token = token;
    this.onStatus = options.onStatus || null;
    this.backoffStart = options.backoffStart ?? BACKOFF_START_MS;
    this.backoffCap = options.backoffCap ?? BACKOFF_CAP_MS;
    this.stableAfter = options.stableAfter ?? STABLE_AFTER_MS;
    this.tokenInUrl = options.tokenInUrl ?? false;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.welcome = null;
    this.logId = null; // the current welcome's log_id
    this.status = { state: "closed", text: "not connected" };
    this._ws = null;
    this._ready = false; // welcome received on the current socket
    this._stopped = true;
    this._attempt = 0;
    this._timer = null;
    this._refreshTimer = null;
    this._opening = false; // a provider is being asked for the token to connect with
    this._everConnected = false;
    this._subs = new Map(); // channel -> Subscription
    this._pending = new Map(); // request id -> {frame, resolve, reject}
    this._nextId = 1;
    this._inbox = []; // messages of the current burst, handled together (_drain)
    this._draining = false;
    this._eventListeners = 0; // "event" listeners: no CustomEvent per event without one
    const channel = typeof MessageChannel === "function" ? new MessageChannel() : null;
    this._wakeDrain = channel
      ? ((channel.port1.onmessage = () => this._drain()), () => channel.port2.postMessage(0))
      : () => setTimeout(() => this._drain(), 0);
  }

  addEventListener(type, listener, options) {
    if (type === "event") this._eventListeners++;
    super.addEventListener(type, listener, options);
  }

  removeEventListener(type, listener, options) {
    if (type === "event") this._eventListeners = Math.max(0, this._eventListeners - 1);
    super.removeEventListener(type, listener, options);
  }

  // -- lifecycle -----------------------------------------------------------------------

  /** Connect, and keep reconnecting until close() or a refused token. */
  start() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._attempt = 0;
    this._open();
    return this;
  }

  /** Close for good: no reconnect; unanswered requests are rejected. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    this._timer = this._refreshTimer = null;
    this._inbox = []; // nothing more is delivered
    const ws = this._ws;
    this._ws = null;
    this._ready = false;
    if (ws) ws.close(1000, "client closed");
    this._rejectAll(new OrderlogError("closed", "the client was closed"));
    this._setStatus({ state: "closed", text: "not connected" });
  }

  /** Skip the rest of the backoff wait and try now. */
  reconnectNow() {
    if (this._stopped || this._ws || this._opening) return;
    clearTimeout(this._timer);
    this._timer = null;
    this._open();
  }

  /** Use a new token (or provider): sent in band now if connected (a new welcome follows), else on connect. */
  setToken(token) {
    this.token = token;
    if (this._ready) this._refresh();
  }

  // -- requests ------------------------------------------------------------------------

  /**
   * Subscribe to a channel (`orders`, `inventory` or `order:<id>`) after seq `since`
   * (omit it for live only), or with `snapshot: true` (no `since`): the rows as of a seq N
   * first (onSnapshot(rows, frame), called per `snapshot` frame; a frame that carries `total`
   * starts a snapshot: drop what an unfinished earlier one gave), then the events after N.
   * After a reconnect it resumes from the last seq delivered (a snapshot again only if the
   * first one was not complete). Callbacks: onEvent(event), onLive(seq), onSubscribed(reply),
   * onError(OrderlogError): a refused subscribe, e.g. resync_required, ends the subscription.
   * An app that kept state from an earlier page also passes `anchor` ({seq, hash} of the newest
   * event it holds with a hash) and the `logId` it came from.
   */
  subscribe(channel, options = {}) {
    if (this._subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const since = options.since ?? null;
    const sub = new Subscription(this, channel, since, `${SUB_ID}${this._nextId++}`, options);
    this._subs.set(channel, sub);
    if (this._ready) this._send(this._subscribeFrame(sub));
    return sub;
  }

  unsubscribe(channel) {
    if (this._subs.delete(channel) && this._ready) this._send({ type: "unsubscribe", channel });
  }

  /** Send a command; resolves with its `ack`, rejects with OrderlogError. */
  command(name, { orderId, data, expectedVersion, id } = {}) {
    const frame = { type: "command", id: id || randomId(), name };
    if (orderId !== undefined && orderId !== null) frame.order_id = orderId;
    if (data !== undefined && data !== null) frame.data = data;
    if (expectedVersion !== undefined && expectedVersion !== null) frame.expected_version = expectedVersion;
    return this.request(frame);
  }

  /** The current state of an order: resolves with the `order` object. */
  async getOrder(orderId) {
    return (await this.request({ type: "get", order_id: orderId })).order;
  }

  /** The current stock of a sku: resolves with the `stock` object. */
  async getStock(sku) {
    return (await this.request({ type: "get", sku })).stock;
  }

  /** Any request; resolves with its reply, rejects with OrderlogError. Resent after a reconnect. */
  request(frame) {
    frame = { ...frame };
    if (!frame.id) frame.id = `r${this._nextId++}`;
    return new Promise((resolve, reject) => {
      this._pending.set(frame.id, { frame, resolve, reject });
      if (this._ready) this._send(frame);
    });
  }

  // -- the connection ------------------------------------------------------------------

  /** The token to connect or refresh with: the fixed one, or what the provider returns now. */
  async _freshToken() {
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (typeof token !== "string" || !token) throw new Error(`the token provider returned ${typeof token}, not a token`);
    return token;
  }

  _open() {
    this._timer = null;
    if (typeof this.token !== "function") {
      this._connect(this.token);
      return;
    }
    this._opening = true;
    this._freshToken().then(
      (token) => {
        this._opening = false;
        if (!this._stopped && !this._ws) this._connect(token);
      },
      (err) => {
        this._opening = false;
        if (this._stopped) return;
        if (!this._everConnected) {
          this._stopped = true;
          const reason = `no token: ${err.message}`;
          this._rejectAll(new OrderlogError("unauthorized", reason));
          this._setStatus({ state: "unauthorized", text: `signed out: ${reason}`, reason });
          return;
        }
        this._scheduleReconnect(null, `no token: ${err.message}`);
      },
    );
  }

  _connect(token) {
    const sep = this.url.includes("?") ? "&" : "?";
    const url = this.tokenInUrl ? `${this.url}${sep}token=${encodeURIComponent(token)}` : this.url;
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (err) {
      this._scheduleReconnect(null, `cannot connect: ${err.message}`);
      return;
    }
    this._ws = ws;
    this._ready = false;
    let openedAt = null;
    this._setStatus({ state: "connecting", text: this._everConnected ? "reconnecting…" : "connecting…" });
    ws.onopen = () => {
      openedAt = Date.now();
      // The token's first way in: the auth message, before anything else (requests wait for welcome).
      if (!this.tokenInUrl && ws === this._ws) ws.send(JSON.stringify({ type: "auth", token }));
    };
    ws.onmessage = (message) => {
      if (ws !== this._ws) return;
      this._inbox.push(message.data);
      if (!this._draining) {
        this._draining = true;
        this._wakeDrain();
      }
    };
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (close) => {
      if (ws !== this._ws) return;
      this._drain(); // what came before the close, first
      const welcomed = this._ready;
      this._ws = null;
      this._ready = false;
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      const refreshable = typeof this.token === "function" && welcomed && close.reason === TOKEN_EXPIRED;
      if (close.code === UNAUTHORIZED && !refreshable) {
        this._stopped = true;
        const reason = close.reason || "authentication failed";
        this._rejectAll(new OrderlogError("unauthorized", reason));
        this._setStatus({ state: "unauthorized", text: `signed out: ${reason}`, reason });
        return;
      }
      if (this._stopped) return;
      if (openedAt !== null && Date.now() - openedAt >= this.stableAfter) this._attempt = 0;
      this._scheduleReconnect(close.code, close.reason, openedAt !== null);
    };
  }

  /** The server URL the client is connected to (or tries next). */
  get url() {
    return this.urls[this._urlIndex];
  }

  _scheduleReconnect(code, reason, opened = false) {
    this._urlIndex = (this._urlIndex + 1) % this.urls.length; // the next node, when there are several
    const base = Math.min(this.backoffCap, this.backoffStart * 2 ** this._attempt);
    const delay = base / 2 + Math.random() * (base / 2); // jitter: between half and all of it
    this._attempt = Math.min(this._attempt + 1, 30);
    const at = Date.now() + delay;
    this._setStatus({
      state: "reconnecting",
      text: `reconnecting in ${Math.ceil(delay / 1000)} s`,
      delay,
      at,
      code,
      reason,
      opened,
    });
    this._timer = setTimeout(() => this._open(), delay);
  }

  /** With a provider: a fresh token in band before this welcome's token expires. */
  _scheduleRefresh(welcome) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const expires = Date.parse(welcome.expires_at);
    if (typeof this.token !== "function" || Number.isNaN(expires)) return;
    const left = Math.max(0, expires - Date.now());
    const delay = Math.max(0, left - Math.min(REFRESH_LEAD_MS, left * REFRESH_SHARE));
    const ws = this._ws;
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      if (ws === this._ws) this._refresh();
    }, delay);
  }

  /** Send the current token (or the provider's fresh one) in band; a new welcome answers. */
  _refresh() {
    const ws = this._ws;
    this._freshToken().then(
      (token) => {
        if (ws === this._ws && this._ready) this._send({ type: "auth", id: `${AUTH_ID}${this._nextId++}`, token });
      },
      // The server closes with `token expired`; the reconnect asks the provider again.
      (err) => this._setStatus({ ...this.status, text: `${this.status.text} (no fresh token: ${err.message})` }),
    );
  }

  _subscribeFrame(sub) {
    const frame = { type: "subscribe", id: sub.requestId, channel: sub.channel };
    if (sub.last !== null) {
      frame.since = sub.last;
      if (sub.logId !== null) frame.log_id = sub.logId;
      if (sub.anchor !== null) frame.anchor = sub.anchor;
    } else if (sub.snapshot) {
      frame.snapshot = true;
      sub.snapshotSeq = null;
    }
    return frame;
  }

  /** Handle the messages queued since the last turn, in order, in this one task. */
  _drain() {
    this._draining = false;
    const inbox = this._inbox;
    if (!inbox.length) return;
    this._inbox = [];
    for (let i = 0; i < inbox.length; i++) this._receive(inbox[i]);
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return; // resent on reconnect
    ws.send(JSON.stringify(frame));
  }

  _receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message === null || typeof message !== "object") return;
    const { type } = message;
    if (message.prev !== undefined && typeof message.seq === "number" && typeof message.channel === "string") {
      this._deliver(message);
      return;
    }
    if (type === "snapshot") {
      this._snapshotFrame(message);
      return;
    }
    if (type === "welcome") {
      this._welcome(message);
      return;
    }
    if (type === "live") {
      const sub = this._subs.get(message.channel);
      if (sub && sub.onLive) sub.onLive(message.seq);
      this.dispatchEvent(new CustomEvent("live", { detail: message }));
      return;
    }
    const id = message.id;
    if (typeof id === "string" && id.startsWith(SUB_ID)) {
      this._subscribeReply(id, message);
      return;
    }
    const pending = typeof id === "string" ? this._pending.get(id) : undefined;
    if (pending) {
      this._pending.delete(id);
      if (type === "error") pending.reject(new OrderlogError(message.code, message.message || "", message.details));
      else pending.resolve(message);
    } else if (type === "error") {
      this.dispatchEvent(new CustomEvent("error", { detail: message }));
    }
  }

  _welcome(welcome) {
    const first = this.welcome === null && !this._everConnected;
    this.welcome = welcome;
    this.dispatchEvent(new CustomEvent("welcome", { detail: welcome }));
    this._scheduleRefresh(welcome);
    if (this._ready) return; // a refreshed token: same connection, nothing to resend
    this._ready = true;
    this._everConnected = true;
    this.logId = welcome.log_id;
    this._setStatus({ state: "connected", text: "connected", head: welcome.head, user: welcome.user, role: welcome.role });
    for (const sub of this._subs.values()) {
      sub.resubscribing = false;
      sub.resumed = !first && sub.last !== null;
      this._send(this._subscribeFrame(sub));
    }
    for (const pending of this._pending.values()) this._send(pending.frame);
  }

  _subscribeReply(id, message) {
    let sub = null;
    for (const s of this._subs.values()) if (s.requestId === id) sub = s;
    if (!sub) return;
    if (message.type === "error") {
      this._subs.delete(sub.channel); // resync_required: the app starts over from since 0
      const error = new OrderlogError(message.code, message.message || "", message.details);
      if (sub.onError) sub.onError(error);
      else this.dispatchEvent(new CustomEvent("error", { detail: message }));
      return;
    }
    if (message.type !== "subscribed") return;
    sub.resubscribing = false;
    sub.logId = this.logId; // what follows comes from this connection's log
    if (message.snapshot === true) {
      sub.snapshotSeq = message.since; // rows first; `last` once they are all here
      sub.snapshotHash = typeof message.hash === "string" ? message.hash : null;
    } else if (sub.last === null) sub.last = message.since; // live only: resume from here later
    if (sub.onSubscribed) sub.onSubscribed(message);
    if (sub.resumed) {
      sub.resumed = false;
      this._setStatus({
        state: "resumed",
        text: `resumed from seq ${message.since}`,
        channel: sub.channel,
        seq: message.since,
        head: message.head,
      });
    }
  }

  _snapshotFrame(frame) {
    const sub = this._subs.get(frame.channel);
    if (!sub || sub.last !== null || sub.snapshotSeq !== frame.seq) return;
    if (sub.onSnapshot) sub.onSnapshot(frame.rows, frame);
    if (frame.last) {
      sub.last = frame.seq; // complete: from now on, resume after it, anchored on it
      if (sub.snapshotHash !== null) sub.anchor = { seq: frame.seq, hash: sub.snapshotHash };
    }
  }

  _deliver(event) {
    const sub = this._subs.get(event.channel);
    if (!sub || sub.last === null) return;
    if (sub.last !== null && event.seq <= sub.last) return; // a duplicate after a resubscribe
    if (sub.last !== null && event.prev !== sub.last) {
      // A hole that may hide an event meant for us: resume from what we hold.
      if (!sub.resubscribing) {
        sub.resubscribing = true;
        this._send(this._subscribeFrame(sub));
      }
      return;
    }
    sub.last = event.seq;
    if (typeof event.hash === "string" && !event.redacted) sub.anchor = { seq: event.seq, hash: event.hash };
    if (sub.onEvent) sub.onEvent(event);
    if (this._eventListeners) this.dispatchEvent(new CustomEvent("event", { detail: event }));
  }

  _rejectAll(error) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) p.reject(error);
  }

  _setStatus(status) {
    this.status = status;
    if (this.onStatus) this.onStatus(status);
    this.dispatchEvent(new CustomEvent("status", { detail: status }));
  }
}
