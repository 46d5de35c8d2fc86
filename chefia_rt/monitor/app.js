// chefia-rt Terminal Monitor (docs/operations.md §7). No build step, no dependencies.
//
// Messages only update `state`; the DOM is rendered from it on a timer (RENDER_MS), touching
// only what changed: table rows are updated in place, the feed is capped, so a store with 1000
// terminals and 100 ops/s stays responsive. Everything that comes from the server (ids are
// chosen by terminals) reaches the DOM through textContent, never as markup.
"use strict";

(function () {
  const RENDER_MS = 500;
  const FEED_CAP = 500;
  const CHART_SPAN_S = 300;
  const RESOLVED_ALERT_KEEP_MS = 5 * 60 * 1000;
  const BACKOFF_MS = [1000, 30000]; // first and longest wait before reconnecting

  const $ = (id) => document.getElementById(id);

  const state = {
    terminals: new Map(), // terminal_id -> {data, row, dirty}
    order: [], // terminal ids as rendered
    orderDirty: false,
    feed: [], // activity, oldest first, at most FEED_CAP
    feedIds: new Set(),
    feedPending: [], // arrived since the last render
    feedRebuild: true,
    alerts: new Map(), // alert_id -> {msg, acked, resolvedAt}
    alertsDirty: true,
    acked: new Set(JSON.parse(sessionStorage.getItem("chefia-acked") || "[]")),
    server: null,
    series: { ops: [], latency: [] },
    chartsDirty: true,
    seenTerminals: new Set(),
    seenStatuses: new Set(),
    filtersDirty: true,
    renders: 0,
    partsMs: {}, // the longest each part of a render took (shown by the load test)
    renderMsTotal: 0,
    renderMsMax: 0,
  };

  // ---- connection ---------------------------------------------------------------------------

  const conn = { ws: null, attempt: 0, timer: null, store: "", token: "", id: "", stopped: false };

  function tokenClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
    } catch (e) {
      return null;
    }
  }

  function setConnection(status, text) {
    const el = $("connection");
    el.dataset.state = status;
    el.className = "conn conn-" + (status === "connected" ? "on" : status === "connecting" ? "wait" : "off");
    el.textContent = text;
  }

  function monitorId() {
    let id = sessionStorage.getItem("chefia-monitor-id");
    if (!id) {
      const bytes = new Uint8Array(4);
      crypto.getRandomValues(bytes);
      id = "monitor-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      sessionStorage.setItem("chefia-monitor-id", id);
    }
    return id;
  }

  function connect() {
    clearTimeout(conn.timer);
    if (conn.ws) {
      conn.ws.onclose = null;
      conn.ws.close();
    }
    const claims = conn.token ? tokenClaims(conn.token) : null;
    if (conn.token && !claims) {
      setConnection("failed", "the token is not a JWT");
      return;
    }
    conn.id = claims ? String(claims.sub) : new URLSearchParams(location.search).get("terminal") || monitorId();
    const store = claims ? String(claims.store_id) : conn.store || "default";
    const params = new URLSearchParams({ type: "monitor", encoding: "json", store_id: store });
    if (conn.token) params.set("token", conn.token);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = scheme + "//" + location.host + document.body.dataset.wsPath + "/" + encodeURIComponent(conn.id) + "?" + params;
    setConnection("connecting", "connecting to " + store + "…");
    const ws = new WebSocket(url);
    conn.ws = ws;
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      handle(message);
    };
    ws.onclose = (event) => {
      conn.ws = null;
      if (event.code === 4004) {
        // Another window took this monitor's id: reconnecting would only fight it.
        setConnection("replaced", "replaced by another monitor window");
        return;
      }
      const reason = event.code === 4003 ? "authentication failed" : "disconnected";
      const wait = Math.min(BACKOFF_MS[1], BACKOFF_MS[0] * 2 ** conn.attempt) * (0.5 + Math.random() / 2);
      conn.attempt += 1;
      setConnection("disconnected", reason + "; retrying in " + Math.round(wait / 1000) + " s");
      conn.timer = setTimeout(connect, wait);
    };
  }

  // ---- messages -----------------------------------------------------------------------------

  function upsertTerminal(t) {
    let entry = state.terminals.get(t.terminal_id);
    if (!entry) {
      entry = { data: {}, row: null, dirty: true };
      state.terminals.set(t.terminal_id, entry);
      state.orderDirty = true;
    }
    Object.assign(entry.data, t);
    entry.dirty = true;
    if (!state.seenTerminals.has(t.terminal_id)) {
      state.seenTerminals.add(t.terminal_id);
      state.filtersDirty = true;
    }
  }

  function removeTerminal(id) {
    const entry = state.terminals.get(id);
    if (!entry) return;
    if (entry.row) entry.row.remove();
    state.terminals.delete(id);
    state.orderDirty = true;
  }

  function addActivity(a) {
    if (state.feedIds.has(a.activity_id)) return; // sent again after a reconnect
    state.feedIds.add(a.activity_id);
    state.feed.push(a);
    state.feedPending.push(a);
    if (state.feed.length > FEED_CAP) {
      const gone = state.feed.splice(0, state.feed.length - FEED_CAP);
      for (const old of gone) state.feedIds.delete(old.activity_id);
    }
    if (a.terminal_id && !state.seenTerminals.has(a.terminal_id)) {
      state.seenTerminals.add(a.terminal_id);
      state.filtersDirty = true;
    }
    if (!state.seenStatuses.has(a.status)) {
      state.seenStatuses.add(a.status);
      state.filtersDirty = true;
    }
  }

  function addPoint(series, value) {
    const now = Date.now() / 1000;
    series.push([now, value]);
    while (series.length && series[0][0] < now - CHART_SPAN_S) series.shift();
  }

  function handle(m) {
    switch (m.type) {
      case "connection_established":
        conn.attempt = 0;
        setConnection("connected", "connected: " + m.store_id + " as " + m.terminal_id);
        break;
      case "terminal_list":
        if (m.full) {
          const listed = new Set(m.terminals.map((t) => t.terminal_id));
          for (const id of Array.from(state.terminals.keys())) if (!listed.has(id)) removeTerminal(id);
        }
        for (const t of m.terminals) upsertTerminal(t);
        break;
      case "terminal_status_update":
        if (m.change === "forgotten") removeTerminal(m.terminal_id);
        else upsertTerminal(m);
        break;
      case "sync_activity":
        addActivity(m);
        break;
      case "performance_metrics":
        if (m.scope === "server") {
          state.server = m.metrics;
          addPoint(state.series.ops, m.metrics.operations_per_second || 0);
          addPoint(state.series.latency, m.metrics.recent_latency_ms || 0);
          state.chartsDirty = true;
        } else if (state.terminals.has(m.terminal_id)) {
          const r = m.metrics;
          const known = {};
          if (typeof r.response_time === "number") known.response_time_ms = r.response_time;
          if (typeof r.memory_usage === "number") known.memory_mb = r.memory_usage;
          if (typeof r.cache_hit_rate === "number") known.cache_hit_rate = r.cache_hit_rate;
          upsertTerminal(Object.assign({ terminal_id: m.terminal_id }, known));
        }
        break;
      case "system_alert": {
        const known = state.alerts.get(m.alert_id);
        if (m.active) state.alerts.set(m.alert_id, { msg: m, resolvedAt: null });
        else if (known) known.resolvedAt = Date.now();
        state.alertsDirty = true;
        break;
      }
      default:
        break; // data_sync, pong, …: the monitor is a terminal too, and ignores them
    }
  }

  // ---- rendering ----------------------------------------------------------------------------

  // One formatter each: toLocaleString() builds a new one per call, which costs more than
  // the rest of a render of 1000 rows together.
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const numberFormat = new Intl.NumberFormat();
  const fmt = {
    time(iso) {
      if (!iso) return "–";
      const d = new Date(iso);
      return isNaN(d) ? "–" : timeFormat.format(d);
    },
    num(v) {
      return v === null || v === undefined ? "–" : numberFormat.format(v);
    },
    bytes(v) {
      if (v === null || v === undefined) return "–";
      const units = ["B", "KiB", "MiB", "GiB"];
      let i = 0;
      while (v >= 1024 && i < units.length - 1) {
        v /= 1024;
        i += 1;
      }
      return (i ? v.toFixed(1) : String(v)) + " " + units[i];
    },
    unit(v, unit, digits) {
      return v === null || v === undefined ? "–" : Number(v).toFixed(digits) + " " + unit;
    },
    pct(v) {
      return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %";
    },
    duration(s) {
      if (s === null || s === undefined) return "–";
      const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
      return h ? h + " h " + m + " min" : m ? m + " min " + Math.floor(s % 60) + " s" : Math.floor(s) + " s";
    },
  };

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  // [the fields a column shows, how]: a cell is formatted and written only when its fields
  // changed since the last render (most figures of most terminals do not, round after round).
  const TERMINAL_COLUMNS = [
    [["terminal_id"], (t) => t.terminal_id],
    [["terminal_type"], (t) => t.terminal_type],
    [["status"], (t) => t.status],
    [["connected_since"], (t) => fmt.time(t.connected_since)],
    [["last_seen"], (t) => fmt.time(t.last_seen)],
    [["ops"], (t) => fmt.num(t.ops)],
    [["conflicts"], (t) => fmt.num(t.conflicts)],
    [["bytes_in", "bytes_out"], (t) => fmt.bytes(t.bytes_in) + " / " + fmt.bytes(t.bytes_out)],
    [["reconnects"], (t) => fmt.num(t.reconnects)],
    [["response_time_ms"], (t) => fmt.unit(t.response_time_ms, "ms", 0)],
    [["memory_mb"], (t) => fmt.unit(t.memory_mb, "MB", 0)],
    [["cache_hit_rate"], (t) => fmt.pct(t.cache_hit_rate)],
    [["acked_seq", "sent_seq"], (t) => fmt.num(t.acked_seq) + " / " + fmt.num(t.sent_seq)],
  ];

  function renderTerminals() {
    const body = $("terminals").tBodies[0];
    for (const [id, entry] of state.terminals) {
      if (!entry.dirty) continue;
      entry.dirty = false;
      const t = entry.data;
      if (!entry.row) {
        entry.row = document.createElement("tr");
        entry.row.dataset.terminal = id;
        for (let i = 0; i < TERMINAL_COLUMNS.length; i++) cell(entry.row, "");
        entry.row.cells[2].className = "status";
        entry.shown = {};
      }
      const row = entry.row;
      const shown = entry.shown;
      if (shown.status !== t.status) {
        row.dataset.status = t.status || "";
        row.className = "status-" + (t.status || "unknown");
      }
      TERMINAL_COLUMNS.forEach(([fields, show], i) => {
        if (fields.every((f) => shown[f] === t[f])) return;
        row.cells[i].textContent = show(t) ?? "–";
      });
      for (const [fields] of TERMINAL_COLUMNS) for (const f of fields) shown[f] = t[f];
    }
    if (state.orderDirty) {
      state.orderDirty = false;
      const ids = Array.from(state.terminals.keys()).sort();
      const fragment = document.createDocumentFragment();
      for (const id of ids) fragment.appendChild(state.terminals.get(id).row);
      body.appendChild(fragment); // moves the rows into sorted order
    }
  }

  function renderCards() {
    const counts = { online: 0, offline: 0, error: 0 };
    for (const { data } of state.terminals.values()) counts[data.status] = (counts[data.status] || 0) + 1;
    $("card-total").textContent = String(state.terminals.size);
    $("card-online").textContent = String(counts.online);
    $("card-offline").textContent = String(counts.offline);
    $("card-error").textContent = String(counts.error);
    const s = state.server;
    if (!s) return;
    $("card-opm").textContent = fmt.num(s.operations_per_minute);
    $("card-latency").textContent = fmt.unit(s.average_latency_ms, "ms", 1);
    $("card-uptime").textContent = fmt.duration(s.uptime_seconds);
    const health = $("card-health");
    health.textContent = s.health;
    health.parentElement.className = "card health-" + s.health;
  }

  function filters() {
    return {
      terminal: $("filter-terminal").value,
      kind: $("filter-kind").value,
      status: $("filter-status").value,
      entity: $("search-entity").value.trim().toLowerCase(),
    };
  }

  function passes(a, f) {
    return (
      (!f.terminal || a.terminal_id === f.terminal) &&
      (!f.kind || a.kind === f.kind) &&
      (!f.status || a.status === f.status) &&
      (!f.entity || (a.entity_id || "").toLowerCase().includes(f.entity))
    );
  }

  function detailText(detail) {
    return Object.entries(detail || {})
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : String(v)))
      .join(" ");
  }

  function activityRow(a) {
    const row = document.createElement("tr");
    row.dataset.kind = a.kind;
    row.dataset.status = a.status;
    row.className = "kind-" + a.kind;
    cell(row, fmt.time(a.server_time));
    cell(row, a.kind);
    cell(row, a.terminal_id || "–");
    cell(row, a.entity_id ? a.entity_type + "/" + a.entity_id : "–");
    cell(row, a.operation || "–");
    cell(row, a.seq === null || a.seq === undefined ? "–" : String(a.seq));
    cell(row, a.status);
    cell(row, detailText(a.detail), "detail");
    return row;
  }

  function renderFilters() {
    if (!state.filtersDirty) return;
    state.filtersDirty = false;
    const fill = (select, values) => {
      const chosen = select.value;
      while (select.options.length > 1) select.remove(1);
      for (const v of Array.from(values).sort()) select.add(new Option(v, v));
      select.value = chosen;
    };
    fill($("filter-terminal"), state.seenTerminals);
    fill($("filter-status"), state.seenStatuses);
  }

  function renderFeed() {
    const body = $("activity").tBodies[0];
    const f = filters();
    if (state.feedRebuild) {
      state.feedRebuild = false;
      state.feedPending = [];
      const fragment = document.createDocumentFragment();
      for (let i = state.feed.length - 1; i >= 0; i--) {
        if (passes(state.feed[i], f)) fragment.appendChild(activityRow(state.feed[i]));
      }
      body.replaceChildren(fragment);
    } else if (state.feedPending.length) {
      const fragment = document.createDocumentFragment();
      for (let i = state.feedPending.length - 1; i >= 0; i--) {
        if (passes(state.feedPending[i], f)) fragment.appendChild(activityRow(state.feedPending[i]));
      }
      state.feedPending = [];
      body.insertBefore(fragment, body.firstChild);
      while (body.rows.length > FEED_CAP) body.deleteRow(-1);
    } else {
      return;
    }
    $("feed-count").textContent = body.rows.length + " shown of " + state.feed.length;
  }

  function renderAlerts() {
    const now = Date.now();
    for (const [id, alert] of state.alerts) {
      if (alert.resolvedAt && now - alert.resolvedAt > RESOLVED_ALERT_KEEP_MS) {
        state.alerts.delete(id);
        state.alertsDirty = true;
      }
    }
    if (!state.alertsDirty) return;
    state.alertsDirty = false;
    const list = $("alerts");
    const fragment = document.createDocumentFragment();
    let open = 0;
    const sorted = Array.from(state.alerts.values()).sort((a, b) => (a.msg.since < b.msg.since ? 1 : -1));
    for (const alert of sorted) {
      const m = alert.msg;
      const acked = state.acked.has(m.alert_id);
      const li = document.createElement("li");
      li.dataset.alertId = m.alert_id;
      li.dataset.kind = m.kind;
      li.className = ["alert", "severity-" + m.severity, acked ? "acked" : "", alert.resolvedAt ? "resolved" : ""].join(" ");
      const text = document.createElement("span");
      text.className = "alert-text";
      text.textContent = (alert.resolvedAt ? "resolved: " : "") + m.message;
      const since = document.createElement("span");
      since.className = "alert-time";
      since.textContent = "since " + fmt.time(m.since);
      li.append(text, since);
      if (!acked && !alert.resolvedAt) {
        open += 1;
        const button = document.createElement("button");
        button.type = "button";
        button.className = "ack";
        button.textContent = "Acknowledge";
        button.addEventListener("click", () => acknowledge(m.alert_id));
        li.appendChild(button);
      } else if (acked) {
        const mark = document.createElement("span");
        mark.className = "ack-mark";
        mark.textContent = "acknowledged";
        li.appendChild(mark);
      }
      fragment.appendChild(li);
    }
    list.replaceChildren(fragment);
    $("alert-count").textContent = String(open);
    $("alert-count").className = "badge" + (open ? " badge-hot" : "");
  }

  function acknowledge(id) {
    // Local to this browser: a monitor never writes, and another manager may still want to see it.
    state.acked.add(id);
    sessionStorage.setItem("chefia-acked", JSON.stringify(Array.from(state.acked).slice(-500)));
    state.alertsDirty = true;
    renderAlerts();
  }

  function drawChart(canvas, series, unit) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#c8ccd4";
    ctx.lineWidth = 1;
    ctx.strokeRect(pad, 4, w - pad - 4, h - 20);
    const now = Date.now() / 1000;
    const max = Math.max(1, ...series.map((p) => p[1])) * 1.15;
    ctx.fillStyle = "#59606e";
    ctx.font = "11px sans-serif";
    ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 14);
    ctx.fillText("0", 2, h - 16);
    ctx.fillText("-" + CHART_SPAN_S / 60 + " min", pad, h - 3);
    ctx.fillText("now " + (series.length ? series[series.length - 1][1].toFixed(1) + " " + unit : ""), w - 110, h - 3);
    if (series.length < 2) return;
    ctx.strokeStyle = "#2364d2";
    ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach(([t, v], i) => {
      const x = pad + ((t - (now - CHART_SPAN_S)) / CHART_SPAN_S) * (w - pad - 4);
      const y = 4 + (h - 20) * (1 - v / max);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }

  function renderCharts() {
    if (!state.chartsDirty) return;
    state.chartsDirty = false;
    drawChart($("chart-ops"), state.series.ops, "ops/s");
    drawChart($("chart-latency"), state.series.latency, "ms");
  }

  const PARTS = { renderFilters, renderTerminals, renderCards, renderFeed, renderAlerts, renderCharts };

  function render() {
    const started = performance.now();
    for (const [name, part] of Object.entries(PARTS)) {
      const before = performance.now();
      part();
      const took = performance.now() - before;
      state.partsMs[name] = Math.max(state.partsMs[name] || 0, took);
    }
    const took = performance.now() - started;
    state.renders += 1;
    state.renderMsTotal += took;
    state.renderMsMax = Math.max(state.renderMsMax, took);
  }

  // ---- CSV ----------------------------------------------------------------------------------

  function csvField(value) {
    let text = value === null || value === undefined ? "" : String(value);
    // A spreadsheet would run a cell starting like a formula: ids are chosen by terminals.
    if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;
    return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function exportCsv() {
    const f = filters();
    const columns = ["server_time", "kind", "terminal_id", "entity_type", "entity_id", "operation", "seq", "status", "detail"];
    const lines = [columns.join(",")];
    for (let i = state.feed.length - 1; i >= 0; i--) {
      const a = state.feed[i];
      if (!passes(a, f)) continue;
      lines.push(columns.map((c) => csvField(c === "detail" ? detailText(a.detail) : a[c])).join(","));
    }
    const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "chefia-activity-" + new Date().toISOString().replace(/[:.]/g, "-") + ".csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // ---- start --------------------------------------------------------------------------------

  function start() {
    const params = new URLSearchParams(location.search);
    conn.store = params.get("store") || sessionStorage.getItem("chefia-store") || "";
    conn.token = params.get("token") || sessionStorage.getItem("chefia-token") || "";
    if (params.has("token")) {
      // Out of the address bar (and history, and screenshots); kept for this tab only.
      sessionStorage.setItem("chefia-token", conn.token);
      params.delete("token");
      history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
    }
    $("store-input").value = conn.store;
    $("connect-form").addEventListener("submit", (event) => {
      event.preventDefault();
      conn.store = $("store-input").value.trim();
      conn.token = $("token-input").value.trim() || conn.token;
      sessionStorage.setItem("chefia-store", conn.store);
      if (conn.token) sessionStorage.setItem("chefia-token", conn.token);
      $("token-input").value = "";
      conn.attempt = 0;
      state.terminals.clear();
      $("terminals").tBodies[0].replaceChildren();
      connect();
    });
    for (const id of ["filter-terminal", "filter-kind", "filter-status", "search-entity"]) {
      $(id).addEventListener("input", () => {
        state.feedRebuild = true;
        renderFeed();
      });
    }
    $("export-csv").addEventListener("click", exportCsv);
    setInterval(render, RENDER_MS);
    if (conn.store || conn.token) connect();
    else setConnection("disconnected", "enter a store (or a token) and connect");
  }

  // For tests and the curious: the state and the message handler (no way to write anything).
  window.chefiaMonitor = { state, handle, render };
  start();
})();
