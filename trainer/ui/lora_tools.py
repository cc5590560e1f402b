"""The LoRA tools tab: the LoRA folder's list beside four sections — Merge (with its preview on the loaded
model), Resize, Extract and Bake — each with its own report. The work is done by ``trainer.ui.loras``' plain
functions (tested without gradio); this file only lays out controls and wires them."""
from __future__ import annotations

import gradio as gr

from trainer.jobs.vocabulary import SAVE_PRECISIONS
from trainer.merge.svd_merge import MergeError, RankPolicy, builtin_presets
from trainer.models.handle import ModelError
from trainer.sampling.merge_preview import DEFAULT_THRESHOLD
from trainer.ui import loras
from trainer.ui.services import UiServices

RANK_MODES = ("rank", "auto", "concat")
LOADED = "empty: the loaded checkpoint"
#: What each tool's button may raise for a user to read (the rest is a bug and shows as one).
USER_ERRORS = (MergeError, ModelError, ValueError, OSError)


def rank_policy(mode: str, rank, conv_rank, energy) -> RankPolicy:
    """The policy the panel's controls describe; conv rank 0 = same as rank."""
    as_int = lambda v: int(v) if v not in (None, "") and float(v).is_integer() else v
    conv = as_int(conv_rank) or None
    if mode == "concat":
        return RankPolicy(rank=None, conv_rank=None, concat=True)
    if mode == "auto":
        return RankPolicy(rank=as_int(rank) or None, conv_rank=conv, energy=float(energy))
    return RankPolicy(rank=as_int(rank), conv_rank=conv)


class RankControls:
    """rank / auto (energy) / concat, rank, conv rank and energy, with ``prefix`` in their element ids."""

    def __init__(self, prefix: str, concat: bool = True, rank: int = 8):
        modes = list(RANK_MODES if concat else RANK_MODES[:2])
        self.mode = gr.Radio(modes, value="rank", label="target rank", elem_id=f"{prefix}_mode",
                             info="rank: fixed; auto: smallest rank keeping the energy fraction (rank caps it)"
                                  + ("; concat: lossless, rank = sum of the inputs" if concat else ""))
        self.rank = gr.Number(rank, label="rank", precision=0, elem_id=f"{prefix}_rank")
        self.conv_rank = gr.Number(0, label="conv rank (0 = as rank)", precision=0, elem_id=f"{prefix}_conv_rank")
        self.energy = gr.Number(0.99, label="auto: energy kept", elem_id=f"{prefix}_energy")

    @property
    def components(self) -> list:
        return [self.mode, self.rank, self.conv_rank, self.energy]


def _output_row(prefix: str, value: str, precision: bool = True):
    with gr.Row():
        output = gr.Textbox(label="output name", value=value, elem_id=f"{prefix}_output", max_lines=1)
        dtype = (gr.Dropdown(list(SAVE_PRECISIONS), value="fp16", label="save precision", elem_id=f"{prefix}_dtype")
                 if precision else None)
        overwrite = gr.Checkbox(False, label="overwrite", elem_id=f"{prefix}_overwrite")
    return output, dtype, overwrite


def _report(prefix: str):
    return gr.Textbox(label="report", lines=12, interactive=False, elem_id=f"{prefix}_report",
                      elem_classes=["loraq-mono"])


