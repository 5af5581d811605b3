// Refresh the status numbers, table and charts in place: the server renders the fragment (escaped,
// the same markup as the first paint), this swaps it in. Without JavaScript the page still works.
// Updates wait while focus is inside the live area (so keyboard users keep their place) and can be
// paused with the button this script adds.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch || !window.DOMParser) return;
  var every = 1000 * (Number(live.getAttribute("data-refresh")) || 10);
  var paused = false;
  var toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "quiet";
  toggle.textContent = "Pause updates";
  toggle.setAttribute("aria-pressed", "false");
  toggle.addEventListener("click", function () {
    paused = !paused;
    toggle.textContent = paused ? "Resume updates" : "Pause updates";
    toggle.setAttribute("aria-pressed", String(paused));
  });
  live.parentNode.insertBefore(toggle, live);
  function refresh() {
    if (paused || live.contains(document.activeElement)) {
      window.setTimeout(refresh, every);
      return;
    }
    fetch(live.getAttribute("data-source"), { headers: { accept: "text/html" }, cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        live.replaceChildren.apply(live, Array.prototype.slice.call(doc.body.childNodes));
      })
      .catch(function () { /* keep what is shown; try again next time */ })
      .then(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
