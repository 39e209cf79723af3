// Live updates for the server-rendered pages: one EventSource per page, fed by the node's
// etcd watch. On "change" the page is fetched once more and every element marked data-live
// is swapped for its fresh copy (forms outside them keep what the user is typing). Without
// JavaScript the pages still work; they just do not update themselves.
"use strict";
(function () {
  const status = document.getElementById("live-status");
  let inFlight = false;
  let again = false;

  async function refresh(selector) {
    if (inFlight) { again = true; return; }
    inFlight = true;
    try {
      const resp = await fetch(location.pathname + location.search, {
        headers: { "Accept": "text/html" }, credentials: "same-origin", cache: "no-store",
      });
      if (resp.redirected || !resp.ok) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      document.querySelectorAll(selector).forEach(function (old) {
        const fresh = old.id ? doc.getElementById(old.id) : null;
        if (fresh) old.replaceWith(fresh);
      });
    } catch (e) {
      // The node went away meanwhile: EventSource reconnects, and the next change redraws.
    } finally {
      inFlight = false;
      if (again) { again = false; refresh("[data-live]"); }
    }
  }

  if (window.EventSource && !document.querySelector(".login")) {
    const source = new EventSource("/events");
    let opened = false;
    source.addEventListener("hello", function () {
      status && status.classList.replace("off", "on");
      if (opened) refresh("[data-live]");  // reconnected: changes may have been missed
      opened = true;
    });
    source.addEventListener("change", function () { refresh("[data-live]"); });
    source.addEventListener("tick", function () {
      if (document.querySelector("[data-tick]")) refresh("[data-tick]");
    });
    source.onerror = function () { status && status.classList.replace("on", "off"); };
  }

  // Ask before the actions that lose data (forms marked data-confirm).
  document.addEventListener("submit", function (e) {
    const message = e.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) e.preventDefault();
  });
})();