class LoraToolsPanel:
    def __init__(self, services: UiServices):
        self.services = services
        folder = services.library
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    self.filter = gr.Textbox(label="filter", placeholder="part of a name", elem_id="loraq_lora_filter",
                                             max_lines=1, scale=3)
                    self.refresh = gr.Button("Refresh", elem_id="loraq_lora_refresh", size="sm", scale=0)
                self.listing = gr.HTML(self._listing(""), elem_id="loraq_lora_list")
                gr.Markdown(f"LoRAs in `{folder}` — click one to add `name:1.0` to the merge or bake list (or to "
                            f"pick it for a resize). LoRAs are written to `{services.lora_dir}`. Blocks "
                            "(`name:ratio:BLOCKS`): a preset — "
                            + ", ".join(f"`{p}`" for p in builtin_presets("sd1")) + " — or 17 / 26 weights "
                            "(SD1/SD2), 12 / 20 (SDXL), in LoRA Block Weight's order; modules outside the blocks "
                            "take BASE's weight.")
            with gr.Column(scale=3):
                # ids on every tab and one selected: gradio 4.40 re-selects the chosen tab by id at every update
                # and, with none, warns "Attempted to select a non-interactive or hidden tab." each time
                with gr.Tabs(selected="merge", elem_id="loraq_tools_tabs"):
                    with gr.Tab("Merge", id="merge", elem_id="loraq_tools_merge"):
                        self._merge_section()
                    with gr.Tab("Resize", id="resize", elem_id="loraq_tools_resize"):
                        self._resize_section()
                    with gr.Tab("Extract", id="extract", elem_id="loraq_tools_extract"):
                        self._extract_section()
                    with gr.Tab("Bake", id="bake", elem_id="loraq_tools_bake"):
                        self._bake_section()
        listing = self._listing
        self.filter.change(listing, [self.filter], [self.listing], show_progress=False)
        self.refresh.click(listing, [self.filter], [self.listing], show_progress=False)

    def _listing(self, text: str | None) -> str:
        library = self.services.library
        return loras.lora_list_html(loras.list_loras(library, text or ""), library)

    # -- merge (+ preview) ---------------------------------------------------------------------------------

    def _merge_section(self) -> None:
        self.inputs = gr.Textbox(label="LoRAs to merge (name:ratio[:blocks], one per line)", lines=5,
                                 elem_id="loraq_merge_inputs", placeholder="style_a:1.0\nstyle_b:0.5:OUTD")
        with gr.Row():
            self.merge_rank = RankControls("loraq_merge")
        with gr.Row():
            self.semantics = gr.Dropdown(list(loras.SEMANTICS), value=loras.SEMANTICS[0], label="ratio semantics",
                                         elem_id="loraq_merge_semantics",
                                         info="ours: 0.5 halves a LoRA, -1 subtracts; SuperMerger's: a ratio acts "
                                              "squared with cross terms between LoRAs (docs/merge-semantics.md)")
            self.same_to_strength = gr.Checkbox(False, label="SuperMerger: same to Strength",
                                                elem_id="loraq_merge_same_to_strength")
        self.output, self.precision, self.overwrite = _output_row("loraq_merge", "merged")
        with gr.Accordion("Preview before saving: applied together vs merged, on the loaded model", open=False,
                          elem_id="loraq_preview"):
            with gr.Row():
                self.preview_prompt = gr.Textbox(label="prompt", elem_id="loraq_preview_prompt", max_lines=2, scale=3)
                self.preview_seeds = gr.Textbox("1, 2, 3", label="seeds", elem_id="loraq_preview_seeds", max_lines=1)
                self.preview_steps = gr.Number(20, label="steps", precision=0, elem_id="loraq_preview_steps")
                self.preview_threshold = gr.Number(DEFAULT_THRESHOLD, label="same picture below (of 255)",
                                                   elem_id="loraq_preview_threshold")
            self.preview_run = gr.Button("Preview", elem_id="loraq_preview_run")
            self.preview_image = gr.Image(label="applied together | merged at each rank (mean pixel difference)",
                                          type="pil", interactive=False, elem_id="loraq_preview_image")
            self.preview_report = gr.Textbox(label="preview report", lines=10, interactive=False,
                                             elem_id="loraq_preview_report", elem_classes=["loraq-mono"])
        self.run = gr.Button("Merge", variant="primary", elem_id="loraq_merge_run")
        self.report = _report("loraq_merge")
        self.run.click(self.merge, [self.inputs, *self.merge_rank.components, self.output, self.precision,
                                    self.overwrite, self.semantics, self.same_to_strength], [self.report, self.listing])
        self.preview_run.click(self.preview, [self.inputs, self.merge_rank.rank, self.preview_prompt,
                                              self.preview_seeds, self.preview_steps, self.preview_threshold],
                               [self.preview_image, self.preview_report])

    def merge(self, text, mode, rank, conv_rank, energy, output, precision, overwrite, semantics=loras.SEMANTICS[0],
              same_to_strength=False):
        try:
            supermerger = loras.supermerger_mode(semantics, rank, same_to_strength)
            policy = rank_policy(mode, rank, conv_rank, energy) if supermerger is None else RankPolicy()
            report = loras.merge_into_folder(text, policy, output, precision, overwrite, self.services.lora_dir,
                                             self.services.lora_written, library=self.services.library,
                                             supermerger=supermerger)
        except USER_ERRORS as e:
            return f"error: {e}", gr.update()
        return report, self._listing("")

    def preview(self, text, rank, prompt, seeds, steps, threshold):
        try:
            handle = self.services.loaded_model()
            size = self.services.form_start.get("resolution") or (1024 if handle.arch == "sdxl" else 512)
            return loras.preview_in_folder(handle, text, rank, prompt, seeds, steps, threshold,
                                           self.services.library, int(size))
        except USER_ERRORS as e:
            return None, f"error: {e}"

    # -- resize ------------------------------------------------------------------------------------------------

    def _resize_section(self) -> None:
        self.resize_input = gr.Textbox(label="LoRA to resize (a name from the list or a path)", max_lines=1,
                                       elem_id="loraq_resize_input")
        with gr.Row():
            self.resize_rank = RankControls("loraq_resize", concat=False, rank=4)
        output, dtype, overwrite = _output_row("loraq_resize", "resized")
        run = gr.Button("Resize", variant="primary", elem_id="loraq_resize_run")
        self.resize_report = _report("loraq_resize")
        run.click(self.resize, [self.resize_input, *self.resize_rank.components, output, dtype, overwrite],
                  [self.resize_report, self.listing])

    def resize(self, source, mode, rank, conv_rank, energy, output, precision, overwrite):
        try:
            report = loras.resize_into_folder(source, rank_policy(mode, rank, conv_rank, energy), output, precision,
                                              overwrite, self.services.lora_dir, self.services.lora_written,
                                              library=self.services.library)
        except USER_ERRORS as e:
            return f"error: {e}", gr.update()
        return report, self._listing("")

    # -- extract -----------------------------------------------------------------------------------------------

    def _extract_section(self) -> None:
        gr.Markdown("A LoRA (LoCon for 3x3 convolutions) from the difference of two checkpoints of one "
                    "architecture: tuned - base. The base is the loaded checkpoint unless you name another.")
        with gr.Row():
            tuned = gr.Textbox(label="tuned checkpoint (path)", max_lines=1, elem_id="loraq_extract_tuned")
            self.extract_base = gr.Textbox("", label="base checkpoint (path)", placeholder=LOADED, max_lines=1,
                                           elem_id="loraq_extract_base")
        with gr.Row():
            controls = RankControls("loraq_extract", concat=False)
            text_encoder = gr.Checkbox(True, label="text encoders too", elem_id="loraq_extract_te")
        output, dtype, overwrite = _output_row("loraq_extract", "extracted")
        run = gr.Button("Extract", variant="primary", elem_id="loraq_extract_run")
        report = _report("loraq_extract")
        run.click(self.extract, [tuned, self.extract_base, *controls.components, text_encoder, output, dtype,
                                 overwrite], [report, self.listing])

    def extract(self, tuned, base, mode, rank, conv_rank, energy, text_encoder, output, precision, overwrite):
        try:
            report = loras.extract_into_folder(tuned, self._base(base),
                                               rank_policy(mode, rank, conv_rank, energy), output, precision,
                                               overwrite, self.services.lora_dir, self.services.lora_written,
                                               roots=self._roots(), text_encoder=bool(text_encoder))
        except USER_ERRORS as e:
            return f"error: {e}", gr.update()
        return report, self._listing("")

    # -- bake --------------------------------------------------------------------------------------------------

    def _bake_section(self) -> None:
        gr.Markdown("LoRAs at their ratios (and block weights) merged into a checkpoint, saved as a new "
                    f"single-file checkpoint in `{self.services.checkpoint_dir}`. The base is the loaded "
                    "checkpoint unless you name another.")
        self.bake_base = gr.Textbox("", label="base checkpoint (path)", placeholder=LOADED, max_lines=1,
                                    elem_id="loraq_bake_base")
        self.bake_inputs = gr.Textbox(label="LoRAs to bake in (name:ratio[:blocks], one per line)", lines=4,
                                      elem_id="loraq_bake_inputs", placeholder="style_a:0.6\nstyle_b:0.3:OUTD")
        output, _, overwrite = _output_row("loraq_bake", "baked", precision=False)
        run = gr.Button("Bake", variant="primary", elem_id="loraq_bake_run")
        report = _report("loraq_bake")
        run.click(self.bake, [self.bake_base, self.bake_inputs, output, overwrite], [report])

    def bake(self, base, text, output, overwrite):
        try:
            return loras.bake_into_folder(self._base(base), text, output, overwrite,
                                          self.services.checkpoint_dir, library=self.services.library,
                                          roots=self._roots())
        except USER_ERRORS as e:
            return f"error: {e}"

    def _base(self, text: str | None) -> str:
        """The named base, else the loaded checkpoint (read at the click: the WebUI's choice may have changed)."""
        if (text or "").strip():
            return text.strip()
        loaded = self.services.base_checkpoint()
        if not loaded:
            raise MergeError(f"base checkpoint: name one — the loaded model ({self.services.model_label or 'none'}) "
                             "is not a single-file checkpoint")
        return loaded

    def _roots(self):
        roots = self.services.input_roots
        return None if roots is None else tuple(dict.fromkeys((*roots, self.services.data_dir)))
