"""``python -m trainer COMMAND``: the command line of LoRA Queue (see :mod:`trainer.cli`)."""
import os
import sys

# Transparent huge pages for torch's CPU tensors of 2 MB and more (torch reads this once, at its first allocation,
# so before anything imports it). A CPU training step allocates its activations afresh each step: with 4 KB pages
# that is ~600 k page faults a step on SD1.5 at 256 px, with 2 MB pages ~20 k, and the UNet's forward + backward
# runs ~17 % faster (bench/unet_compare.py, bench/README.md). No effect on CUDA memory. A user's own setting
# (THP_MEM_ALLOC_ENABLE=0) is kept. Not for the standalone tab (``ui``): its sessions were not measured with them, and
# the two browser sessions that stalled on a gradio 3.41 upload (2026-12-03) both ran with them on.
if sys.argv[1:2] != ["ui"]:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
