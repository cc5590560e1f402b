"""Messages for ordinary mistakes name the cause and the fix (no traceback, no misleading blame)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer import jobs
from trainer.merge.svd_merge import MergeError, parse_input_spec
from trainer.models.demo.shapes import draw

ROOT = Path(__file__).resolve().parents[1]
KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAQ_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("spec,expected", [("a.safetensors:abc", "'abc' is not a number"),
                                           ("a.safetensors:abc:OUTD", "'abc' is not a number"),
                                           ("a.safetensors:nan", "not a finite number"),
                                           ("a.safetensors:inf:OUTD", "not a finite number")])
def test_a_merge_ratio_that_is_not_a_number_is_reported_as_such_not_as_a_missing_file(spec, expected):
    with pytest.raises(MergeError, match=expected):
        parse_input_spec(spec)
    assert parse_input_spec("a.safetensors:0.5:OUTD").ratio == 0.5
    assert parse_input_spec("C:\\loras\\a.safetensors").path == "C:\\loras\\a.safetensors"


@pytest.mark.parametrize("case", ["nan", "zero_rank"])
def test_merging_a_damaged_lora_names_the_file_and_the_module(tmp_path, case):
    good = {f"{KEY}.lora_down.weight": torch.randn(4, 64), f"{KEY}.lora_up.weight": torch.randn(320, 4),
            f"{KEY}.alpha": torch.tensor(4.0)}
    bad = dict(good)
    if case == "nan":
        bad[f"{KEY}.lora_down.weight"] = torch.full((4, 64), float("nan"))
    else:
        bad = {f"{KEY}.lora_down.weight": torch.zeros(0, 64), f"{KEY}.lora_up.weight": torch.zeros(320, 0),
               f"{KEY}.alpha": torch.tensor(1.0)}
    save_file(good, str(tmp_path / "good.safetensors"))
    save_file(bad, str(tmp_path / "bad.safetensors"))
    run = _cli(tmp_path, "merge", "--out", "m.safetensors", "--rank", "2", "good.safetensors:0.5", "bad.safetensors:0.5")
    assert run.returncode != 0
    assert "bad.safetensors" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert ("NaN or infinite" if case == "nan" else "rank 0") in run.stderr, run.stderr
    assert "LinAlg" not in run.stderr and "ZeroDivision" not in run.stderr


def test_a_job_file_that_is_not_utf8_or_repeats_a_key_is_refused_clearly(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"mode": "standard", "name": "café"}'.encode("latin-1"))
    run = _cli(tmp_path, "queue", "add", "latin1.json")
    assert run.returncode == 2 and "not UTF-8" in run.stderr and "Traceback" not in run.stderr, run.stderr
    (tmp_path / "twice.json").write_text('{"mode": "standard", "lr": 0.001, "lr": 0.1}')
    run = _cli(tmp_path, "queue", "add", "twice.json")
    assert run.returncode == 2 and "'lr' is given twice" in run.stderr, run.stderr


def test_a_300_character_output_folder_is_refused_with_a_message(tmp_path):
    with pytest.raises(jobs.JobError) as e:
        jobs.StandardJob(name="t", output_dir="x" * 300)
    assert "too long" in e.value.errors["output_dir"]
    (tmp_path / "long.json").write_text(json.dumps({"mode": "standard", "dataset_dir": "d" * 300}))
    run = _cli(tmp_path, "queue", "add", "long.json")
    assert run.returncode == 2 and "dataset_dir" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_full_disk_at_a_save_names_the_file_the_free_space_and_the_last_good_save(tmp_path, monkeypatch):
    from test_queue import _dataset, _job, micro_pipeline

    from trainer.lora.network import LoraNetwork
    from trainer.models.diffusers_model import DiffusersHandle
    from trainer.train.context import JobContext
    from trainer.train.loop import TrainingError
    from trainer.train.runner import run_job

    handle = DiffusersHandle(micro_pipeline(tmp_path))
    _dataset(tmp_path / "data", n=1)
    real_save, saves = LoraNetwork.save, []

    def save(self, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, path, *args, **kwargs)
    monkeypatch.setattr(LoraNetwork, "save", save)
    with pytest.raises(TrainingError) as e:
        run_job(_job(tmp_path, steps=6, save_every_n_steps=2), handle,
                JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None))
    message = str(e.value)
    assert str(saves[1]) in message and "No space left on device" in message and "MB free" in message, message
    assert f"the last good save is {saves[0]} (step 2)" in message, message
    assert "resume" in message
