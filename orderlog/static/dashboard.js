// The live dashboard: orders and stock from a snapshot of `orders` and `inventory` (the rows
// as of a seq, PROTOCOL.md section 6), then folded from the events after it; kept current by
// orderlog.js, which reconnects and resumes from the last seq on its own (a new snapshot only
// when it holds nothing, or after resync_required).
import { OrderlogClient, defaultUrl } from "/orderlog.js";

const TOKEN_KEY = "orderlog.token"; // sessionStorage: this tab only, never the URL
const MAX_ROWS = 500; // newest orders shown; the rest are counted
const ACTIVITY_ROWS = 14;
const LOW_STOCK = 5; // available at or below this is shown in amber
const RENDER_DELAY_MS = 30; // events are folded at once, the DOM is updated at most this often
const LOADING_DELAY_MS = 150; // the same while a snapshot of `orders` comes in
const FLASH_MS = 2400;
const STATUSES = ["placed", "approved", "shipped", "delivered", "cancelled"];
const STAFF_ACTIONS = { placed: ["approve", "cancel"], approved: ["ship", "cancel"], shipped: ["deliver"] };
const COMMANDS = { approve: "approve_order", ship: "ship_order", deliver: "deliver_order", cancel: "cancel_order" };
const NEW_STATUS = {
  "order-approved": "approved",
  "order-shipped": "shipped",
  "order-delivered": "delivered",
  "order-cancelled": "cancelled",
};

const $ = (id) => document.getElementById(id);

let client = null;
let me = { user: null, role: null };
let orders = new Map(); // order_id -> order
let stock = new Map(); // sku -> {sku, name, available, reserved, version, last_seq}
let activity = [];
let live = { orders: false, inventory: false };
let loading = null; // {got, total} while an `orders` snapshot is coming in, else null
let rows = new Map(); // order_id -> {tr, version}
let filter = { status: null, text: "" };
let renderTimer = null;
let countdown = null;

// -- folding events into state -------------------------------------------------------------

function foldOrder(event) {
  const id = event.stream.slice("order:".length);
  let order = orders.get(id);
  if (event.type === "order-created") {
    const d = event.data;
    order = {
      order_id: id, customer: d.customer, items: d.items || [], ship_to: d.ship_to, note: d.note,
      status: "placed", created_at: event.at,
    };
    orders.set(id, order);
    order.flash = live.orders;
  } else if (!order) {
    return; // cannot happen: the snapshot or an order-created came first
  } else if (event.type === "order-updated") {
    Object.assign(order, event.data);
  } else if (NEW_STATUS[event.type]) {
    order.status = NEW_STATUS[event.type];
    order.flash = true; // a status change: highlight it (also when resumed after a reconnect)
  }
  order.version = event.version;
  order.last_seq = event.seq;
  order.updated_at = event.at;
}

// A snapshot frame of `orders`: its rows are `order` shapes. The first frame (it carries
// `total`) starts the snapshot: whatever an unfinished earlier one gave is dropped.
// Until its last frame the table is not drawn (the newest rows change with every frame: drawing
// them each time cost more than the rows themselves); the tiles count up and say how far it is.
function takeOrderRows(rows, frame) {
  if (frame.total !== undefined) {
    orders = new Map();
    loading = { got: 0, total: frame.total };
  }
  for (const row of rows) orders.set(row.order_id, row);
  if (loading) loading.got += rows.length;
  if (frame.last && loading) {
    loading = null;
    clearTimeout(renderTimer); // the table now, not at the end of a loading-time delay
    renderTimer = null;
  }
  scheduleRender();
}

function takeStockRows(rows, frame) {
  if (frame.total !== undefined) stock = new Map();
  for (const row of rows) stock.set(row.sku, row);
  scheduleRender();
}

function foldStock(event) {
  const sku = event.data.sku || event.stream.slice("sku:".length);
  let s = stock.get(sku);
  if (!s) {
    s = { sku, name: null, available: 0, reserved: 0 };
    stock.set(sku, s);
  }
  const q = event.data.quantity || 0;
  switch (event.type) {
    case "stock-added":
      s.available += q;
      if (event.data.name) s.name = event.data.name;
      break;
    case "stock-reserved":
      s.available -= q;
      s.reserved += q;
      break;
    case "stock-shipped":
      s.reserved -= q;
      break;
    case "stock-released":
      s.available += q;
      s.reserved -= q;
      break;
  }
  s.version = event.version;
  s.last_seq = event.seq;
  s.flash = live.inventory;
}

