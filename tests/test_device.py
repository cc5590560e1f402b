"""The C heap of our own processes keeps what a step frees (trainer.device.keep_freed_heap_for_reuse)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from trainer.cli import build_parser

# A frozen 1280-channel 3x3 convolution (SDXL's and SD1.5's widest): CPU torch copies its 56 MB weight into a
# fresh buffer at every call. The child reports the page faults of its third call, in MB.
CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "keep":
        from trainer.device import keep_freed_heap_for_reuse
        keep_freed_heap_for_reuse()
    conv = torch.nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 1280, 16, 16)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.no_grad():
            conv(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"mb": faults[-1] * resource.getpagesize() / 2**20,
                      "weight_mb": conv.weight.numel() * 4 / 2**20}))
""")


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_a_convolution_s_weight_buffer_is_reused_not_faulted_in_again_at_each_call():
    default, kept = _faults("default"), _faults("keep")
    if default["mb"] < default["weight_mb"] / 2:
        pytest.skip(f"this torch/libc reuses the buffer by itself ({default['mb']:.1f} MB faulted a call)")
    # by default each call faults the weight's copy in afresh; kept, the heap serves it again
    assert default["mb"] >= 0.9 * default["weight_mb"], default
    assert kept["mb"] < 0.1 * kept["weight_mb"], f"{kept['mb']:.1f} MB of fresh pages in the third call"


@pytest.mark.parametrize("argv, trains", [
    (["train", "job.json"], True), (["queue", "run"], True), (["ui"], True), (["demo"], True),
    (["morning", "1"], True), (["queue", "list"], False), (["template", "standard"], False),
    (["merge", "--out", "m.safetensors", "a.safetensors"], False)])
def test_the_commands_that_train_or_sample_and_only_they_keep_the_heap(argv, trains):
    assert bool(getattr(build_parser().parse_args(argv), "trains", False)) is trains
