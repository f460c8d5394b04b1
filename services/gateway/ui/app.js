// The demo page: calls the gateway's own HTTP/JSON API (POST /v1/recommend, POST /v1/events,
// GET /v1/users/{id}/history) on the origin that served it. Every value from the server is
// written with textContent, never as HTML: titles and ids are data, not markup.
"use strict";

const HISTORY_LIMIT = 20;
const RECENT_USERS_KEY = "recsys.ui.recentUsers";
const RECENT_USERS_MAX = 10;

const $ = (selector) => document.querySelector(selector);
let previousAnswer = null; // {userId, itemIds}: rows new since then are marked

function element(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.text !== undefined) node.textContent = String(options.text);
  for (const [name, value] of Object.entries(options.data || {})) node.dataset[name] = value;
  for (const child of children) node.append(child);
  return node;
}

function say(text, isError = false) {
  const message = $("#message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

// fetch → parsed JSON; a non-2xx answer throws the gateway's {"error": {code, message}}.
async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const token = $("#token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    credentials: "same-origin",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const problem = body && body.error ? `${body.error.code}: ${body.error.message}` : response.statusText;
    throw new Error(`${response.status} ${problem}`);
  }
  return body;
}

function query() {
  return {
    userId: $("#user").value.trim(),
    scene: $("#scene").value.trim(),
    count: Number.parseInt($("#count").value, 10) || 0,
    dryRun: $("#dry-run").checked,
  };
}

function recentUsers() {
  try {
    const stored = JSON.parse(localStorage.getItem(RECENT_USERS_KEY) || "[]");
    return Array.isArray(stored) ? stored.filter((u) => typeof u === "string").slice(0, RECENT_USERS_MAX) : [];
  } catch (error) {
    return []; // unreadable or storage disabled: the list is a convenience only
  }
}

function showRecentUsers(users) {
  $("#recent-users").replaceChildren(
    ...users.map((userId) => {
      const option = document.createElement("option");
      option.value = userId;
      return option;
    }),
  );
}

// The users picked before (newest first) become the input's suggestions, and the address
// names the user, so that reloading or sharing it shows the same answer.
function rememberUser(userId) {
  const users = [userId, ...recentUsers().filter((u) => u !== userId)].slice(0, RECENT_USERS_MAX);
  try {
    localStorage.setItem(RECENT_USERS_KEY, JSON.stringify(users));
  } catch (error) {
    // storage full or disabled: suggestions only for this page's life
  }
  showRecentUsers(users);
  const url = new URL(window.location.href);
  url.searchParams.set("user", userId);
  window.history.replaceState(null, "", url);
}

function renderMeta(answer) {
  const field = (name) => $(`#meta [data-field="${name}"]`);
  field("scene").textContent = answer.scene || "default";
  field("arm").textContent = answer.experiment ? `${answer.experiment} / ${answer.arm || "–"}` : "none";
  field("model_version").textContent = answer.model_version || "–";
  const degraded = answer.degraded_reasons || [];
  field("degraded_reasons").textContent = degraded.length ? degraded.join(", ") : "none";
  field("degraded_reasons").classList.toggle("degraded", degraded.length > 0);
  field("cold_start").textContent = answer.cold_start ? "yes" : "no";
  field("request_id").textContent = answer.request_id || "–";
}

function renderItems(answer, userId) {
  const items = answer.items || [];
  const before = previousAnswer && previousAnswer.userId === userId ? previousAnswer.itemIds : null;
  const rows = items.map((item) => {
    const tasks = Object.entries(item.task_scores || {})
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([task, value]) => element("span", { className: "task", text: `${task} ${value.toFixed(3)}` }));
    const channels = (item.channels || []).map((name) => element("span", { className: "tag", text: name }));
    const button = element("button", { className: "click", text: "Click" });
    button.type = "button";
    button.title = `Report a click on item ${item.item_id} and recommend again`;
    button.addEventListener("click", () => reportClick(item, answer, userId));
    const row = element("tr", { data: { itemId: item.item_id } }, [
      element("td", { className: "number", text: item.position }),
      element("td", { className: "title", text: item.title || "(untitled)" }),
      element("td", { className: "id", text: item.item_id }),
      element("td", { className: "number score", text: (item.score || 0).toFixed(4) }),
      element("td", { className: "tasks" }, tasks.length ? tasks : ["–"]),
      element("td", { className: "channels" }, channels),
      element("td", {}, [button]),
    ]);
    if (before && !before.has(item.item_id)) row.classList.add("new");
    return row;
  });
  $("#items tbody").replaceChildren(...rows);
  previousAnswer = { userId, itemIds: new Set(items.map((item) => item.item_id)) };
  return items.length;
}

