// The quotagate dashboard: renders each snapshot that /ui/events sends (one a second)
// and counts pauses down between two snapshots. Plain DOM, no build step.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const LEASES_SHOWN = 6; // rows of leases in flight per api; the rest are counted

function number(value, digits) {
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function seconds(s) {
  if (s >= 3600) return number(Math.round(s / 360) / 10, 1) + " h";
  if (s >= 60) return number(Math.round(s / 6) / 10, 1) + " min";
  return (s < 10 ? s.toFixed(1) : s.toFixed(0)) + " s";
}

function limitLabel(limit) {
  if (limit.kind === "concurrent") return `concurrent ${limit.amount}`;
  const unit = limit.kind === "runtime" ? "s run time" : "calls";
  const scope = limit.scope === "key" ? " per key" : "";
  return `${limit.amount} ${unit} / ${seconds(limit.window)}${scope}`;
}

// A countdown element ends at performance.now() + ends_in; tick() rewrites them all.
function countdown(endsIn) {
  const node = el("span", { class: "countdown", "data-ends": performance.now() + endsIn * 1000 });
  node.textContent = seconds(Math.max(endsIn, 0));
  return node;
}

function tick() {
  const now = performance.now();
  for (const node of document.querySelectorAll(".countdown")) {
    const left = (Number(node.dataset.ends) - now) / 1000;
    node.textContent = left > 0 ? seconds(left) : "over";
  }
}

function bar(limit) {
  const share = limit.amount ? Math.min(limit.used / limit.amount, 1) : 0;
  const level = share >= 1 ? "full" : share >= 0.8 ? "high" : "";
  const resets = limit.resets_in > 0 ? ` · resets in ${seconds(limit.resets_in)}` : "";
  return el(
    "div",
    { class: "limit", "data-kind": limit.kind, "data-window": limit.window },
    el(
      "div",
      { class: "limit-label" },
      el("span", {}, limitLabel(limit)),
      el("span", { class: "numbers" }, `${limit.used} used · ${limit.remaining} left${resets}`),
    ),
    el(
      "div",
      { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": limit.amount,
        "aria-valuenow": limit.used, "aria-label": limitLabel(limit) },
      el("div", { class: `fill ${level}`, style: `width: ${(share * 100).toFixed(1)}%` }),
    ),
  );
}

function apiCard(item, at) {
  const head = el(
    "div",
    { class: "api-head" },
    el("span", { class: "api-name" }, item.api),
    item.key ? el("span", { class: "tag" }, `key ${item.key}`) : null,
    el("span", { class: "tag" }, `in flight ${item.in_flight}`),
    el("span", { class: "tag" }, `waiting ${item.waiting}`),
    item.cooldown > 0
      ? el("span", { class: "tag pause" }, "paused ", countdown(item.cooldown))
      : null,
  );
  const card = el("div", { class: "api", "data-api": item.api, "data-key": item.key || "" }, head);
  for (const limit of item.limits) card.append(bar(limit));
  if (item.leases.length) {
    const rows = item.leases.slice(0, LEASES_SHOWN).map((lease) =>
      el("tr", {}, el("td", {}, lease.holder || "—"), el("td", {}, lease.lease),
         el("td", {}, seconds(Math.max(lease.expires_at - at, 0)))),
    );
    card.append(
      el("table", { class: "leases" },
         el("thead", {}, el("tr", {}, el("th", {}, "holder"), el("th", {}, "lease"),
                            el("th", {}, "expires in"))),
         el("tbody", {}, ...rows)),
    );
    const more = item.in_flight - rows.length;
    if (more > 0) card.append(el("p", { class: "more" }, `and ${more} more in flight`));
  }
  return card;
}

function renderTenants(items, at) {
  const byTenant = new Map();
  for (const item of items) {
    if (!byTenant.has(item.tenant)) byTenant.set(item.tenant, []);
    byTenant.get(item.tenant).push(item);
  }
  const root = $("tenants");
  if (!byTenant.size) {
    root.replaceChildren(el("p", { class: "empty" }, "No active tenant yet."));
    return;
  }
  root.replaceChildren(
    ...[...byTenant].map(([tenant, apis]) =>
      el("div", { class: "tenant", "data-tenant": tenant },
         el("h3", {}, tenant),
         el("div", { class: "apis" }, ...apis.map((item) => apiCard(item, at)))),
    ),
  );
}

function renderPauses(pauses) {
  const root = $("pauses");
  if (!pauses.length) {
    root.replaceChildren(el("p", { class: "empty" }, "No fleet is pausing."));
    return;
  }
  root.replaceChildren(
    ...pauses.map((p) =>
      el("div", { class: "pause-card", "data-tenant": p.tenant, "data-api": p.api },
         el("span", {}, `${p.tenant} · ${p.api}`), countdown(p.ends_in)),
    ),
  );
}

function renderThrottles(notes) {
  const root = $("throttles");
  if (!notes.length) {
    root.replaceChildren(el("p", { class: "empty" }, "None."));
    return;
  }
  const rows = notes.map((n) =>
    el("tr", {},
       el("td", {}, `${seconds(n.ago)} ago`), el("td", {}, n.tenant), el("td", {}, n.api),
       el("td", {}, n.key || ""), el("td", {}, n.holder || "—"), el("td", {}, n.status ?? ""),
       el("td", {}, seconds(n.retry_after))),
  );
  root.replaceChildren(
    el("div", { class: "panel" },
       el("table", { class: "throttles" },
          el("thead", {}, el("tr", {}, ...["when", "tenant", "api", "key", "holder", "status",
                                           "retry after"].map((h) => el("th", {}, h)))),
          el("tbody", {}, ...rows))),
  );
}

function connect() {
  const status = $("status");
  const events = new EventSource("/ui/events");
  events.addEventListener("snapshot", (message) => {
    const snapshot = JSON.parse(message.data);
    renderPauses(snapshot.pauses);
    renderTenants(snapshot.items, snapshot.at);
    renderThrottles(snapshot.throttles);
    status.className = "status live";
    status.textContent = `live · ${new Date(snapshot.at * 1000).toLocaleTimeString()}`;
  });
  events.addEventListener("unavailable", () => {
    status.className = "status down";
    status.textContent = "the quota store is unavailable";
  });
  events.onerror = () => {
    status.className = "status down";
    status.textContent = "disconnected: retrying…";
  };
}

setInterval(tick, 200);
connect();
