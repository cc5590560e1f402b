// LoRA Queue: the things Gradio cannot do by itself.
//  1. a click on a row of the queue table selects that job (fills #loraq_selected_job)
//  2. a click on a LoRA name in the LoRA tools tab appends "name:1.0" to the merge (or bake) text, or
//     names the LoRA to resize, whichever section is in view
//  3. a field whose message (#loraq_err_KEY) shows is outlined (#loraq_f_KEY gets .loraq-invalid); after a
//     refused Add to queue the page scrolls to the first (window.loraqShowErrors, called by the answer)
//  4. a help line cut to one line at the top of the form shows whole on hover
// Loaded by the WebUI from javascript/, and by the standalone app on page load. No framework.
(function () {
  if (window.loraqInstalled) return;
  window.loraqInstalled = true;

  function root() {
    var app = document.querySelector("gradio-app");
    return app && app.shadowRoot ? app.shadowRoot : document;
  }

  function field(elemId) {
    var box = root().querySelector("#" + elemId);
    return box ? box.querySelector("textarea, input") : null;
  }

  // Set a Gradio textbox as if the user typed: Gradio listens to "input" events.
  function setText(elemId, text) {
    var input = field(elemId);
    if (!input) return;
    input.value = text;
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function onClick(event) {
    var path = event.composedPath ? event.composedPath() : [event.target];
    for (var i = 0; i < path.length; i++) {
      var el = path[i];
      if (!el.classList) continue;
      if (el.classList.contains("loraq-row") && el.dataset.jobId) {
        setText("loraq_selected_job", el.dataset.jobId);
        return;
      }
      if (el.classList.contains("loraq-lora") && el.dataset.name) {
        // the LoRA tools section in view: resize takes the one name, merge and bake add name:1.0
        var resize = field("loraq_resize_input");
        if (resize && resize.offsetParent !== null) {
          setText("loraq_resize_input", el.dataset.name);
          return;
        }
        var bake = field("loraq_bake_inputs");
        var target = bake && bake.offsetParent !== null ? "loraq_bake_inputs" : "loraq_merge_inputs";
        var input = field(target);
        if (!input) return;
        var current = input.value.replace(/\s+$/, "");
        setText(target, (current ? current + "\n" : "") + el.dataset.name + ":1.0");
        return;
      }
    }
  }

  document.addEventListener("click", onClick, true);

  function markErrors(scroll) {
    var r = root(), seen = {}, first = null;
    var boxes = r.querySelectorAll('[id^="loraq_err_"]');
    for (var i = 0; i < boxes.length; i++) {
      var box = boxes[i];
      if (seen[box.id]) continue;            // gradio 3 repeats a markdown's id inside it: the outer one counts
      seen[box.id] = true;
      var target = r.querySelector("#loraq_f_" + box.id.slice("loraq_err_".length));
      if (!target) continue;
      var shown = box.offsetParent !== null && box.textContent.trim() !== "";
      target.classList.toggle("loraq-invalid", shown);
      if (shown && !first) first = target;
    }
    if (scroll && first) first.scrollIntoView({ block: "center" });
    return first;
  }

  // The answer's values reach the page a moment after the call: look again once sections have opened.
  window.loraqShowErrors = function (scroll) {
    requestAnimationFrame(function () { markErrors(scroll); });
    setTimeout(function () { markErrors(scroll); }, 350);
  };

  var pending = null;
  new MutationObserver(function () {      // messages hidden by a mode change or a later answer: no outline
    if (pending) return;
    pending = setTimeout(function () { pending = null; markErrors(false); }, 200);
  }).observe(document.documentElement, { subtree: true, childList: true, attributes: true,
                                         attributeFilter: ["class", "style"] });

  document.addEventListener("mouseover", function (event) {
    var el = event.target;
    if (!el || el.nodeType !== 1 || el.title || el.scrollWidth <= el.clientWidth) return;
    if (getComputedStyle(el).textOverflow === "ellipsis") el.title = el.textContent.trim();
  }, true);
})();
