// The credit-store page: plain JavaScript against the /credit-store API. Amounts arrive
// as integer micro-credits and are formatted with integer arithmetic only.
"use strict";
const API = "/credit-store";
const MICRO = 1000000;
const state = { period: "24h", metric: "credits", cursor: null, balanceSeq: null };

// The token comes only in the URL fragment (never sent to a server, never in a Referer),
// is kept for this tab, and is then removed from the address bar and the history.
function takeToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("creditStoreToken", fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() {
  return sessionStorage.getItem("creditStoreToken");
}

async function api(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new Error(message);
  }
  return body;
}

function credits(micro) {
  const sign = micro < 0 ? "-" : "";
  const abs = Math.abs(micro);
  const whole = Math.floor(abs / MICRO);
  const frac = String(abs % MICRO).padStart(6, "0").replace(/0+$/, "");
  return sign + whole.toLocaleString("en-US") + (frac ? "." + frac : "");
}

function money(minor, currency) {
  return (minor / 100).toFixed(2) + " " + currency;
}

function notice(text) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.hidden = !text;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function loadBalance() {
  const b = await api("/balance");
  const el = document.getElementById("balance");
  el.textContent = credits(b.balance_micro);
  el.className = b.balance_micro < 0 ? "negative" : "";
  el.dataset.seq = String(b.seq);
  document.getElementById("who").textContent = b.user_id;
  return b;
}

async function loadConsumption() {
  const c = await api("/consumption?period=" + state.period);
  const t = c.total;
  const totals = document.getElementById("totals");
  totals.replaceChildren();
  for (const [label, value] of [["credits", credits(t.credits_micro)],
      ["input tokens", t.input_tokens.toLocaleString("en-US")],
      ["output tokens", t.output_tokens.toLocaleString("en-US")],
      ["calls", t.calls.toLocaleString("en-US")]]) {
    const div = document.createElement("div");
    const b = document.createElement("b");
    b.textContent = value;
    div.append(b, label);
    totals.append(div);
  }
  totals.dataset.period = c.window.period;
  drawChart(c.series);
  const tbody = document.getElementById("models");
  tbody.replaceChildren();
  for (const [model, u] of Object.entries(c.by_model)) {
    const row = tbody.insertRow();
    cell(row, model);
    cell(row, credits(u.credits_micro), "num");
    cell(row, u.input_tokens.toLocaleString("en-US"), "num");
    cell(row, u.output_tokens.toLocaleString("en-US"), "num");
    cell(row, String(u.calls), "num");
  }
}

function drawChart(series) {
  const svg = document.getElementById("chart");
  svg.replaceChildren();
  const value = (p) => state.metric === "credits" ? p.total.credits_micro
    : p.total.input_tokens + p.total.output_tokens;
  const values = series.map(value);
  const top = Math.max(1, ...values);
  const width = 600 / Math.max(1, series.length);
  series.forEach((point, i) => {
    const h = Math.round((values[i] / top) * 150);
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    rect.setAttribute("x", String(i * width + 1));
    rect.setAttribute("y", String(160 - h));
    rect.setAttribute("width", String(Math.max(1, width - 2)));
    rect.setAttribute("height", String(h));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = point.start + ": " + (state.metric === "credits"
      ? credits(values[i]) + " credits" : values[i] + " tokens");
    rect.append(title);
    svg.append(rect);
  });
  svg.dataset.bars = String(series.length);
}

async function loadPacks() {
  const packs = await api("/products");
  const box = document.getElementById("packs");
  box.replaceChildren();
  for (const p of packs) {
    const div = document.createElement("div");
    div.className = "pack";
    const name = document.createElement("div");
    name.textContent = p.name;
    const amount = document.createElement("div");
    amount.className = "credits";
    amount.textContent = credits(p.credits_micro) + " credits";
    const price = document.createElement("div");
    if (p.original_price_minor > p.price_minor) {
      const s = document.createElement("s");
      s.textContent = money(p.original_price_minor, p.currency);
      price.append(s);
    }
    price.append(money(p.price_minor, p.currency));
    const buy = document.createElement("button");
    buy.textContent = "Buy";
    buy.dataset.product = p.product_id;
    buy.addEventListener("click", () => buyPack(p, buy));
    div.append(name, amount, price, buy);
    box.append(div);
  }
}

async function buyPack(pack, button) {
  button.disabled = true;
  try {
    const before = await loadBalance();
    const order = await api("/orders", { method: "POST",
      body: JSON.stringify({ product_id: pack.product_id }) });
    notice("Order " + order.order_id + " created; paying…");
    const paid = await api("/simulated-provider/orders/" + order.order_id + "/checkout",
      { method: "POST" });
    notice("Order " + paid.order_id + " is " + paid.status + "; waiting for the ledger…");
    for (let i = 0; i < 150; i++) {
      const now = await loadBalance();
      if (now.seq > before.seq && now.balance_micro !== before.balance_micro) {
        notice("Bought " + credits(pack.credits_micro) + " credits (order " + paid.order_id + ").");
        await Promise.all([reloadHistory(), loadConsumption()]);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    notice("Paid; the credits will show once the ledger has folded the grant.");
  } catch (e) {
    notice("Could not buy: " + e.message);
  } finally {
    button.disabled = false;
  }
}

function describe(e) {
  if (e.kind === "charge") return "charge " + (e.model_alias || "") + " (" + (e.scene || "") + ")";
  return e.kind + (e.reference ? " " + e.reference : "");
}

async function loadHistory() {
  const path = "/ledger?limit=10" + (state.cursor ? "&cursor=" + state.cursor : "");
  const page = await api(path);
  const tbody = document.getElementById("history");
  for (const e of page.entries) {
    const row = tbody.insertRow();
    cell(row, String(e.seq));
    cell(row, e.occurred_at.replace("T", " ").slice(0, 19));
    cell(row, describe(e));
    cell(row, credits(e.amount_micro), "num" + (e.amount_micro < 0 ? " negative" : ""));
    cell(row, credits(e.balance_after_micro), "num");
  }
  state.cursor = page.next_cursor;
  document.getElementById("more").hidden = !page.next_cursor;
}

async function reloadHistory() {
  state.cursor = null;
  document.getElementById("history").replaceChildren();
  await loadHistory();
}

function switcher(id, key, reload) {
  document.getElementById(id).addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    for (const b of event.currentTarget.querySelectorAll("button")) b.classList.remove("on");
    button.classList.add("on");
    state[key] = button.dataset[key];
    await reload();
  });
}

async function main() {
  takeToken();
  if (!token()) {
    notice("Open this page with #token=<token> (creditledger store token USER).");
    return;
  }
  const plazaLink = document.getElementById("plaza-link");
  plazaLink.href = plazaLink.getAttribute("href") + "#token=" + encodeURIComponent(token());
  switcher("periods", "period", loadConsumption);
  switcher("metrics", "metric", loadConsumption);
  document.getElementById("more").addEventListener("click", () => loadHistory());
  try {
    await Promise.all([loadBalance(), loadConsumption(), loadPacks(), loadHistory()]);
    document.body.dataset.ready = "1";
  } catch (e) {
    notice("Could not load: " + e.message);
  }
}

main();
