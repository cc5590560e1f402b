"""The command line's shape: one registry, every subcommand runnable, and the commands that do not
train start without torch (``queue list`` answers in well under half a second)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], home: Path, check_torch: bool = True) -> subprocess.CompletedProcess:
    """``python -m trainer ARGS``; with ``check_torch`` it also reports whether torch was imported."""
    probe = ("import runpy, sys, atexit\n"
             "atexit.register(lambda: sys.stderr.write('\\nTORCH-LOADED\\n' if 'torch' in sys.modules else ''))\n"
             "sys.argv = ['trainer'] + sys.argv[1:]\n"
             "runpy.run_module('trainer', run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAQ_HOME": str(home)}
    command = [sys.executable, "-c", probe, *args] if check_torch else [sys.executable, "-m", "trainer", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=home, timeout=120)


def test_every_registered_command_has_a_function_to_run():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name, command in sub.choices.items():
        assert command.get_default("func") is not None, f"`{name}` registers no function (the old merge crash)"


@pytest.mark.parametrize("args", [
    ["--help"], *[[name, "--help"] for name in COMMANDS], ["template", "lcm"], ["template", "copier", "--schema"],
    ["queue", "list"], ["queue", "add", "job.json"], ["queue", "show", "1"], ["queue", "cancel", "1"],
], ids=" ".join)
def test_commands_that_do_not_train_import_no_torch(args, tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"mode": "lcm", "prompts": ["a red circle"]}))
    if args[:2] in (["queue", "show"], ["queue", "cancel"]):
        assert run_cli(["queue", "add", "job.json"], tmp_path).returncode == 0   # job 1 exists
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "TORCH-LOADED" not in result.stderr, f"`{' '.join(args)}` imported torch"


def test_queue_list_answers_in_half_a_second(tmp_path):
    for _ in range(2):   # the first run may compile bytecode
        started = time.perf_counter()
        result = run_cli(["queue", "list"], tmp_path, check_torch=False)
        elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 0.5, f"queue list took {elapsed:.2f} s"


_THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_MODE = _THP_MODE_FILE.read_text() if _THP_MODE_FILE.is_file() else "[never]"
HUGE_PAGES_OF_A_TENSOR = """
import runpy, sys
sys.argv = ['trainer'] + sys.argv[1:]
runpy.run_module('trainer', run_name='trainer_cli_probe')      # what `python -m trainer ARGS` runs before main()
import torch
t = torch.empty(64 << 20, dtype=torch.uint8)
t.fill_(1)
address, huge, inside = t.data_ptr(), 0, False
for line in open('/proc/self/smaps'):
    head = line.split()[0]
    if '-' in head and ':' not in head:
        low, high = (int(x, 16) for x in head.split('-'))
        inside = low <= address < high
    elif inside and head == 'AnonHugePages:':
        huge = int(line.split()[1])
print(huge)
"""


@pytest.mark.skipif("[never]" in THP_MODE, reason="the kernel has transparent huge pages off: nothing to ask for")
def test_the_command_line_gives_torch_tensors_huge_pages_unless_the_user_said_no(tmp_path):
    """A CPU step allocates its activations afresh: on 4 KB pages SD1.5 at 256 px faults ~600 k pages a step and runs
    ~17 % slower than on 2 MB pages (bench/README.md). The CLI asks torch for huge pages, except for the standalone
    tab (``ui``); THP_MEM_ALLOC_ENABLE=0 wins."""
    def huge_kib(*args: str, **env) -> int:
        base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        run = subprocess.run([sys.executable, "-c", HUGE_PAGES_OF_A_TENSOR, *args], capture_output=True, text=True,
                             env={**base, "PYTHONPATH": str(ROOT), **env}, cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    assert huge_kib("train", "job.json") >= 32 << 10, "a 64 MB tensor of the CLI's process got (almost) no huge pages"
    if "[madvise]" in THP_MODE:     # with [always] the kernel gives them to every process anyway
        assert huge_kib("train", "job.json", THP_MEM_ALLOC_ENABLE="0") == 0
        assert huge_kib("ui", "--model", "demo") == 0
