// The plan plaza page: plain JavaScript against the /plaza API. Every text a user wrote
// reaches the page through textContent only, so HTML in a title or a comment shows as
// text and never runs (the page's CSP would refuse an inline script anyway).
"use strict";
const API = "/plaza";
const DEBOUNCE_MS = 300;
const state = { sort: "newest", tag: null, q: "", cursor: null, plan: null,
                commentsCursor: null, config: null, searchTimer: null, listSerial: 0 };

// The token comes only in the URL fragment (never sent to a server, never in a Referer),
// is kept for this tab, and is then removed from the address bar and the history.
function takeToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("plazaToken", fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() {
  return sessionStorage.getItem("plazaToken");
}

async function api(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((body.error && body.error.message) || response.statusText);
    error.code = body.error && body.error.code;
    throw error;
  }
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function notice(text) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.hidden = !text;
}

function show(view) {
  for (const id of ["plaza-view", "publish-view", "detail-view"]) {
    document.getElementById(id).hidden = id !== view;
  }
}

function when(iso) {
  return iso.replace("T", " ").slice(0, 16) + " UTC";
}

// -- the list ------------------------------------------------------------------------------

function listQuery() {
  const params = new URLSearchParams({ sort: state.sort, limit: "20" });
  if (state.tag) params.set("tag", state.tag);
  if (state.q) params.set("q", state.q);
  if (state.cursor) params.set("cursor", state.cursor);
  return "/plans?" + params.toString();
}

async function loadPlans(reset) {
  const serial = ++state.listSerial;  // an older answer arriving late is dropped
  if (reset) state.cursor = null;
  const page = await api(listQuery());
  if (serial !== state.listSerial) return;
  const list = document.getElementById("plans");
  if (reset) list.replaceChildren();
  for (const plan of page.plans) list.append(planCard(plan));
  state.cursor = page.next_cursor;
  document.getElementById("more").hidden = !page.next_cursor;
  document.getElementById("empty").hidden = list.children.length > 0;
}

function tagList(tags) {
  const span = el("span");
  for (const tag of tags) span.append(el("span", tag, "tag"));
  return span;
}

function planCard(plan) {
  const card = el("div", null, "plan");
  card.dataset.planId = plan.plan_id;
  const title = el("h3");
  const link = el("a", plan.title);
  link.addEventListener("click", () => openPlan(plan.plan_id));
  title.append(link);
  card.append(title, el("div", plan.summary));
  const meta = el("div", null, "meta");
  meta.append(tagList(plan.tags), el("span", "by " + plan.author_id + " · " + when(plan.created_at)));
  card.append(meta, actions(plan));
  return card;
}

function actions(plan) {
  const row = el("div", null, "actions");
  const like = el("button", null, plan.liked ? "like on" : "like");
  const paint = (p) => {
    like.textContent = (p.liked ? "♥ Liked " : "♡ Like ") + p.like_count;
    like.className = p.liked ? "like on" : "like";
    like.setAttribute("aria-pressed", String(p.liked));
  };
  paint(plan);
  like.addEventListener("click", async () => {
    like.disabled = true;
    try {
      const result = await api(`/plans/${plan.plan_id}/like`, { method: plan.liked ? "DELETE" : "PUT" });
      plan.liked = result.liked;
      plan.like_count = result.like_count;
      paint(plan);
    } catch (error) { notice(error.message); }
    like.disabled = false;
  });
  const imp = el("button", null, "import");
  const paintImport = () => {
    imp.textContent = (plan.imported ? "Imported " : "Import ") + plan.import_count;
    imp.disabled = plan.imported;
  };
  paintImport();
  imp.addEventListener("click", async () => {
    imp.disabled = true;
    try {
      const result = await api(`/plans/${plan.plan_id}/import`, { method: "POST" });
      if (result.created) plan.import_count += 1;
      plan.imported = true;
      notice("Imported into your plans as " + result.copy.plan_id);
    } catch (error) { notice(error.message); }
    paintImport();
  });
  row.append(like, imp);
  return row;
}

async function loadTags() {
  const { tags } = await api("/tags?limit=30");
  const box = document.getElementById("tags");
  box.replaceChildren();
  const chip = (label, value) => {
    const button = el("button", label, "chip" + (state.tag === value ? " on" : ""));
    button.dataset.tag = value || "";
    button.addEventListener("click", async () => {
      state.tag = value;
      for (const other of box.children) other.classList.toggle("on", other === button);
      await loadPlans(true);
    });
    box.append(button);
  };
  chip("all", null);
  for (const t of tags) chip(t.tag + " (" + t.plans + ")", t.tag);
}

