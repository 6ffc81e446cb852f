(function () {
  "use strict";
  function host() {
    try {
      if (window.parent !== window && window.parent.document && window.parent.document.body) {
        return window.parent.document;
      }
    } catch (err) { /* another origin: plain links */ }
    return null;
  }
  // Airflow's own address may carry the task (/plugin/stopchurn?task=...), which it does not pass to the frame
  var own = new URLSearchParams(window.location.search);
  var doc0 = host();
  if (doc0 && !own.has("task")) {
    var wanted = new URLSearchParams(window.parent.location.search).get("task");
    if (wanted) {
      own.set("task", wanted);
      window.location.replace("?" + own.toString() + "#chart");
      return;
    }
  }
  document.addEventListener("click", function (event) {
    var link = event.target && event.target.closest ? event.target.closest("a[data-airflow-link]") : null;
    if (!link || event.defaultPrevented || event.button !== 0) return;
    var doc = host();
    if (!doc) return;
    event.preventDefault();
    var proxy = doc.createElement("a");
    proxy.href = link.href;
    if (event.ctrlKey || event.metaKey || event.shiftKey) proxy.target = "_blank";
    proxy.rel = "noopener";
    proxy.style.display = "none";
    doc.body.appendChild(proxy);
    proxy.click();
    proxy.remove();
  });

  var seconds = Number(document.body.getAttribute("data-refresh-s") || 0);
  if (!(seconds > 0)) return;
  var last = Date.now(), busy = false, stopped = false, started = 0;
  function say(text) {
    var status = document.getElementById("refresh-status");
    if (status) status.textContent = text;
  }
  function refresh() {
    if (busy || stopped || document.visibilityState === "hidden") return;
    var active = document.activeElement;
    if (active && active.tagName === "SELECT") return;
    busy = true;
    started += 1;
    document.body.setAttribute("data-refreshes", String(started));
    fetch(window.location.href.split("#")[0], {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" }
    }).then(function (response) {
      if (response.redirected || !response.ok) {
        stopped = response.redirected;
        throw new Error(response.redirected ? "signed out" : "HTTP " + response.status);
      }
      return response.text();
    }).then(function (text) {
      var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("content");
      var current = document.getElementById("content");
      if (!fresh || !current) throw new Error("no content");
      var x = window.scrollX, y = window.scrollY;
      current.replaceWith(document.importNode(fresh, true));
      window.scrollTo(x, y);
      say("");
    }).catch(function (err) {
      say(stopped ? "Not refreshing: signed out. Reload the page." : "Could not refresh (" + err.message + ")");
    }).finally(function () {
      last = Date.now();
      busy = false;
    });
  }
  window.setInterval(function () {
    if (Date.now() - last >= seconds * 1000) refresh();
  }, 1000);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && Date.now() - last >= seconds * 1000) refresh();
  });
})();