function noteActivity(event) {
  // Two channels interleave (and replay one after the other): keep the newest by seq.
  activity.push(event);
  activity.sort((a, b) => b.seq - a.seq);
  if (activity.length > ACTIVITY_ROWS) activity.length = ACTIVITY_ROWS;
}

// -- connecting ----------------------------------------------------------------------------

function start(token) {
  stop();
  resetState();
  client = new OrderlogClient(defaultUrl(), token, { onStatus: showStatus });
  client.addEventListener("welcome", (e) => {
    me = { user: e.detail.user, role: e.detail.role };
    $("who").innerHTML = `${escape(me.user)} <span class="badge role-${escape(me.role)}">${escape(me.role)}</span>`;
    $("head").textContent = `head ${e.detail.head}`;
    showBoard();
    scheduleRender();
  });
  subscribeOrders();
  subscribeInventory();
  showBoard();
  client.start();
}

function subscribeOrders() {
  client.subscribe("orders", {
    snapshot: true,
    onSnapshot: takeOrderRows,
    onEvent: (event) => {
      foldOrder(event);
      noteActivity(event);
      scheduleRender();
    },
    onLive: () => {
      live.orders = true;
      scheduleRender();
    },
    onError: (error) => restartChannel(error, "orders"),
  });
}

function subscribeInventory() {
  client.subscribe("inventory", {
    snapshot: true,
    onSnapshot: takeStockRows,
    onEvent: (event) => {
      foldStock(event);
      if (event.type === "stock-added") noteActivity(event);
      scheduleRender();
    },
    onLive: () => {
      live.inventory = true;
      scheduleRender();
    },
    onError: (error) => restartChannel(error, "inventory"),
  });
}

function restartChannel(error, channel) {
  if (error.code !== "resync_required") {
    toast(`${channel}: ${error.message}`);
    return;
  }
  // The server's log is not the one we folded (another log, a restored backup, a failover):
  // drop everything folded from this channel and start over from a snapshot.
  toast("The server's log changed: reloading everything.");
  const prefix = channel === "orders" ? "order:" : "sku:";
  activity = activity.filter((event) => !event.stream.startsWith(prefix));
  if (channel === "orders") {
    orders = new Map();
    rows = new Map();
    loading = null;
    $("orders").tBodies[0].replaceChildren();
    live.orders = false;
    subscribeOrders();
  } else {
    stock = new Map();
    live.inventory = false;
    subscribeInventory();
  }
  scheduleRender();
}

function stop() {
  if (client) client.close();
  client = null;
}

function resetState() {
  orders = new Map();
  stock = new Map();
  rows = new Map();
  activity = [];
  live = { orders: false, inventory: false };
  loading = null;
  $("orders").tBodies[0].replaceChildren();
}

function showStatus(status) {
  const box = $("connection");
  clearInterval(countdown);
  countdown = null;
  if (status.state === "reconnecting" && !status.opened) checkOrigin();
  if (status.state === "connected" || status.state === "closed") $("hint").hidden = true;
  if (status.state === "resumed" && status.channel !== "orders") return;
  box.dataset.state = status.state;
  $("retry").hidden = status.state !== "reconnecting";
  const text = $("connection-text");
  if (status.state === "reconnecting") {
    const tick = () => {
      const left = Math.max(0, Math.ceil((status.at - Date.now()) / 1000));
      text.textContent = `reconnecting in ${left} s`;
    };
    tick();
    countdown = setInterval(tick, 250);
  } else if (status.state === "unauthorized") {
    text.textContent = "signed out";
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn(`The server refused the token: ${status.reason}.`);
  } else {
    text.textContent = status.text;
  }
}

// A WebSocket the server refuses (HTTP 403 for an Origin not on its allow_origin list) only
// shows the page a close with no reason. Ask the endpoint over plain HTTP: a POST carries this
// page's Origin, and the server answers 403 when it would refuse it.
async function checkOrigin() {
  let refused = false;
  try {
    const url = defaultUrl().replace(/^ws/, "http");
    refused = (await fetch(url, { method: "POST", cache: "no-store" })).status === 403;
  } catch {
    return; // the server is down: the countdown says enough
  }
  const hint = $("hint");
  hint.hidden = !refused;
  if (refused) {
    const origin = escape(location.origin);
    hint.innerHTML = `The server refuses connections from this page's origin, <code>${origin}</code>: it is not on the
      server's <code>allow_origin</code> list. Add it (<code>--allow-origin ${origin}</code>, or
      <code>allow_origin</code> in the settings file) and restart the server; this page keeps retrying.`;
  }
}

// -- rendering -----------------------------------------------------------------------------

