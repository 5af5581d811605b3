// The copy button next to a secret shown once. Without JavaScript (or clipboard access) the secret
// is still on the page to select and copy by hand, and the button stays hidden.
(function () {
  "use strict";
  var buttons = document.querySelectorAll("button[data-copy]");
  if (!navigator.clipboard) return;
  Array.prototype.forEach.call(buttons, function (button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    var said = document.getElementById("copied");
    button.hidden = false;
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(target.textContent.trim()).then(
        function () { if (said) said.textContent = "Copied to the clipboard."; },
        function () { if (said) said.textContent = "Could not copy: select the text and copy it."; }
      );
    });
  });
})();
