"""Merge panel: pick LoRAs from the LoRA folder, choose the rank policy, merge, read the report."""
from __future__ import annotations


import gradio as gr

from trainer.jobs.vocabulary import SAVE_PRECISIONS
from trainer.merge.svd_merge import MergeError, RankPolicy, builtin_presets
from trainer.ui import loras
from trainer.ui.services import UiServices

RANK_MODES = ("rank", "auto", "concat")



def rank_policy(mode: str, rank, conv_rank, energy) -> RankPolicy:
    """The policy the panel's controls describe; conv rank 0 = same as rank."""
    as_int = lambda v: int(v) if v not in (None, "") and float(v).is_integer() else v
    conv = as_int(conv_rank) or None
    if mode == "concat":
        return RankPolicy(rank=None, conv_rank=None, concat=True)
    if mode == "auto":
        return RankPolicy(rank=as_int(rank) or None, conv_rank=conv, energy=float(energy))
    return RankPolicy(rank=as_int(rank), conv_rank=conv)


class MergePanel:
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
                gr.Markdown(f"LoRAs in `{folder}` — click one to add `name:1.0` to the merge. Merges are written "
                            f"to `{services.lora_dir}`. Blocks (`name:ratio:BLOCKS`): a preset — "
                            + ", ".join(f"`{p}`" for p in builtin_presets("sd1")) + " — or 17 / 26 weights "
                            "(SD1/SD2), 12 / 20 (SDXL), in LoRA Block Weight's order.")
            with gr.Column(scale=3):
                self.inputs = gr.Textbox(label="LoRAs to merge (name:ratio[:blocks], one per line)", lines=5,
                                         elem_id="loraq_merge_inputs",
                                         placeholder="style_a:1.0\nstyle_b:0.5:OUTD")
                with gr.Row():
                    self.mode = gr.Radio(list(RANK_MODES), value="rank", label="target rank", elem_id="loraq_merge_mode",
                                         info="rank: fixed; auto: smallest rank keeping the energy fraction "
                                              "(rank caps it); concat: lossless, rank = sum of the inputs")
                    self.rank = gr.Number(8, label="rank", precision=0, elem_id="loraq_merge_rank")
                    self.conv_rank = gr.Number(0, label="conv rank (0 = as rank)", precision=0,
                                               elem_id="loraq_merge_conv_rank")
                    self.energy = gr.Number(0.99, label="auto: energy kept", elem_id="loraq_merge_energy")
                with gr.Row():
                    self.semantics = gr.Dropdown(list(loras.SEMANTICS), value=loras.SEMANTICS[0], label="ratio semantics",
                                                 elem_id="loraq_merge_semantics",
                                                 info="ours: 0.5 halves a LoRA, -1 subtracts; SuperMerger's: a "
                                                      "ratio acts squared with cross terms between LoRAs "
                                                      "(docs/merge-semantics.md)")
                    self.same_to_strength = gr.Checkbox(False, label="SuperMerger: same to Strength",
                                                        elem_id="loraq_merge_same_to_strength")
                with gr.Row():
                    self.output = gr.Textbox(label="output name", value="merged", elem_id="loraq_merge_output",
                                             max_lines=1)
                    self.precision = gr.Dropdown(list(SAVE_PRECISIONS), value="fp16", label="save precision",
                                                 elem_id="loraq_merge_dtype")
                    self.overwrite = gr.Checkbox(False, label="overwrite", elem_id="loraq_merge_overwrite")
                self.run = gr.Button("Merge", variant="primary", elem_id="loraq_merge_run")
                self.report = gr.Textbox(label="report", lines=12, interactive=False, elem_id="loraq_merge_report",
                                         elem_classes=["loraq-mono"])
        listing = self._listing
        self.filter.change(listing, [self.filter], [self.listing], show_progress=False)
        self.refresh.click(listing, [self.filter], [self.listing], show_progress=False)
        self.run.click(self.merge, [self.inputs, self.mode, self.rank, self.conv_rank, self.energy, self.output,
                                    self.precision, self.overwrite, self.semantics, self.same_to_strength],
                       [self.report, self.listing])

    def _listing(self, text: str | None) -> str:
        library = self.services.library
        return loras.lora_list_html(loras.list_loras(library, text or ""), library)

    def merge(self, text, mode, rank, conv_rank, energy, output, precision, overwrite, semantics=loras.SEMANTICS[0],
              same_to_strength=False):
        try:
            supermerger = loras.supermerger_mode(semantics, rank, same_to_strength)
            policy = rank_policy(mode, rank, conv_rank, energy) if supermerger is None else RankPolicy()
            report = loras.merge_into_folder(text, policy, output, precision,
                                             overwrite, self.services.lora_dir, self.services.lora_written,
                                             library=self.services.library, supermerger=supermerger)
        except (MergeError, ValueError, OSError) as e:
            return f"error: {e}", gr.update()
        return report, self._listing("")