let renderMs = 0; // how long the last render took: renders never take more than a third of the time

function scheduleRender() {
  if (renderTimer !== null) return;
  // While a snapshot comes in, the tiles count up a few times a second: each render counts every order.
  renderTimer = setTimeout(render, Math.max(loading ? LOADING_DELAY_MS : RENDER_DELAY_MS, 2 * renderMs));
}

function render() {
  const started = performance.now();
  renderTimer = null;
  if (loading) {
    renderTiles(countByStatus());
    renderLoading();
  } else {
    const view = scan();
    renderTiles(view.counts);
    renderOrders(view);
  }
  renderStock();
  renderActivity();
  renderMs = performance.now() - started;
}

// Newest first: by creation time, then by order id (a snapshot row carries no creation seq).
function newer(a, b) {
  if (a.created_at !== b.created_at) return a.created_at > b.created_at;
  return a.order_id > b.order_id;
}

// One pass over every order: the count per status, how many match the filter, and the newest
// MAX_ROWS of those. Candidates newer than the oldest kept gather in a buffer that is sorted and
// cut back to MAX_ROWS whenever it holds 4 x MAX_ROWS (orders arrive about oldest first, so
// nearly every one is a candidate): O(orders x log MAX_ROWS), never a sort of them all.
function scan() {
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  let newest = [];
  let oldestKept = null;
  let matching = 0;
  for (const o of orders.values()) {
    counts[o.status] = (counts[o.status] || 0) + 1;
    if (!matches(o)) continue;
    matching++;
    if (oldestKept !== null && !newer(o, oldestKept)) continue;
    newest.push(o);
    if (newest.length >= 4 * MAX_ROWS) {
      newest.sort(newestFirst);
      newest.length = MAX_ROWS;
      oldestKept = newest[MAX_ROWS - 1];
    }
  }
  newest.sort(newestFirst);
  if (newest.length > MAX_ROWS) newest.length = MAX_ROWS;
  return { counts, newest, matching };
}

function countByStatus() {
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  for (const o of orders.values()) counts[o.status] = (counts[o.status] || 0) + 1;
  return counts;
}

function newestFirst(a, b) {
  return newer(a, b) ? -1 : newer(b, a) ? 1 : 0;
}

function renderTiles(counts) {
  const tiles = [["all", orders.size], ...STATUSES.map((s) => [s, counts[s]])];
  const box = $("tiles");
  box.replaceChildren(
    ...tiles.map(([name, n]) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = `tile status-${name}`;
      b.dataset.status = name;
      b.setAttribute("aria-pressed", String((filter.status || "all") === name));
      b.innerHTML = `<span class="n">${n}</span><span class="label">${name}</span>`;
      b.onclick = () => {
        filter.status = name === "all" || filter.status === name ? null : name;
        render();
      };
      return b;
    }),
  );
}

function matches(order) {
  if (filter.status && order.status !== filter.status) return false;
  if (!filter.text) return true;
  const hay = [order.order_id, order.customer, ...order.items.map((i) => i.sku)].join(" ").toLowerCase();
  return hay.includes(filter.text);
}

