"""WebUI entry point (AUTOMATIC1111 1.10, Forge): the tab, the worker, the x/y/z axes and settings.

Thin on purpose: this file only fetches the WebUI's objects and hands them to trainer/ (host.webui,
ui.app, host.xyz_axes), where every decision lives and is tested.
"""
import sys
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parents[1]
if str(EXTENSION_DIR) not in sys.path:
    sys.path.insert(0, str(EXTENSION_DIR))

from modules import call_queue, script_callbacks, scripts, shared  # noqa: E402  (the WebUI's)

from trainer.host import xyz_axes
from trainer.host.webui import WebUIHost

SECTION = ("lora_queue", "LoRA Queue")
_host = None


def _lora_dir() -> Path:
    return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(shared.models_path) / "Lora")


def _refresh_loras() -> None:
    try:
        import networks  # A1111's / Forge's built-in Lora extension
        networks.list_available_networks()
    except Exception as e:  # the list refreshes on the next start anyway
        print(f"LoRA Queue: could not refresh the LoRA list ({e})", file=sys.stderr)


def _forge_load_model_gpu():
    """Forge's model placement (None on A1111): a training step loads the UNet as sampling does."""
    try:
        from backend import memory_management
    except ImportError:
        return None
    return memory_management.load_model_gpu


def _forge_model_reload():
    """Forge's model loading (None on A1111): a job queued before the first generation loads the model."""
    try:
        from modules.sd_models import forge_model_reload
    except ImportError:
        return None
    return forge_model_reload


def _model_checkpoint():
    """The checkpoint info of the model the WebUI has actually loaded; None for none or Forge's placeholder.

    Not the ``sd_model_checkpoint`` option: Forge resets that option when a page load refreshes the checkpoint
    list, without loading anything, so the option and the loaded model can disagree."""
    return getattr(shared.sd_model, "sd_checkpoint_info", None)


def _loaded_checkpoint() -> str:
    """The title of the checkpoint the WebUI has loaded (Forge before its first generation: the one chosen)."""
    info = _model_checkpoint()
    return getattr(info, "title", "") or shared.opts.data.get("sd_model_checkpoint", "") or ""


def _switch_checkpoint(name: str):
    """Load checkpoint ``name`` through the WebUI's own model loading; (from, to) titles, or None when the
    WebUI's choice did not change (it was loaded already, or Forge only had to load the chosen one)."""
    from modules import sd_models

    from trainer.models.handle import ModelError

    wanted = sd_models.get_closet_checkpoint_match(name)
    if wanted is None:
        raise ModelError(f"the job's checkpoint {name!r} is not among the WebUI's checkpoints: put it in the "
                         "models folder and refresh the list, or edit the job's base model")
    loaded = _model_checkpoint()
    if loaded is not None and loaded.filename == wanted.filename:
        return None
    chosen = shared.opts.data.get("sd_model_checkpoint", "") or ""
    reload = _forge_model_reload()
    if reload is not None:
        # Forge: checkpoint_change only refreshes the loading parameters when the option changes; the option may
        # already name the wanted checkpoint while another is loaded, so refresh them then too, and load.
        from modules_forge import main_entry

        if not main_entry.checkpoint_change(wanted.title, save=False):
            main_entry.refresh_model_loading_parameters()
        with call_queue.queue_lock:
            reload()
    elif not shared.opts.set("sd_model_checkpoint", wanted.title):
        # A1111: the option's onchange reloads (under the queue lock) only when the option changes; it already
        # named the wanted checkpoint while another is loaded, so load that one the way the onchange would.
        with call_queue.queue_lock:
            sd_models.reload_model_weights(info=wanted)
    now = _model_checkpoint()
    if now is None or now.filename != wanted.filename:
        raise ModelError(f"the WebUI did not load the job's checkpoint {wanted.title}: "
                         f"{getattr(now, 'title', 'no model')} is loaded (the WebUI's console says why); choose "
                         "it at the top of the page and resume the job")
    if loaded is None:
        was = sd_models.get_closet_checkpoint_match(chosen) if chosen else None
        if was is None or was.filename == wanted.filename:
            return None                      # Forge loaded the checkpoint already chosen: nothing was switched
        return chosen, wanted.title
    return loaded.title, wanted.title


def host() -> WebUIHost:
    global _host
    if _host is None:
        data = shared.opts.data.get("loraq_data_dir") or str(EXTENSION_DIR / "data")
        _host = WebUIHost(get_sd_model=lambda: shared.sd_model, queue_lock=call_queue.queue_lock,
                          lora_dir=_lora_dir(), data_dir=Path(data), refresh_loras=_refresh_loras,
                          output_subdir=shared.opts.data.get("loraq_output_subdir", "lora_queue"),
                          forge_load_model_gpu=_forge_load_model_gpu(), load_model=_forge_model_reload(),
                          resume_interrupted=bool(shared.opts.data.get("loraq_resume_interrupted", False)),
                          input_roots=_input_roots(Path(data)), switch_checkpoint=_switch_checkpoint,
                          loaded_checkpoint=_loaded_checkpoint)
    return _host


def _input_roots(data_dir: Path) -> tuple[Path, ...]:
    """Folders jobs queued from the tab may read: the WebUI's models folder, our data folder (uploads) and
    the ones the settings add. A WebUI run with --listen or --share must not read any file for anyone."""
    extra = shared.opts.data.get("loraq_allowed_input_dirs", "") or ""
    folders = [Path(line.strip()).expanduser() for line in extra.replace(";", "\n").splitlines() if line.strip()]
    return (Path(shared.models_path), data_dir, *folders)


def on_ui_tabs():
    from trainer.ui.app import build_ui

    blocks = build_ui(host().services())
    return [(blocks, "LoRA Queue", "loraq")]


def on_ui_settings():
    shared.opts.add_option("loraq_data_dir", shared.OptionInfo(
        "", "LoRA Queue data folder (queue, presets, caches); empty = the extension's data folder",
        section=SECTION).needs_reload_ui())
    shared.opts.add_option("loraq_output_subdir", shared.OptionInfo(
        "lora_queue", "Folder inside the LoRA folder where trained LoRAs go", section=SECTION).needs_reload_ui())
    shared.opts.add_option("loraq_allowed_input_dirs", shared.OptionInfo(
        "", "Folders jobs may read datasets, images, prompt files and LoRAs from, besides the models folder and "
        "the data folder (one per line or separated by ;)", section=SECTION))
    shared.opts.add_option("loraq_resume_interrupted", shared.OptionInfo(
        False, "When the WebUI starts, resume jobs that a crash or restart interrupted (from their last save)",
        section=SECTION))


def on_app_started(demo, app):
    host().start()  # idempotent: a UI reload does not start a second worker


def _register_lcm_samplers():
    try:
        from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion

        from trainer.sampling.webui_samplers import register_webui_samplers
        register_webui_samplers(sd_samplers, sd_samplers_common, sd_samplers_kdiffusion)
    except Exception as e:  # a sampler list we cannot extend must not take the tab down
        print(f"LoRA Queue: LCM samplers not registered ({e})", file=sys.stderr)


def on_before_ui():
    _register_lcm_samplers()
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            xyz_axes.register(data.module, lambda: host().list_loras())
            return


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_before_ui(on_before_ui)
