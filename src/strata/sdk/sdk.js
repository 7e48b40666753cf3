/* strata web snippet: batches events and sends them to a strata server.
 *
 *   <script src="https://strata.example.com/sdk.js"></script>
 *   <script>
 *     strata.init({url: "https://strata.example.com", writeKey: "sk_...", pageViews: true});
 *     strata.track("signup", {plan: "pro"});
 *     strata.identify("user-42");
 *   </script>
 *
 * Events queue in memory and are sent as one batch every `flushInterval` ms
 * or at `flushAt` events, with fetch(..., {keepalive: true}); when the page is
 * hidden or unloaded the queue goes out with navigator.sendBeacon. The body
 * is text/plain JSON with the write key inside, a CORS "simple" request that
 * needs no preflight, so it also survives a navigation. Every event carries
 * a client-side event_id, so a resend is deduplicated by the server. The
 * anonymous id lives in localStorage ("strata_anonymous_id").
 */
(function (w) {
  "use strict";
  var cfg = { url: "", writeKey: "", flushAt: 20, flushInterval: 1000, pageViews: false };
  var queue = [], timer = null, userId = null, anonymousId = null;

  function uuid() {
    if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, function (c) {
      var r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 3) | 8).toString(16);
    });
  }

  function anonId() {
    if (anonymousId) return anonymousId;
    try {
      anonymousId = w.localStorage.getItem("strata_anonymous_id");
      if (!anonymousId) {
        anonymousId = uuid();
        w.localStorage.setItem("strata_anonymous_id", anonymousId);
      }
    } catch (e) {
      anonymousId = anonymousId || uuid(); // storage blocked: per page load
    }
    return anonymousId;
  }

  function body(events) {
    return JSON.stringify({ batch: events, sent_at: Date.now(), write_key: cfg.writeKey });
  }

  function flush(beacon) {
    if (timer) { clearTimeout(timer); timer = null; }
    if (!queue.length || !cfg.url) return;
    var events = queue.splice(0, 500);
    var endpoint = cfg.url.replace(/\/$/, "") + "/v1/batch";
    var data = body(events);
    if (beacon && w.navigator.sendBeacon &&
        w.navigator.sendBeacon(endpoint, new Blob([data], { type: "text/plain" }))) {
      if (queue.length) flush(true);
      return;
    }
    try {
      w.fetch(endpoint, {
        method: "POST", body: data, keepalive: true, mode: "cors",
        headers: { "Content-Type": "text/plain" }
      }).then(function (res) {
        if (res.status === 429 || res.status >= 500) requeue(events);
      }, function () { requeue(events); });
    } catch (e) { requeue(events); }
    if (queue.length) flush(beacon);
  }

  function requeue(events) {
    queue = events.concat(queue).slice(0, 1000);
    schedule(cfg.flushInterval * 2);
  }

  function schedule(delay) {
    if (!timer) timer = setTimeout(function () { timer = null; flush(false); }, delay);
  }

  function track(eventType, properties, extra) {
    var ev = {
      event_type: eventType, event_id: uuid(), timestamp: Date.now(),
      anonymous_id: anonId(), properties: properties || {},
      path: w.location.pathname, referrer: w.document.referrer || undefined, platform: "web"
    };
    if (userId) ev.user_id = userId;
    for (var k in extra || {}) ev[k] = extra[k];
    queue.push(ev);
    if (queue.length >= cfg.flushAt) flush(false); else schedule(cfg.flushInterval);
    return ev.event_id;
  }

  function page(properties) {
    return track("page_view", properties || { title: w.document.title });
  }

  function init(options) {
    for (var k in options || {}) cfg[k] = options[k];
    w.document.addEventListener("visibilitychange", function () {
      if (w.document.visibilityState === "hidden") flush(true);
    });
    w.addEventListener("pagehide", function () { flush(true); });
    if (cfg.pageViews) page();
  }

  w.strata = {
    init: init, track: track, page: page, flush: flush,
    identify: function (id) { userId = id == null ? null : String(id); },
    reset: function () {
      userId = null; anonymousId = null;
      try { w.localStorage.removeItem("strata_anonymous_id"); } catch (e) {}
    },
    anonymousId: anonId,
    _queue: function () { return queue.length; }
  };
})(window);