// Typing sends one request, DEBOUNCE_MS after the last keystroke.
function onSearchInput(event) {
  clearTimeout(state.searchTimer);
  const value = event.target.value.trim();
  state.searchTimer = setTimeout(() => {
    state.q = value;
    loadPlans(true).catch((error) => notice(error.message));
  }, DEBOUNCE_MS);
}

// -- publishing ----------------------------------------------------------------------------

function addStep(values = {}) {
  const li = el("li");
  const title = el("input");
  title.name = "step-title";
  title.maxLength = 200;
  title.placeholder = "Step title";
  title.value = values.title || "";
  const detail = el("textarea");
  detail.name = "step-detail";
  detail.maxLength = 4000;
  detail.rows = 2;
  detail.placeholder = "Detail (optional)";
  const minutes = el("input");
  minutes.name = "step-minutes";
  minutes.type = "number";
  minutes.min = "1";
  minutes.placeholder = "Minutes (optional)";
  li.append(title, detail, minutes);
  document.getElementById("steps").append(li);
}

function openPublish() {
  const form = document.getElementById("publish");
  form.reset();
  document.getElementById("steps").replaceChildren();
  addStep();
  const fallback = state.config.default_tag;
  document.getElementById("tag-input").placeholder = fallback ? fallback : "e.g. fitness";
  document.getElementById("tag-hint").textContent = fallback
    ? `Without a tag the plan is tagged "${fallback}".`
    : "At least one tag is required.";
  document.getElementById("publish-error").hidden = true;
  show("publish-view");
}

function formPlan(form) {
  const steps = [];
  for (const li of document.getElementById("steps").children) {
    const title = li.querySelector("[name=step-title]").value.trim();
    if (!title) continue;
    const step = { title, detail: li.querySelector("[name=step-detail]").value };
    const minutes = li.querySelector("[name=step-minutes]").value;
    if (minutes) step.duration_minutes = Number(minutes);
    steps.push(step);
  }
  const tags = form.tags.value.split(",").map((t) => t.trim()).filter(Boolean);
  return { title: form.title.value.trim(), summary: form.summary.value, steps, tags };
}

function publishProblem(plan) {
  if (!plan.title) return "A plan needs a title.";
  if (!plan.steps.length) return "A plan needs at least one step.";
  if (!plan.tags.length && !state.config.default_tag) return "A plan needs at least one tag.";
  return null;
}

async function publish(event) {
  event.preventDefault();
  const form = event.target;
  const plan = formPlan(form);
  if (!plan.tags.length && state.config.default_tag) plan.tags = [state.config.default_tag];
  const problem = publishProblem(plan);
  const error = document.getElementById("publish-error");
  error.hidden = !problem;
  error.textContent = problem || "";
  if (problem) return;
  try {
    const created = await api("/plans", { method: "POST", body: JSON.stringify(plan) });
    await Promise.all([loadTags(), loadPlans(true)]);
    await openPlan(created.plan_id);
  } catch (failure) {
    error.textContent = failure.message;
    error.hidden = false;
  }
}

// -- the detail view and its thread --------------------------------------------------------

async function openPlan(planId) {
  const plan = await api(`/plans/${planId}?comments=20`);
  state.plan = plan;
  const box = document.getElementById("detail");
  box.replaceChildren();
  box.dataset.planId = plan.plan_id;
  box.append(el("h2", plan.title), el("p", plan.summary));
  const meta = el("div", null, "meta muted");
  meta.append(tagList(plan.tags), el("span", "by " + plan.author_id + " · " + when(plan.created_at)));
  box.append(meta);
  const steps = el("ol", null, "steps");
  for (const step of plan.steps) {
    const li = el("li");
    li.append(el("strong", step.title));
    if (step.duration_minutes) li.append(el("span", " · " + step.duration_minutes + " min", "muted"));
    if (step.detail) li.append(el("div", step.detail, "detail"));
    steps.append(li);
  }
  box.append(steps, actions(plan));
  document.getElementById("comments").replaceChildren();
  renderComments(plan.comments.items);
  state.commentsCursor = plan.comments.next_cursor;
  document.getElementById("more-comments").hidden = !state.commentsCursor;
  show("detail-view");
}

