'use strict';
// orderlog bench --client node: N subscribers in one Node.js process, using the `ws` package.
//
// Run by orderlog_bench.nodeclient: `node subscribers.js CONFIG.json`, with NODE_PATH pointing at
// the node_modules the bench installed. CONFIG: {url, urls (optional: several nodes, subscriber i on urls[i % n]), subs: [[token, user, role, channel,
// own_prefix|null]...], setup_timeout}. Talks to the bench by JSON lines: it prints
// {"kind":"ready",...} once every subscription is confirmed, reads {"kind":"go","window":[lo,hi]}
// and {"kind":"stop","expected":{user:n,"*":n},"drain":s} on stdin, then prints {"kind":"result",...}
// in the shape of the Python subscriber workers' result. Latency = receipt time minus the event's
// `at` (both wall clock of this machine; `at` has millisecond resolution).
const fs = require('fs');
const readline = require('readline');
const WebSocket = require('ws');

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const errors = [];
const conns = [];
let subscribed = 0;
let wanted = 0;
let total = 0;
let inWindow = 0;
let foreign = 0;
let window = [0, 0];
let latencies = new Float64Array(1 << 16);
let nLat = 0;
const EVENT_RE = /^\{"type":"([^"]+)","channel":"([^"]+)","seq":(\d+),"prev":(\d+),"stream":"([^"]*)"/;
const AT_RE = /"at":"([^"]+)"/;

function now() { return (performance.timeOrigin + performance.now()) / 1000; }
function send(obj, then) { process.stdout.write(JSON.stringify(obj) + '\n', then); }
function error(text) { if (errors.length < 20) errors.push(text); }

function feed(chain, seq, prev) {
  if (prev !== chain.last || seq <= prev) {
    if (chain.error === null) {
      if (prev !== chain.last) {
        const kind = prev > chain.last ? 'gap' : 'duplicate or reorder';
        chain.error = `${chain.channel}: ${kind}: event ${seq} has prev ${prev}, but the last seq received was ${chain.last}`;
      } else {
        chain.error = `${chain.channel}: seq ${seq} does not follow prev ${prev}`;
      }
    }
    chain.last = Math.max(chain.last, seq);
    return;
  }
  chain.last = seq;
  chain.count += 1;
}

function onMessage(conn, data) {
  const text = data.toString();
  const t = now();
  const m = EVENT_RE.exec(text);
  if (m !== null) {
    const chain = conn.chains.get(m[2]);
    if (chain === undefined) { error(`event on ${m[2]}, which this connection did not subscribe`); return; }
    feed(chain, Number(m[3]), Number(m[4]));
    total += 1;
    if (conn.prefix !== null && !m[5].startsWith(conn.prefix)) {
      foreign += 1;
      if (foreign <= 3) error(`${conn.user} received ${m[5]}, an order that is not theirs`);
    }
    if (window[0] <= t && t < window[1]) {
      inWindow += 1;
      const at = AT_RE.exec(text);
      if (at !== null) {
        if (nLat === latencies.length) {
          const bigger = new Float64Array(latencies.length * 2);
          bigger.set(latencies);
          latencies = bigger;
        }
        latencies[nLat++] = t - Date.parse(at[1]) / 1000;
      }
    }
    return;
  }
  let reply;
  try { reply = JSON.parse(text); } catch (e) { error(`${conn.user}: not JSON: ${text.slice(0, 200)}`); return; }
  if (reply.type === 'subscribed') {
    conn.chains.set(reply.channel, { channel: reply.channel, last: reply.since, count: 0, error: null });
    subscribed += 1;
    if (conn.settle) conn.settle();
    if (subscribed === wanted) ready();
  } else if (reply.type === 'error') {
    error(`${conn.user}: error ${reply.code}: ${reply.message}`);
  } else if (!['welcome', 'pong', 'ack', 'live'].includes(reply.type)) {
    error(`${conn.user}: unexpected frame ${text.slice(0, 200)}`);
  }
}

let readySent = false;
function ready() {
  if (readySent) return;
  readySent = true;
  clearTimeout(setupTimer);
  send({ kind: 'ready', subscribed, wanted, errors: errors.slice(0, 10) });
}
const setupTimer = setTimeout(ready, (config.setup_timeout || 120) * 1000);

// Several nodes of one log (config.urls): subscriber i connects to urls[i % urls.length]. At most
// OPENING handshakes are in flight at once, as when clients arrive, not all at one instant: a
// server keeps a share of its connection slots for handshakes and answers 503 beyond it.
const OPENING = 200;
const urls = config.urls || [config.url];
wanted = config.subs.length;
let nextSub = 0;
let opening = 0;
function openMore() {
  while (opening < OPENING && nextSub < config.subs.length) openOne(nextSub++);
}
function openOne(i) {
  const [token, user, role, channel, prefix] = config.subs[i];
  const url = urls[i % urls.length];
  const sep = url.includes('?') ? '&' : '?';
  const ws = new WebSocket(url + sep + 'token=' + encodeURIComponent(token), { perMessageDeflate: false });
  const conn = { ws, user, role, prefix, chains: new Map(), closed: false, settle: null };
  opening += 1;
  conn.settle = () => { conn.settle = null; opening -= 1; openMore(); };  // subscribed, failed or closed
  conns.push(conn);
  ws.on('open', () => ws.send(JSON.stringify({ type: 'subscribe', channel })));
  ws.on('message', (data) => onMessage(conn, data));
  ws.on('error', (e) => { error(`${user}: ${e.message}`); if (conn.settle) conn.settle(); if (!readySent) ready(); });
  ws.on('close', (code) => {
    conn.closed = true;
    if (conn.settle) conn.settle();
    if (!stopping) error(`${user}: closed ${code}`);
  });
}
openMore();

let stopping = false;
function finish(expected) {
  const short = [];
  let chainErrors = [];
  for (const conn of conns) {
    const want = conn.prefix !== null ? (expected[conn.user] || 0) : (expected['*'] || 0);
    for (const chain of conn.chains.values()) {
      if (chain.error) chainErrors.push(chain.error);
      if (chain.count !== want) short.push(`${conn.user} ${chain.channel}: received ${chain.count} events, expected ${want}`);
    }
  }
  stopping = true;
  let subscriptions = 0;
  for (const conn of conns) { subscriptions += conn.chains.size; conn.ws.terminate(); }
  send({ kind: 'result', total, in_window: inWindow, latencies: Array.from(latencies.subarray(0, nLat)),
         chain_errors: chainErrors.slice(0, 10), incomplete: short.length, incomplete_examples: short.slice(0, 5),
         foreign, errors: errors.slice(0, 20), subscriptions }, () => process.exit(0));  // a pipe: exit once written
}

function complete(expected) {
  for (const conn of conns) {
    const want = conn.prefix !== null ? (expected[conn.user] || 0) : (expected['*'] || 0);
    for (const chain of conn.chains.values()) {
      if (chain.count < want && !chain.error && !conn.closed) return false;
    }
  }
  return true;
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.kind === 'go') {
    window = msg.window;
  } else if (msg.kind === 'stop') {
    const deadline = Date.now() + (msg.drain || 30) * 1000;
    const poll = () => {
      if (complete(msg.expected) || Date.now() >= deadline) finish(msg.expected);
      else setTimeout(poll, 20);
    };
    poll();
  }
}).on('close', () => { if (!stopping) process.exit(1); });
