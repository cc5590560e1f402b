// LoRA Queue: the two things Gradio cannot do by itself.
//  1. a click on a row of the queue table selects that job (fills #loraq_selected_job)
//  2. a click on a LoRA name in the LoRA tools tab appends "name:1.0" to the merge (or bake) text, or
//     names the LoRA to resize, whichever section is in view
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
})();