function commentNode(comment) {
  const node = el("div", null, "comment" + (comment.deleted ? " deleted" : ""));
  node.dataset.commentId = String(comment.comment_id);
  node.dataset.depth = String(comment.depth);
  node.style.marginLeft = Math.min(comment.depth, 12) * 1.5 + "em";
  node.append(el("div", comment.author_id + " · " + when(comment.created_at), "muted"));
  node.append(el("div", comment.deleted ? "[deleted]" : comment.body, "body"));
  const row = el("div", null, "actions");
  const reply = el("button", "Reply", "reply-button");
  reply.addEventListener("click", () => replyForm(node, comment));
  row.append(reply);
  if (!comment.deleted && comment.author_id === state.config.user_id) {
    const del = el("button", "Delete", "delete-button");
    del.addEventListener("click", async () => {
      try {
        const gone = await api(`/comments/${comment.comment_id}`, { method: "DELETE" });
        node.replaceWith(commentNode(gone));
      } catch (error) { notice(error.message); }
    });
    row.append(del);
  }
  node.append(row);
  return node;
}

function renderComments(comments) {
  const box = document.getElementById("comments");
  for (const comment of comments) box.append(commentNode(comment));
}

function replyForm(node, parent) {
  if (node.querySelector("form")) return;
  const form = el("form", null, "reply");
  const text = el("textarea");
  text.name = "body";
  text.maxLength = 4000;
  text.rows = 2;
  text.placeholder = "Reply to " + parent.author_id;
  const send = el("button", "Send reply");
  send.type = "submit";
  form.append(text, send);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await postComment(text.value, parent.comment_id, node, form);
  });
  node.append(form);
  text.focus();
}

// A new comment goes after its parent's last descendant (depth first, as the API orders).
function insertAfterSubtree(parentNode, newNode) {
  let last = parentNode;
  const depth = Number(parentNode.dataset.depth);
  while (last.nextElementSibling && Number(last.nextElementSibling.dataset.depth) > depth) {
    last = last.nextElementSibling;
  }
  last.after(newNode);
}

async function postComment(body, parentId, parentNode, form) {
  if (!body.trim()) return;
  try {
    const comment = await api(`/plans/${state.plan.plan_id}/comments`, {
      method: "POST", body: JSON.stringify({ body, parent_id: parentId }) });
    const node = commentNode(comment);
    if (parentNode) insertAfterSubtree(parentNode, node);
    else document.getElementById("comments").append(node);
    if (form && form.classList.contains("reply") && parentNode) form.remove();
  } catch (error) { notice(error.message); }
}

async function moreComments() {
  const params = new URLSearchParams({ limit: "20", cursor: state.commentsCursor });
  const page = await api(`/plans/${state.plan.plan_id}/comments?` + params.toString());
  renderComments(page.comments);
  state.commentsCursor = page.next_cursor;
  document.getElementById("more-comments").hidden = !page.next_cursor;
}

// -- start ---------------------------------------------------------------------------------

function switcher() {
  document.getElementById("sorts").addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    state.sort = button.dataset.sort;
    for (const b of document.querySelectorAll("#sorts button")) b.classList.toggle("on", b === button);
    await loadPlans(true);
  });
}

async function main() {
  takeToken();
  if (!token()) {
    notice("Open this page with #token=<token> (creditledger store token USER).");
    return;
  }
  const storeLink = document.getElementById("store-link");
  storeLink.href = storeLink.getAttribute("href") + "#token=" + encodeURIComponent(token());
  try {
    state.config = await api("/config");
  } catch (error) {
    notice(error.message);
    return;
  }
  document.getElementById("who").textContent = state.config.user_id;
  document.getElementById("search").addEventListener("input", onSearchInput);
  document.getElementById("more").addEventListener("click", () => loadPlans(false));
  document.getElementById("new-plan").addEventListener("click", openPublish);
  document.getElementById("add-step").addEventListener("click", () => addStep());
  document.getElementById("publish").addEventListener("submit", publish);
  document.getElementById("cancel-publish").addEventListener("click", () => show("plaza-view"));
  document.getElementById("back").addEventListener("click", async () => {
    show("plaza-view");
    await loadPlans(true);
  });
  document.getElementById("comment-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    await postComment(form.body.value, null, null, form);
    form.reset();
  });
  document.getElementById("more-comments").addEventListener("click", moreComments);
  switcher();
  await Promise.all([loadTags(), loadPlans(true)]);
  document.body.dataset.ready = "true";
}

main().catch((error) => notice(error.message));
