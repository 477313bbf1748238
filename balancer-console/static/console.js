// balancer console: live refresh of the page's main section (no framework, no inline script).
// The server renders everything; this only re-fetches the same page's fragment and swaps it in.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main) return;
  var every = parseInt(main.getAttribute("data-refresh-ms"), 10) || 3000;
  var busy = false;
  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "X-Console-Fragment": "1" },
      redirect: "manual",
      cache: "no-store"
    }).then(function (r) {
      if (r.type === "opaqueredirect" || r.status === 401 || r.status === 403) {
        window.location.assign("/login");
        return null;
      }
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html !== null && html !== undefined) {
        main.innerHTML = html;
        main.setAttribute("data-updated", String(Date.now()));
      }
    }).catch(function () {
      main.setAttribute("data-stale", "1");
    }).then(function () { busy = false; });
  }
  window.setInterval(refresh, every);
})();