function renderOrders({ newest: shown, matching }) {
  const body = $("orders").tBodies[0];
  const keep = new Set();
  let previous = null;
  for (const order of shown) {
    keep.add(order.order_id);
    let row = rows.get(order.order_id);
    if (!row) {
      row = { tr: document.createElement("tr"), version: -1 };
      row.tr.dataset.orderId = order.order_id;
      rows.set(order.order_id, row);
    }
    if (row.version !== order.version || row.role !== me.role) {
      fillOrderRow(row.tr, order);
      row.version = order.version;
      row.role = me.role;
    }
    if (order.flash) {
      order.flash = false;
      flash(row.tr);
    }
    const wanted = previous ? previous.nextSibling : body.firstChild;
    if (wanted !== row.tr) body.insertBefore(row.tr, wanted);
    previous = row.tr;
  }
  for (const [id, row] of rows) {
    if (!keep.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  $("orders-count").textContent = orders.size;
  $("orders-empty").hidden = shown.length > 0;
  $("orders-empty").textContent = orders.size ? "No order matches the filter." : "No orders yet.";
  const more = $("orders-more");
  more.hidden = matching <= MAX_ROWS;
  more.textContent = `Showing the newest ${MAX_ROWS} of ${matching} orders.`;
}

function renderLoading() {
  $("orders-count").textContent = orders.size;
  $("orders-empty").hidden = false;
  $("orders-empty").textContent = `Loading orders: ${loading.got.toLocaleString()} of ${loading.total.toLocaleString()}…`;
  $("orders-more").hidden = true;
}

function fillOrderRow(tr, order) {
  tr.dataset.status = order.status;
  const items = order.items.map((i) => `${i.quantity}× ${escape(i.sku)}`).join(", ");
  tr.innerHTML = `
    <td class="mono" title="${escape(order.order_id)}">${escape(short(order.order_id))}</td>
    <td>${escape(order.customer)}</td>
    <td class="items">${items}</td>
    <td><span class="pill status-${order.status}">${order.status}</span></td>
    <td class="num mono">${order.last_seq}</td>
    <td class="muted" title="${escape(order.updated_at)}">${time(order.updated_at)}</td>
    <td class="actions"></td>`;
  const cell = tr.querySelector(".actions");
  for (const action of actionsFor(order)) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = action === "cancel" ? "small danger" : "small";
    b.dataset.action = action;
    b.textContent = action;
    b.onclick = () => act(action, order, b);
    cell.append(b);
  }
}

function actionsFor(order) {
  if (me.role === "staff") return STAFF_ACTIONS[order.status] || [];
  if (me.role === "customer" && order.status === "placed" && order.customer === me.user) return ["cancel"];
  return [];
}

async function act(action, order, button) {
  button.disabled = true;
  try {
    await client.command(COMMANDS[action], { orderId: order.order_id, expectedVersion: order.version });
  } catch (error) {
    button.disabled = false;
    toast(error.code === "conflict" ? `${short(order.order_id)} changed meanwhile; try again.` : error.message);
  }
}

function renderStock() {
  const body = $("stock").tBodies[0];
  const items = [...stock.values()].sort((a, b) => a.sku.localeCompare(b.sku));
  body.replaceChildren(
    ...items.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.sku = s.sku;
      if (s.available <= LOW_STOCK) tr.className = "low";
      tr.innerHTML = `
        <td><div class="sku">${escape(s.sku)}</div>${s.name ? `<div class="muted small">${escape(s.name)}</div>` : ""}</td>
        <td class="num mono">${s.available}</td>
        <td class="num mono muted">${s.reserved}</td>`;
      if (s.flash) {
        s.flash = false;
        flash(tr);
      }
      return tr;
    }),
  );
  $("stock-empty").hidden = items.length > 0;
}

function renderActivity() {
  $("activity").replaceChildren(
    ...activity.map((e) => {
      const li = document.createElement("li");
      const what = e.stream.startsWith("order:") ? short(e.stream.slice(6)) : e.data.sku;
      li.innerHTML = `<span class="mono muted">#${e.seq}</span> <span class="ev ev-${escape(e.type)}">${escape(e.type)}</span>
        <span class="mono">${escape(what || "")}</span><span class="muted when">${time(e.at)}</span>`;
      return li;
    }),
  );
  const head = Math.max(0, ...activity.map((e) => e.seq));
  if (head) $("head").textContent = `seq ${head}`;
}

function flash(tr) {
  tr.classList.remove("flash");
  void tr.offsetWidth; // restart the animation
  tr.classList.add("flash");
  setTimeout(() => tr.classList.remove("flash"), FLASH_MS);
}

// -- helpers -------------------------------------------------------------------------------

function escape(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function short(id) {
  return id.length > 14 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id;
}

// One formatter for every row: toLocaleTimeString builds one per call (half a second for 10,000).
const TIME_FORMAT = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });

function time(at) {
  if (!at) return "";
  const d = new Date(at);
  return Number.isNaN(d.getTime()) ? at : TIME_FORMAT.format(d);
}

let toastTimer = null;
function toast(text) {
  const box = $("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), 5000);
}

function showSignIn(error) {
  $("sign-in").hidden = false;
  $("board").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  const box = $("sign-in-error");
  box.hidden = !error;
  box.textContent = error || "";
  $("token").focus();
}

function showBoard() {
  $("sign-in").hidden = true;
  $("board").hidden = false;
  $("sign-out").hidden = false;
}

// -- wiring --------------------------------------------------------------------------------

$("sign-in-form").addEventListener("submit", (e) => {
  e.preventDefault(); // never let the token reach the URL
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("sign-in-error").hidden = true;
  start(token);
});

$("sign-out").addEventListener("click", () => {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  resetState();
  showStatus({ state: "closed", text: "not connected" });
  showSignIn();
});

$("retry").addEventListener("click", () => client && client.reconnectNow());

$("search").addEventListener("input", (e) => {
  filter.text = e.target.value.trim().toLowerCase();
  render();
});

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  start(saved);
} else {
  showSignIn();
}