function formatTime(rfc3339) {
  if (!rfc3339) return "no time";
  return rfc3339.replace("T", " ").replace("Z", " UTC");
}

function renderHistory(view) {
  const entries = view.entries || [];
  const who = view.known_user ? "known user" : "not in this version's users";
  const shown = view.more ? `the ${entries.length} newest entries` : `${entries.length} entries`;
  const degraded = (view.degraded_reasons || []).length ? ` · degraded: ${view.degraded_reasons.join(", ")}` : "";
  $("#history-note").textContent = `${who} · ${shown}${degraded}`;
  const rows = entries.map((entry) => {
    const kind = entry.kind === "history" ? "trained on" : entry.kind;
    const rated = entry.rating === null || entry.rating === undefined ? [] : [
      element("span", { className: "rating", text: `rated ${entry.rating}` }),
    ];
    const item = element("li", { data: { itemId: entry.item_id, kind: entry.kind } }, [
      element("span", { className: "kind", text: kind }),
      element("span", { className: "title", text: entry.title || entry.item_id }),
      ...rated,
      element("span", { className: "when", text: `${formatTime(entry.time)} · item ${entry.item_id}` }),
    ]);
    if (entry.live) item.classList.add("live");
    return item;
  });
  $("#history").replaceChildren(...rows);
}

async function loadHistory(userId) {
  try {
    renderHistory(await api(`/v1/users/${encodeURIComponent(userId)}/history?limit=${HISTORY_LIMIT}`));
  } catch (error) {
    $("#history-note").textContent = `history unavailable: ${error.message}`;
    $("#history").replaceChildren();
  }
}

function busy(on) {
  for (const button of document.querySelectorAll("button")) button.disabled = on;
}

// `clicked`: the item just reported, to say whether it left the list.
async function recommend(note = "", clicked = null) {
  const { userId, scene, count, dryRun } = query();
  if (!userId) {
    say("user: enter a user id", true);
    return;
  }
  busy(true);
  try {
    const answer = await api("/v1/recommend", {
      method: "POST",
      body: { user_id: userId, scene, count, dry_run: dryRun },
    });
    renderMeta(answer);
    const shown = renderItems(answer, userId);
    rememberUser(userId);
    let outcome = "";
    if (clicked) {
      const still = (answer.items || []).some((item) => item.item_id === clicked);
      outcome = still ? "It is still in the list. " : "It left the list. ";
    }
    say(`${note}${outcome}${shown} items for user ${userId}${dryRun ? " (dry run: nothing recorded)" : ""}`);
    await loadHistory(userId);
  } catch (error) {
    say(`recommend failed: ${error.message}`, true);
  } finally {
    busy(false);
  }
}

async function reportClick(item, answer, userId) {
  busy(true);
  try {
    const event = {
      user_id: userId,
      item_id: item.item_id,
      type: "EVENT_TYPE_CLICK",
      request_id: answer.request_id || "",
      scene: answer.scene || "",
      position: item.position,
      arm: answer.arm || "",
    };
    const report = await api("/v1/events", { method: "POST", body: { events: [event] } });
    const rejection = (report.rejections || [])[0];
    if (rejection) {
      say(`click rejected: ${rejection.field}: ${rejection.reason}`, true);
      return;
    }
  } catch (error) {
    say(`click failed: ${error.message}`, true);
    return;
  } finally {
    busy(false);
  }
  await recommend(`Clicked “${item.title || item.item_id}”. `, item.item_id);
}

document.addEventListener("DOMContentLoaded", () => {
  showRecentUsers(recentUsers());
  $("#query").addEventListener("submit", (event) => {
    event.preventDefault();
    recommend();
  });
  const given = new URL(window.location.href).searchParams.get("user");
  if (given) {
    $("#user").value = given.slice(0, 128);
    recommend();
  }
});
