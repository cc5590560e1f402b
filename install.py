"""WebUI installer hook (A1111 / Forge run it at start-up): install only what the WebUI lacks.

The WebUI owns its environment and pins torch, transformers, gradio and huggingface_hub. Everything
we add is pure Python and installed with --no-deps, so no pinned package ever moves.
"""
import importlib.util

import launch  # provided by the WebUI

# import name -> pip requirement (all pure Python)
NEEDED = {
    "lion_pytorch": "lion-pytorch",
    "prodigyopt": "prodigyopt",
    "open_clip": "open-clip-torch",  # only its CLIP vocabulary file is read; never imported
}

for module, requirement in NEEDED.items():
    if importlib.util.find_spec(module) is None:
        launch.run_pip(f"install --no-deps {requirement}", f"{requirement} for LoRA Queue")
