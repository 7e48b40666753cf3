/* strata dashboard.
 *
 * Rules this file keeps (docs/dashboard.md):
 * - Text that comes from data (event types, dimension values, SQL results,
 *   error messages) is inserted with textContent / createTextNode only. No
 *   innerHTML anywhere; chart tooltips use ECharts' richText mode (canvas).
 * - Auto-refresh reads the live path only: the metrics API, /v1/status and
 *   /metrics. SQL runs only when the user presses Run in the explorer.
 * - Every panel records the API calls behind it (shown under "query", and in
 *   the panel's data-api attribute for tests and scripts).
 * - Numbers are never invented: an endpoint that is missing or failing turns
 *   its panel into a visible "not available" state.
 */
"use strict";

(() => {
  const TOKEN_KEY = "strata.token";
  const MINUTE = 60_000;
  const HOUR = 60 * MINUTE;
  const DAY = 24 * HOUR;
  const GRANULARITY_MS = { "5m": 5 * MINUTE, "1h": HOUR, "1d": DAY };
  const RANGE_MS = { "15m": 15 * MINUTE, "1h": HOUR, "6h": 6 * HOUR, "24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY };
  const PANELS = ["live", "users", "revenue", "pageviews", "funnel", "top", "health"];
  const REQUEST_TIMEOUT_MS = 30_000;
  const EXPLORER_TIMEOUT_MS = 180_000; // longer than [query] sql_max_execution_s

  const state = {
    token: null,
    config: null,
    timer: null,
    refreshing: false,
    refreshCount: 0,
    refreshMs: 5000,
    prevCounters: null, // {t, accepted, rejected, late}
    epsHistory: [], // [t, events/s]
    charts: {},
    funnelSteps: [],
    calls: {}, // panel -> [{method, url, body, status, note}]
    liveWindowsMissing: false, // /v1/metrics/<configured metric> answered 404
  };

  // ---------------------------------------------------------------- DOM helpers
  const $ = (id) => document.getElementById(id);

  /** Build an element; string children become text nodes (never HTML). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-") || key === "title" || key === "colspan") node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function fmtNumber(value, digits = 0) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
    const s = Math.max(0, ms) / 1000;
    if (s < 90) return `${s.toFixed(1)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }

  function fmtTime(ms) {
    if (ms === null || ms === undefined) return "–";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function setValue(id, value, text, provisional) {
    const node = $(id);
    node.textContent = text;
    node.dataset.value = value === null || value === undefined ? "" : String(value);
    node.classList.toggle("provisional", Boolean(provisional));
    node.title = provisional ? "provisional: the range includes windows that are still open" : "";
  }

  // ---------------------------------------------------------------- API access
  class HttpError extends Error {
    constructor(status, message, url) {
      super(message);
      this.status = status;
      this.url = url;
    }
  }

  function record(panel, entry) {
    if (!panel) return;
    (state.calls[panel] = state.calls[panel] || []).push(entry);
  }

  async function request(method, url, { body, panel, text, timeoutMs = REQUEST_TIMEOUT_MS } = {}) {
    const entry = { method, url, body, status: null, note: "" };
    record(panel, entry);
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    // A hung request must not stall the refresh loop (one refresh at a time).
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        signal: abort.signal,
      });
    } catch (err) {
      entry.note = abort.signal.aborted ? "timed out" : "network error";
      throw new HttpError(0, `${entry.note}: ${err.message}`, url);
    } finally {
      clearTimeout(timer);
    }
    entry.status = response.status;
    if (response.status === 401) {
      signOut("Your token was rejected (401). Sign in again.");
      throw new HttpError(401, "unauthorized", url);
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const payload = await response.json();
        if (payload && payload.error) message = `${response.status}: ${payload.error}`;
      } catch (_) {
        /* not JSON */
      }
      entry.note = message;
      throw new HttpError(response.status, message, url);
    }
    if (text) return response.text();
    const payload = await response.json();
    const notes = [];
    if (payload.served_from) notes.push(`served_from=${payload.served_from}`);
    if (payload.reason) notes.push(`reason=${payload.reason}`);
    if (payload.cache) notes.push(`cache=${payload.cache}`);
    if (payload.complete_until !== undefined) notes.push(`complete_until=${payload.complete_until}`);
    if (payload.open_windows !== undefined) notes.push(`open_windows=${JSON.stringify(payload.open_windows)}`);
    if (payload.revised !== undefined) notes.push(`revised=${JSON.stringify(payload.revised)}`);
    entry.note = notes.join(" ");
    return payload;
  }

  const getJSON = (url, panel) => request("GET", url, { panel });

  function query(params) {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== null && value !== undefined && value !== "") search.set(key, String(value));
    }
    return search.toString();
  }

  /** A request shared by several panels within one refresh (one HTTP call). */
  function shared(ctx, key, url, panel) {
    if (!ctx.shared[key]) ctx.shared[key] = { promise: getJSON(url, null) };
    const item = ctx.shared[key];
    const entry = { method: "GET", url, status: null, note: "(shared)" };
    record(panel, entry);
    return item.promise.then(
      (payload) => {
        entry.status = 200;
        entry.note = payload.served_from ? `served_from=${payload.served_from} (shared)` : "(shared)";
        return payload;
      },
      (err) => {
        entry.status = err.status;
        entry.note = err.message;
        throw err;
      },
    );
  }

  // --------------------------------------------------------- response helpers
  function parseTime(value) {
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return value;
    const ms = Date.parse(value);
    return Number.isNaN(ms) ? null : ms;
  }

  function rowTime(row) {
    return parseTime(row.time ?? row.window_start ?? row.t ?? row.day ?? row.date);
  }

  /** Open windows as a Set of window-start ms (accepts ISO strings, ms, or {start}).
   * /v1/metrics/<configured metric> lists them in `open_window_ranges`
   * (`open_windows` is a boolean on every endpoint). */
  function openWindowSet(payload) {
    const out = new Set();
    const list = Array.isArray(payload.open_window_ranges) ? payload.open_window_ranges : [];
    for (const item of list) {
      const t = typeof item === "object" && item !== null ? parseTime(item.start ?? item.window_start ?? item.from) : parseTime(item);
      if (t !== null) out.add(t);
    }
    return out;
  }

  /** Revised ranges as [[fromMs, toMs], ...] (accepts pairs or {from,to}/{start,end}),
   * from `revised_ranges` of /v1/metrics/<configured metric>. */
  function revisedRanges(payload) {
    const list = Array.isArray(payload.revised_ranges) ? payload.revised_ranges : [];
    const out = [];
    for (const item of list) {
      let start;
      let end;
      if (Array.isArray(item)) [start, end] = item.map(parseTime);
      else if (item && typeof item === "object") {
        start = parseTime(item.from ?? item.start ?? item.window_start);
        end = parseTime(item.to ?? item.end ?? item.window_end);
      } else start = parseTime(item);
      if (start !== null && start !== undefined) out.push([start, end ?? start]);
    }
    return out;
  }

  /** How many open windows / revised ranges a response reports: every
   * endpoint says true/false (a list counts by its length). */
  function flagCount(value) {
    if (Array.isArray(value)) return value.length;
    return value ? 1 : 0;
  }

  /** True when a window starting at `start` (length `size`) is still open. */
  function isOpen(start, size, completeUntil, openSet) {
    if (openSet.has(start)) return true;
    if (completeUntil === null) return true;
    return start + size > completeUntil;
  }

  function numberField(row, names) {
    for (const name of names) {
      if (row[name] !== undefined && row[name] !== null && !Number.isNaN(Number(row[name]))) return Number(row[name]);
    }
    return null;
  }

  // ---------------------------------------------------------- time range
  function utcMidnight(ms) {
    return ms - (ms % DAY);
  }

  function toUtcInput(ms) {
    return new Date(ms).toISOString().slice(0, 16);
  }

  function currentRange() {
    const now = Date.now();
    const choice = $("range-select").value;
    let from;
    let to = now;
    if (choice === "today") from = utcMidnight(now);
    else if (choice === "custom") {
      from = Date.parse(`${$("custom-from").value}:00Z`);
      to = Date.parse(`${$("custom-to").value}:00Z`);
      if (Number.isNaN(from) || Number.isNaN(to) || from >= to) {
        from = now - HOUR;
        to = now;
      }
    } else from = now - RANGE_MS[choice];
    let granularity = $("granularity-select").value;
    if (granularity === "auto") {
      const span = to - from;
      granularity = span <= 6 * HOUR ? "5m" : span <= 3 * DAY ? "1h" : "1d";
    }
    return { from, to, now, granularity, step: GRANULARITY_MS[granularity] };
  }

  const iso = (ms) => new Date(ms).toISOString();

  // ---------------------------------------------------------- panels
  function panelNode(panel) {
    return $(`panel-${panel}`);
  }

  function setPanelStatus(panel, text, kind) {
    const node = panelNode(panel).querySelector(".panel-status");
    node.textContent = text || "";
    node.className = `panel-status ${kind || ""}`;
    panelNode(panel).classList.toggle("unavailable", kind === "unavailable");
  }

  function renderCalls(panel) {
    const node = panelNode(panel);
    const calls = state.calls[panel] || [];
    node.dataset.api = JSON.stringify(calls.map((c) => c.url));
    const pre = node.querySelector("details.query pre");
    pre.textContent = calls.length
      ? calls.map((c) => `${c.method} ${c.url}${c.body === undefined ? "" : `\n  body: ${JSON.stringify(c.body)}`}\n  -> ${c.status ?? "…"} ${c.note || ""}`).join("\n")
      : "(no API call)";
  }

  function describeError(err) {
    if (err instanceof HttpError && (err.status === 404 || err.status === 405)) {
      const path = err.url.split("?")[0];
      return { text: `not available: ${path} is not served by this strata (${err.status})`, kind: "unavailable" };
    }
    if (err instanceof HttpError && err.status === 403) {
      return { text: `not available: ${err.message}`, kind: "unavailable" };
    }
    return { text: `error: ${err.message}`, kind: "unavailable" };
  }

  async function runPanel(panel, fn, ctx) {
    state.calls[panel] = [];
    try {
      const status = await fn(ctx);
      setPanelStatus(panel, status ? status.text : "", status ? status.kind : "");
      panelNode(panel).dataset.ready = "true";
    } catch (err) {
      const { text, kind } = describeError(err);
      setPanelStatus(panel, text, kind);
      panelNode(panel).dataset.ready = "error";
    }
    renderCalls(panel);
    panelNode(panel).dataset.refreshed = String(state.refreshCount);
  }

  function chart(id) {
    if (!state.charts[id]) {
      state.charts[id] = window.echarts.init($(id), null, { renderer: "canvas" });
    }
    return state.charts[id];
  }

  const TOOLTIP = { trigger: "axis", renderMode: "richText", confine: true };
  const GRID = { left: 48, right: 12, top: 24, bottom: 28 };

  // -- live: events/s, today's events, events in range -------------------------
  function parsePrometheus(textBody) {
    const totals = {};
    for (const line of textBody.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      const value = Number(match[3]);
      if (Number.isNaN(value)) continue;
      totals[match[1]] = (totals[match[1]] || 0) + value;
    }
    return totals;
  }

  function fetchProm(ctx) {
    if (!ctx.shared.prom) {
      ctx.shared.prom = {
        promise: request("GET", "/metrics", { text: true }).then((body) => {
          const totals = parsePrometheus(body);
          const sample = {
            t: performance.now(),
            accepted: totals.strata_ingest_events_total || 0,
            rejected: totals.strata_ingest_rejected_total || 0,
            late: totals.strata_late_events_total,
            totals,
          };
          const prev = state.prevCounters;
          state.prevCounters = sample;
          let rates = null;
          if (prev && sample.t > prev.t && sample.accepted >= prev.accepted) {
            const seconds = (sample.t - prev.t) / 1000;
            const accepted = (sample.accepted - prev.accepted) / seconds;
            const rejected = Math.max(0, sample.rejected - prev.rejected) / seconds;
            rates = { accepted, rejected };
          }
          return { sample, rates };
        }),
      };
    }
    return ctx.shared.prom.promise;
  }

  function recordProm(panel) {
    record(panel, { method: "GET", url: "/metrics", status: 200, note: "(Prometheus text, shared)" });
  }

  function eventsURL(from, to, granularity) {
    return `/v1/metrics/events?${query({ from: iso(from), to: iso(to), granularity })}`;
  }

  async function refreshLive(ctx) {
    recordProm("live");
    const prom = await fetchProm(ctx);
    if (prom.rates) {
      state.epsHistory.push([Date.now(), prom.rates.accepted]);
      if (state.epsHistory.length > 120) state.epsHistory.shift();
      setValue("eps-value", prom.rates.accepted, fmtNumber(prom.rates.accepted, 1));
    }
    const todayURL = eventsURL(utcMidnight(ctx.now), ctx.now, "1d");
    const rangeURL = eventsURL(ctx.from, ctx.to, ctx.granularity);
    const [today, range] = await Promise.all([
      shared(ctx, "events-today", todayURL, "live"),
      shared(ctx, "events-range", rangeURL, "live"),
    ]);
    const todayTotal = today.rows.reduce((sum, row) => sum + Number(row.events || 0), 0);
    const todayComplete = parseTime(today.complete_until);
    setValue("today-events-value", todayTotal, fmtNumber(todayTotal), todayComplete === null || todayComplete < ctx.now);
    const rangeTotal = range.rows.reduce((sum, row) => sum + Number(row.events || 0), 0);
    setValue("range-events-value", rangeTotal, fmtNumber(rangeTotal));
    chart("eps-chart").setOption({
      animation: false,
      grid: GRID,
      tooltip: TOOLTIP,
      xAxis: { type: "time" },
      yAxis: { type: "value", name: "events/s", nameGap: 8 },
      series: [{ type: "line", showSymbol: false, areaStyle: { opacity: 0.15 }, data: state.epsHistory }],
    });
    if (!prom.rates) return { text: "measuring events/s (needs two samples)…", kind: "" };
    return null;
  }

  // -- active users: DAU / WAU / MAU --------------------------------------------
  /** Value of an active-users endpoint: the `users` (or `value`) of its last row. */
  function activeValue(payload) {
    if (typeof payload.value === "number") return payload.value;
    const rows = payload.rows || [];
    if (!rows.length) return 0;
    return numberField(rows[rows.length - 1], ["users", "value", "dau", "wau", "mau", "active_users"]);
  }

  async function refreshUsers(ctx) {
    const today = utcMidnight(ctx.now);
    const calls = {
      dau: `/v1/metrics/dau?${query({ from: iso(today), to: iso(ctx.now) })}`,
      wau: `/v1/metrics/wau?${query({ from: iso(today), to: iso(ctx.now) })}`,
      mau: `/v1/metrics/mau?${query({ from: iso(today), to: iso(ctx.now) })}`,
    };
    // DAU per day over the selected range (at least the last 7 days), for the bars.
    const seriesFrom = Math.min(utcMidnight(ctx.from), today - 6 * DAY);
    const seriesURL = `/v1/metrics/dau?${query({ from: iso(seriesFrom), to: iso(ctx.now), granularity: "1d" })}`;
    const [dau, wau, mau, series] = await Promise.all(
      [calls.dau, calls.wau, calls.mau, seriesURL].map((url) => getJSON(url, "users")),
    );
    const open = (payload) => {
      const complete = parseTime(payload.complete_until);
      return complete === null || complete < ctx.now || flagCount(payload.open_windows) > 0;
    };
    const dauValue = activeValue(dau);
    setValue("dau-value", dauValue, fmtNumber(dauValue), open(dau));
    const wauValue = activeValue(wau);
    setValue("wau-value", wauValue, fmtNumber(wauValue), open(wau));
    const mauValue = activeValue(mau);
    setValue("mau-value", mauValue, fmtNumber(mauValue), open(mau));
    const completeUntil = parseTime(series.complete_until);
    chart("users-chart").setOption({
      animation: false,
      grid: GRID,
      tooltip: TOOLTIP,
      xAxis: { type: "category", data: (series.rows || []).map((row) => new Date(rowTime(row)).toISOString().slice(5, 10)) },
      yAxis: { type: "value", name: "DAU", nameGap: 8, minInterval: 1 },
      series: [
        {
          type: "bar",
          barMaxWidth: 32,
          data: (series.rows || []).map((row) => {
            const provisional = isOpen(rowTime(row), DAY, completeUntil, openWindowSet(series));
            return { value: numberField(row, ["users", "value", "dau"]), itemStyle: provisional ? PROVISIONAL_STYLE : {} };
          }),
        },
      ],
    });
    return open(dau) ? { text: "today is still open: DAU is provisional", kind: "provisional" } : null;
  }

  // -- revenue ------------------------------------------------------------------
  async function refreshRevenue(ctx) {
    const url = `/v1/metrics/revenue?${query({ from: iso(ctx.from), to: iso(ctx.to), granularity: ctx.granularity, group_by: "currency" })}`;
    const payload = await getJSON(url, "revenue");
    const rows = payload.rows || [];
    const byCurrency = new Map();
    const series = new Map();
    for (const row of rows) {
      const currency = row.currency || "(none)";
      const value = numberField(row, ["revenue", "value", "sum"]) || 0;
      byCurrency.set(currency, (byCurrency.get(currency) || 0) + value);
      if (!series.has(currency)) series.set(currency, []);
      series.get(currency).push([rowTime(row), value]);
    }
    const totals = $("revenue-totals");
    clear(totals);
    const sorted = [...byCurrency.entries()].sort((a, b) => b[1] - a[1]);
    if (!sorted.length) totals.appendChild(el("div", { class: "stat" }, el("span", { class: "label", text: "revenue in range" }), el("span", { class: "value", text: "0" })));
    for (const [currency, value] of sorted.slice(0, 4)) {
      totals.appendChild(
        el("div", { class: "stat" }, el("span", { class: "label", text: `revenue (${currency})` }), el("span", { class: "value", "data-value": String(value), text: fmtNumber(value, 2) })),
      );
    }
    chart("revenue-chart").setOption(
      {
        animation: false,
        tooltip: TOOLTIP,
        legend: { top: 0, type: "scroll" },
        grid: { ...GRID, top: 30 },
        xAxis: { type: "time", min: ctx.from, max: ctx.to },
        yAxis: { type: "value" },
        series: [...series.entries()].slice(0, 6).map(([name, data]) => ({ name, type: "line", showSymbol: data.length < 3, data })),
      },
      { notMerge: true },
    );
    return completenessStatus(payload, ctx);
  }

  function completenessStatus(payload, ctx) {
    const completeUntil = parseTime(payload.complete_until);
    const parts = [];
    if (flagCount(payload.open_windows) || completeUntil === null || completeUntil < ctx.to) {
      parts.push(`provisional: complete until ${completeUntil === null ? "–" : fmtTime(completeUntil)}`);
    }
    if (flagCount(payload.revised)) parts.push("revised by late events");
    return parts.length ? { text: parts.join(" · "), kind: "provisional" } : null;
  }

  // -- page views by country per window (the seed metric) -----------------------
  const PROVISIONAL_STYLE = {
    opacity: 0.5,
    decal: { symbol: "rect", dashArrayX: [1, 0], dashArrayY: [2, 4], rotation: -Math.PI / 4, color: "rgba(0,0,0,0.35)" },
  };

  async function refreshPageviews(ctx) {
    const granularity = ctx.granularity;
    const params = { from: iso(ctx.from), to: iso(ctx.to), granularity, group_by: "country" };
    let payload;
    let fallback = state.liveWindowsMissing;
    try {
      if (fallback) throw new HttpError(404, "known missing", "");
      // The configured metric, merged with its live windows (serving store).
      payload = await getJSON(`/v1/metrics/page_views_by_country?${query(params)}`, "pageviews");
    } catch (err) {
      if (!(err instanceof HttpError) || err.status !== 404) throw err;
      state.liveWindowsMissing = true; // asked again after the next sign-in
      // No live-window endpoint in this build: the same numbers from the
      // counts API, which the router answers from the metric's rollup.
      payload = await getJSON(`/v1/metrics/count?${query({ ...params, event_type: "page_view" })}`, "pageviews");
      fallback = true;
    }
    const rows = payload.rows || [];
    const step = GRANULARITY_MS[granularity];
    const completeUntil = parseTime(payload.complete_until);
    const openSet = openWindowSet(payload);
    const totals = new Map();
    const VIEWS = ["views", "events", "count", "value"];
    for (const row of rows) totals.set(row.country ?? "", (totals.get(row.country ?? "") || 0) + (numberField(row, VIEWS) || 0));
    const top = [...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, 8).map(([c]) => c);
    const topSet = new Set(top);
    const byCountry = new Map([...top, "other"].map((c) => [c, new Map()]));
    const times = new Set();
    for (const row of rows) {
      const t = rowTime(row);
      times.add(t);
      const key = topSet.has(row.country ?? "") ? row.country ?? "" : "other";
      const bucket = byCountry.get(key);
      bucket.set(t, (bucket.get(t) || 0) + (numberField(row, VIEWS) || 0));
    }
    const sortedTimes = [...times].sort((a, b) => a - b);
    let openCount = 0;
    const openTimes = new Set(sortedTimes.filter((t) => isOpen(t, step, completeUntil, openSet)));
    openCount = openTimes.size;
    const revised = revisedRanges(payload);
    const revisedUnlocated = !revised.length && flagCount(payload.revised) > 0;
    const series = [...byCountry.entries()]
      .filter(([, bucket]) => bucket.size)
      .map(([country, bucket], index) => ({
        name: country === "" ? "(unknown)" : country,
        type: "bar",
        stack: "views",
        barMaxWidth: 28,
        data: sortedTimes.map((t) => ({ value: [t + step / 2, bucket.get(t) || 0], itemStyle: openTimes.has(t) ? PROVISIONAL_STYLE : {} })),
        markArea:
          index === 0 && revised.length
            ? { silent: true, itemStyle: { color: "rgba(106,47,176,0.10)" }, label: { show: true, position: "insideTop", formatter: "revised" }, data: revised.map(([a, b]) => [{ xAxis: a }, { xAxis: Math.max(b, a + step) }]) }
            : undefined,
      }));
    chart("pageviews-chart").setOption(
      {
        animation: false,
        aria: { enabled: true, decal: { show: false } },
        grid: { ...GRID, top: 36 },
        tooltip: { ...TOOLTIP, axisPointer: { type: "shadow" } },
        legend: { top: 0, type: "scroll" },
        xAxis: { type: "time", min: ctx.from, max: ctx.to },
        yAxis: { type: "value", minInterval: 1 },
        series,
      },
      { notMerge: true },
    );
    const node = panelNode("pageviews");
    node.dataset.windows = String(sortedTimes.length);
    node.dataset.openWindows = String(openCount);
    node.dataset.revisedRanges = String(revised.length);
    node.dataset.total = String([...totals.values()].reduce((a, b) => a + b, 0));
    const parts = [`${sortedTimes.length} window(s)`];
    if (openCount) parts.push(`${openCount} open (provisional, hatched)`);
    if (revised.length) parts.push(`${revised.length} revised range(s)`);
    if (revisedUnlocated) parts.push("revised by late events");
    if (payload.served_from) parts.push(`served from ${payload.served_from}`);
    if (fallback) parts.push("live windows endpoint not available: counts API");
    return { text: parts.join(" · "), kind: openCount || revised.length || revisedUnlocated ? "provisional" : "" };
  }

  // -- funnel ---------------------------------------------------------------------
  /** Steps of a funnel response as [{name, users}] in step order. The
   * query layer answers rows = [{value: breakdown, steps: [{step: 1.., users}]}]. */
  function funnelSteps(payload, requested) {
    const users = new Array(requested.length).fill(0);
    for (const group of payload.rows || []) {
      for (const item of group.steps || []) {
        const index = Number(item.step) - 1;
        if (index >= 0 && index < users.length) users[index] += Number(item.users || 0);
      }
    }
    return requested.map((name, index) => ({ name, users: users[index] }));
  }

  async function refreshFunnel(ctx) {
    const steps = state.funnelSteps;
    const body = { steps, from: iso(ctx.from), to: iso(ctx.to) };
    const payload = await request("POST", "/v1/metrics/funnel", { body, panel: "funnel" });
    const result = funnelSteps(payload, steps);
    const tbody = $("funnel-table").querySelector("tbody");
    clear(tbody);
    result.forEach((step, index) => {
      const previous = index ? result[index - 1].users : null;
      const first = result.length ? result[0].users : null;
      const fromPrevious = index === 0 ? "–" : previous ? `${((100 * step.users) / previous).toFixed(1)} %` : "–";
      const fromFirst = first ? `${((100 * step.users) / first).toFixed(1)} %` : "–";
      tbody.appendChild(
        el("tr", { "data-step": step.name }, el("td", { text: step.name }), el("td", { class: "num", "data-value": String(step.users), text: fmtNumber(step.users) }), el("td", { class: "num", text: fromPrevious }), el("td", { class: "num", text: fromFirst })),
      );
    });
    chart("funnel-chart").setOption(
      {
        animation: false,
        tooltip: { trigger: "item", renderMode: "richText" },
        series: [
          {
            type: "funnel",
            sort: "none",
            left: 10,
            right: 10,
            top: 6,
            bottom: 6,
            minSize: "8%",
            label: { position: "inside", formatter: "{b}: {c}" },
            data: result.map((s) => ({ name: s.name, value: s.users })),
          },
        ],
      },
      { notMerge: true },
    );
    return completenessStatus(payload, ctx);
  }

  // -- top event types and dimensions --------------------------------------------
  function fillTable(tableId, rows, limit = 10) {
    const body = $(tableId).querySelector("tbody");
    clear(body);
    for (const [name, count] of rows.slice(0, limit)) {
      body.appendChild(el("tr", {}, el("td", { text: name, title: name }), el("td", { class: "num", "data-value": String(count), text: fmtNumber(count) })));
    }
    if (!rows.length) body.appendChild(el("tr", {}, el("td", { colspan: "2", class: "muted", text: "no events in this range" })));
  }

  async function refreshTop(ctx) {
    const range = await shared(ctx, "events-range", eventsURL(ctx.from, ctx.to, ctx.granularity), "top");
    const byType = new Map();
    for (const row of range.rows) byType.set(row.event_type, (byType.get(row.event_type) || 0) + Number(row.events || 0));
    fillTable("top-types-table", [...byType.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)));
    const dimension = $("top-dimension").value;
    const url = `/v1/metrics/top?${query({ dimension, from: iso(ctx.from), to: iso(ctx.to), n: 10 })}`;
    try {
      const payload = await getJSON(url, "top");
      const rows = (payload.rows || []).map((row) => [String(row.value ?? row[dimension] ?? row.key ?? ""), numberField(row, ["events", "count", "n"]) ?? 0]);
      fillTable("top-dims-table", rows);
    } catch (err) {
      const body = $("top-dims-table").querySelector("tbody");
      clear(body);
      const { text } = describeError(err);
      body.appendChild(el("tr", {}, el("td", { colspan: "2", class: "error", text })));
      return { text: `top dimensions ${text}`, kind: "unavailable-partial" };
    }
    return null;
  }

  // -- pipeline health ---------------------------------------------------------------
  function findBatchStatus(status) {
    const places = [status.batch, status.reconciliation];
    for (const value of Object.values(status.consumers || {})) places.push(value);
    for (const value of Object.values(status)) if (value && typeof value === "object") places.push(value);
    for (const place of places) {
      if (place && typeof place === "object" && ("last_batch_day" in place || "reconciliation" in place)) return place;
    }
    return null;
  }

  async function refreshHealth(ctx) {
    recordProm("health");
    const [prom, status] = await Promise.all([fetchProm(ctx), getJSON("/v1/status", "health")]);
    if (prom.rates) {
      const { accepted, rejected } = prom.rates;
      setValue("health-ingest", accepted, `${fmtNumber(accepted, 1)} /s`);
      const share = accepted + rejected > 0 ? (100 * rejected) / (accepted + rejected) : 0;
      setValue("health-reject", rejected, `${fmtNumber(rejected, 1)} /s (${share.toFixed(1)} %)`);
    }
    setValue("health-lag", status.lag_events, fmtNumber(status.lag_events));
    // Say who holds the lag: the archiver batches by design (lake.roll_interval).
    const laggards = Object.entries(status.consumers || {})
      .filter(([, info]) => info && Number(info.lag_events) > 0)
      .sort((a, b) => b[1].lag_events - a[1].lag_events);
    $("health-lag-note").textContent = laggards.length ? `most: ${laggards[0][0]}` : "all caught up";
    const watermark = parseTime(status.watermark);
    const delay = watermark === null ? null : Date.now() - watermark;
    setValue("health-watermark", delay, watermark === null ? "no events yet" : fmtDuration(delay));
    const late = prom.sample.late;
    setValue("health-late", late ?? 0, late === undefined ? "0" : fmtNumber(late));
    const batch = findBatchStatus(status);
    if (batch) {
      const errors = Number(batch.errors || 0);
      const day = batch.last_batch_day || "none yet";
      const text = errors ? `${errors} error(s): ${batch.last_error || ""}` : `last day ${day}${batch.running ? ` · running ${batch.running}` : ""}`;
      setValue("health-batch", batch.last_batch_day || "", text);
      $("health-batch").classList.toggle("provisional", errors > 0);
    } else setValue("health-batch", "", "not available");
    // Freshness badge in the top bar.
    const badge = $("freshness");
    badge.textContent = watermark === null ? "no watermark yet" : `complete until ${fmtTime(watermark)} (${fmtDuration(delay)} behind)`;
    badge.classList.toggle("stale", delay === null || delay > 5 * MINUTE);
    badge.dataset.watermark = status.watermark || "";
    const body = $("consumers-table").querySelector("tbody");
    clear(body);
    for (const [name, info] of Object.entries(status.consumers || {})) {
      const lag = info && typeof info === "object" && "lag_events" in info ? fmtNumber(info.lag_events) : "–";
      let note = "ok";
      if (info && info.last_error) note = `error: ${info.last_error}`;
      else if (info && info.errors) note = `${info.errors} error(s)`;
      body.appendChild(el("tr", {}, el("td", { text: name }), el("td", { class: "num", text: lag }), el("td", { text: note })));
    }
    if (!prom.rates) return { text: "measuring rates (needs two samples)…", kind: "" };
    return null;
  }

  /* The batch job's reconciliation reports (streaming vs batch per day and
   * aggregation) live in the `reconciliation` table, which no metrics
   * endpoint serves; the page reads them with one SQL query when asked,
   * never on refresh. */
  const RECONCILIATION_SQL =
    "SELECT day, metric, aggregation, streaming_value, batch_value, difference, late_events, run_at " +
    "FROM reconciliation ORDER BY run_at DESC, metric, aggregation LIMIT 50";

  async function showReconciliation() {
    const status = $("recon-status");
    const table = $("recon-table");
    status.hidden = false;
    status.textContent = "loading…";
    try {
      const payload = await request("POST", "/v1/sql", { body: { sql: RECONCILIATION_SQL }, panel: "health" });
      const body = table.querySelector("tbody");
      clear(body);
      for (const row of payload.rows) {
        const [day, metric, aggregation, streaming, batch, difference, late, runAt] = row;
        const drift = Math.abs(Number(difference)) > 1e-9;
        body.appendChild(
          el(
            "tr",
            { class: drift ? "drift" : "" },
            el("td", { text: cellText(day) }),
            el("td", { text: cellText(metric) }),
            el("td", { text: cellText(aggregation) }),
            el("td", { class: "num", text: fmtNumber(streaming, 2) }),
            el("td", { class: "num", text: fmtNumber(batch, 2) }),
            el("td", { class: "num", text: fmtNumber(difference, 2) }),
            el("td", { class: "num", text: fmtNumber(late) }),
            el("td", { text: cellText(runAt) }),
          ),
        );
      }
      table.hidden = !payload.rows.length;
      const drifting = payload.rows.filter((r) => Math.abs(Number(r[5])) > 1e-9).length;
      status.textContent = payload.rows.length
        ? `${payload.rows.length} report row(s); ${drifting} with streaming ≠ batch (the batch value is authoritative)`
        : "no reconciliation reports yet: the nightly batch has not recomputed a day";
    } catch (err) {
      status.textContent = `not available: ${err.message}`;
      status.className = "error";
    }
    renderCalls("health");
  }

  // ---------------------------------------------------------- refresh loop
  const REFRESHERS = {
    live: refreshLive,
    users: refreshUsers,
    revenue: refreshRevenue,
    pageviews: refreshPageviews,
    funnel: refreshFunnel,
    top: refreshTop,
    health: refreshHealth,
  };

  async function refreshAll() {
    if (!state.token) return;
    if (state.refreshing) {
      // One refresh at a time; a change made meanwhile (range, granularity)
      // gets its own refresh as soon as this one ends.
      state.refreshPending = true;
      return;
    }
    state.refreshing = true;
    state.refreshPending = false;
    state.refreshCount += 1;
    const ctx = { ...currentRange(), shared: {} };
    try {
      await Promise.all(PANELS.map((panel) => runPanel(panel, REFRESHERS[panel], ctx)));
      $("last-refresh").textContent = `updated ${new Date().toISOString().slice(11, 19)}Z`;
      document.body.dataset.refreshes = String(state.refreshCount);
    } finally {
      state.refreshing = false;
    }
    if (state.refreshPending) refreshAll();
  }

  function schedule() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
    if (state.refreshMs > 0) state.timer = setInterval(refreshAll, state.refreshMs);
  }

  // ---------------------------------------------------------- query explorer
  /** The routing decision: the answer's served_from/reason plus, when the
   * server explains queries, the chosen table and the rewritten SQL. */
  function routeText(payload, plan) {
    const parts = [];
    const explain = plan && typeof plan.explain === "object" && plan.explain ? plan.explain : null;
    const servedFrom = payload.served_from ?? (explain && explain.served_from);
    if (servedFrom) parts.push(`${servedFrom === "raw" ? "raw events" : "rollup"} (${servedFrom})`);
    const reason = payload.reason ?? (explain && explain.reason);
    if (reason) parts.push(`because: ${reason}`);
    if (explain) {
      if (explain.metric) parts.push(`metric: ${explain.metric}`);
      if (explain.table) parts.push(`table: ${explain.table}`);
      const rejected = explain.candidates_rejected;
      if (rejected && (Array.isArray(rejected) ? rejected.length : Object.keys(rejected).length)) {
        parts.push(`rejected: ${typeof rejected === "string" ? rejected : JSON.stringify(rejected)}`);
      }
      if (explain.sql) parts.push(`runs: ${explain.sql}`);
    } else if (plan && plan.error) parts.push(`(explain failed: ${plan.error})`);
    if (payload.cache) parts.push(`cache: ${payload.cache}`);
    return parts.length ? parts.join("\n") : "–";
  }

  function cellText(value) {
    if (value === null || value === undefined) return "NULL";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  async function runExplorer(event) {
    if (event) event.preventDefault();
    const sql = $("sql-input").value;
    const errorNode = $("sql-error");
    errorNode.hidden = true;
    const panel = $("panel-explorer");
    panel.dataset.state = "running";
    $("sql-run").disabled = true;
    state.calls.explorer = [];
    const started = performance.now();
    try {
      const [payload, plan] = await Promise.all([
        request("POST", "/v1/sql", { body: { sql }, panel: "explorer", timeoutMs: EXPLORER_TIMEOUT_MS }),
        request("POST", "/v1/sql", { body: { sql, explain: true }, panel: "explorer" }).catch((err) => ({ error: err.message })),
      ]);
      const wall = performance.now() - started;
      $("sql-served-from").textContent = payload.served_from || "–";
      $("sql-route").textContent = routeText(payload, plan);
      $("sql-elapsed").textContent = `${fmtNumber(payload.elapsed_ms, 1)} ms in the store · ${fmtNumber(wall, 0)} ms round trip`;
      $("sql-rowcount").textContent = fmtNumber(payload.rows.length);
      const table = $("sql-results");
      const head = table.querySelector("thead");
      const body = table.querySelector("tbody");
      clear(head);
      clear(body);
      head.appendChild(el("tr", {}, ...payload.columns.map((c) => el("th", { text: cellText(Array.isArray(c) ? c[0] : c.name ?? c) }))));
      for (const row of payload.rows.slice(0, 1000)) {
        body.appendChild(el("tr", {}, ...row.map((value) => el("td", { class: typeof value === "number" ? "num" : "", text: cellText(value), title: cellText(value) }))));
      }
      quickChart(payload);
      panel.dataset.state = "done";
    } catch (err) {
      errorNode.textContent = err.message;
      errorNode.hidden = false;
      panel.dataset.state = "error";
      // Do not leave the previous query's answer next to this error.
      for (const id of ["sql-served-from", "sql-route", "sql-elapsed", "sql-rowcount"]) $(id).textContent = "–";
      clear($("sql-results").querySelector("thead"));
      clear($("sql-results").querySelector("tbody"));
      $("sql-chart").hidden = true;
    } finally {
      $("sql-run").disabled = false;
      panel.dataset.runs = String(Number(panel.dataset.runs || 0) + 1);
      const calls = state.calls.explorer || [];
      const pre = panel.querySelector("details.query pre");
      pre.textContent = calls.map((c) => `${c.method} ${c.url}\n  body: ${JSON.stringify(c.body)}\n  -> ${c.status ?? "…"} ${c.note || ""}`).join("\n");
    }
  }

  /** Bar (or line, for time-like first columns) of the first numeric column. */
  function quickChart(payload) {
    const node = $("sql-chart");
    const rows = payload.rows;
    const valueIndex = payload.columns.findIndex((_, i) => i > 0 && rows.length && rows.every((r) => typeof r[i] === "number"));
    if (!rows.length || valueIndex < 1) {
      node.hidden = true;
      return;
    }
    node.hidden = false;
    const target = chart("sql-chart");
    target.resize();
    const labels = rows.slice(0, 200).map((r) => cellText(r[0]));
    const timeLike = labels.every((l) => /^\d{4}-\d\d-\d\d/.test(l));
    const name = payload.columns[valueIndex];
    target.setOption(
      {
        animation: false,
        grid: GRID,
        tooltip: TOOLTIP,
        xAxis: { type: "category", data: labels, axisLabel: { hideOverlap: true } },
        yAxis: { type: "value" },
        series: [{ name: cellText(Array.isArray(name) ? name[0] : name), type: timeLike ? "line" : "bar", data: rows.slice(0, 200).map((r) => r[valueIndex]) }],
      },
      { notMerge: true },
    );
  }

  // ---------------------------------------------------------- sign-in
  function showSignin(message) {
    $("app-view").hidden = true;
    $("signin-view").hidden = false;
    const error = $("signin-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("token-input").focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
    showSignin(message);
  }

  /** Check the token against /dashboard/config; resolves to the config or throws. */
  async function checkToken(token) {
    const response = await fetch("/dashboard/config", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
    if (response.ok) return response.json();
    let reason = `${response.status} ${response.statusText}`;
    try {
      const payload = await response.json();
      if (payload.error) reason = payload.error;
    } catch (_) {
      /* not JSON */
    }
    const error = new Error(response.status === 401 ? "Wrong token: strata does not know this query token." : response.status === 403 ? `This token cannot read metrics: ${reason}` : `Sign-in failed: ${reason}`);
    error.status = response.status;
    throw error;
  }

  async function signIn(token) {
    const config = await checkToken(token);
    sessionStorage.setItem(TOKEN_KEY, token);
    state.token = token;
    state.config = config;
    state.refreshMs = config.refresh_interval_ms;
    const select = $("refresh-select");
    if (![...select.options].some((o) => Number(o.value) === state.refreshMs)) {
      select.appendChild(el("option", { value: String(state.refreshMs), text: fmtDuration(state.refreshMs) }));
    }
    select.value = String(state.refreshMs);
    state.funnelSteps = config.funnel_steps.slice();
    state.liveWindowsMissing = false;
    $("funnel-steps").value = state.funnelSteps.join(", ");
    $("signin-view").hidden = true;
    $("app-view").hidden = false;
    document.body.dataset.signedIn = "true";
    await refreshAll();
    schedule();
  }

  function addPanelChrome() {
    for (const panel of [...PANELS, "explorer"]) {
      const node = panelNode(panel);
      const header = node.querySelector("header");
      header.appendChild(el("span", { class: "panel-status" }));
      const details = el("details", { class: "query" }, el("summary", { text: "query" }), el("pre", { text: "(not run yet)" }));
      header.appendChild(details);
    }
  }

  function wire() {
    addPanelChrome();
    $("signin-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      $("signin-button").disabled = true;
      try {
        await signIn(token);
        $("token-input").value = "";
      } catch (err) {
        showSignin(err.message);
      } finally {
        $("signin-button").disabled = false;
      }
    });
    $("signout").addEventListener("click", () => signOut(""));
    $("range-select").addEventListener("change", () => {
      const custom = $("range-select").value === "custom";
      $("custom-range").hidden = !custom;
      if (custom && !$("custom-from").value) {
        const now = Date.now();
        $("custom-from").value = toUtcInput(now - HOUR);
        $("custom-to").value = toUtcInput(now);
      }
      refreshAll();
    });
    for (const id of ["custom-from", "custom-to", "granularity-select", "top-dimension"]) $(id).addEventListener("change", refreshAll);
    $("refresh-select").addEventListener("change", () => {
      state.refreshMs = Number($("refresh-select").value);
      schedule();
    });
    $("refresh-now").addEventListener("click", refreshAll);
    $("funnel-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const steps = $("funnel-steps").value.split(",").map((s) => s.trim()).filter(Boolean);
      if (steps.length) state.funnelSteps = steps;
      runPanel("funnel", refreshFunnel, { ...currentRange(), shared: {} });
    });
    $("explorer-form").addEventListener("submit", runExplorer);
    $("recon-button").addEventListener("click", showReconciliation);
    $("sql-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) runExplorer(event);
    });
    window.addEventListener("resize", () => Object.values(state.charts).forEach((c) => c.resize()));
  }

  async function start() {
    wire();
    // A token passed as ?token=… is moved into sessionStorage and out of the URL.
    const params = new URLSearchParams(window.location.search);
    if (params.has("token")) {
      sessionStorage.setItem(TOKEN_KEY, params.get("token"));
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : ""));
    }
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (!saved) {
      showSignin("");
      return;
    }
    try {
      await signIn(saved);
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignin(err.message);
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
