"""Every command in the README runs here as a user types it: ``python -m trainer ...`` in a shell, in a
fresh folder, with a small real call each (the job file is edited as the README says, the demo model
trains, the merge merges what was trained). A command added to the README without a case fails here.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
GRADIO_PYTHON = ROOT / ".venv-gradio4" / "bin" / "python"


def readme_commands() -> list[str]:
    """The ``python -m trainer`` commands of the README's bash blocks, comments removed, ``&&`` split."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip().startswith("python -m trainer")]
    return commands


def shell(command: str, cwd: Path, python: str = sys.executable, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in bash with ``python`` on PATH being ``python`` (the interpreter the user has)."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    use_python(bin_dir, python)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "LORAQ_HOME": str(cwd / "home")}   # no HF_HUB_OFFLINE: the commands must not need it
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def use_python(bin_dir: Path, python: str | Path) -> None:
    """``python`` on PATH runs ``python`` (a wrapper, not a symlink: a venv is found from the path called)."""
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    wrapper.chmod(0o755)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def edit_job(path: Path, dataset: Path, **changes) -> None:
    """What the README asks of the user: point the template at their images (and keep it small here)."""
    job = json.loads(path.read_text())
    job.update(dataset_dir=str(dataset), resolution=64, min_bucket_reso=64, max_bucket_reso=128, steps=4,
               save_precision="fp32", **changes)
    path.write_text(json.dumps(job))


def free_port() -> int:
    """A port the OS picks: 7860 itself may be taken by a WebUI or bound by another test worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_lists_the_two_fresh_machine_commands_first():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("./dev demo")
    assert first_block.splitlines()[1].startswith("./dev test")


def test_every_readme_command_runs_as_typed(tmp_path):
    from trainer.cli.demo import draw_dataset

    commands = readme_commands()
    draw_dataset(tmp_path / "images", n=2)
    done = []

    def run(command: str, **kw) -> subprocess.CompletedProcess:
        assert command in commands, f"the README no longer has: {command}"
        done.append(command)
        started = time.perf_counter()
        result = ok(shell(command, tmp_path, **kw))
        print(f"{time.perf_counter() - started:6.1f} s  {command}")
        return result

    run("python -m trainer template standard > job.json")
    edit_job(tmp_path / "job.json", tmp_path / "images", name="a")
    printed = run("python -m trainer train job.json --model demo").stdout.split()
    first = Path(printed[-1])
    assert first.name == "a.safetensors" and len(load_file(first)) > 0
    job = json.loads((tmp_path / "job.json").read_text())
    (tmp_path / "job.json").write_text(json.dumps({**job, "name": "b", "save_every_n_steps": 2}))
    second = Path(run("python -m trainer train job.json --model demo --resume").stdout.split()[-1])
    budget = run("python -m trainer budget job.json --arch sdxl --free-gib 8").stdout
    assert re.search(r"peak: \d+\.\d\d GiB", budget) and "fits in 8 GiB" in budget, budget
    for trained, name in ((first, "a"), (second, "b")):
        (tmp_path / f"{name}.safetensors").write_bytes(trained.read_bytes())

    merged = run("python -m trainer merge --out merged.safetensors --rank 8 a.safetensors:0.6 b.safetensors:0.4:OUTD")
    assert "energy kept" in merged.stdout
    assert load_file(tmp_path / "merged.safetensors")
    resized = run("python -m trainer resize --out small.safetensors --rank 2 merged.safetensors")
    assert "resized merged.safetensors" in resized.stdout
    small = load_file(tmp_path / "small.safetensors")
    assert small and all(t.shape[0] <= 2 for k, t in small.items() if k.endswith("lora_down.weight"))

    (tmp_path / "job.json").write_text(json.dumps({**job, "name": "queued"}))
    run("python -m trainer queue add job.json")
    ran = run("python -m trainer queue run --until-empty --model demo")
    assert "done" in ran.stderr
    listing = run("python -m trainer queue list").stdout
    assert re.search(r"\bdone\b.*\bqueued\b", listing), listing
    again = run("python -m trainer queue run --resume-interrupted --until-empty --model demo")
    assert again.returncode == 0
    sheet = Path(run("python -m trainer morning 1 --model demo", timeout=600).stdout.split()[-1])
    assert sheet.name == "queued.morning.png" and sheet.stat().st_size > 10_000

    demo = run("python -m trainer demo --out demo-output", timeout=600)
    assert (tmp_path / "demo-output" / "demo_square_grid.png").is_file(), demo.stdout

    ui = "python -m trainer ui --model demo --port 7860"
    assert ui in commands
    done.append(ui)
    assert GRADIO_PYTHON.is_file(), "run ./dev setup: the ui command needs the gradio environment"
    use_python(tmp_path / ".bin", GRADIO_PYTHON)
    port = free_port()   # the command as typed, with 7860 replaced by a free port
    server = subprocess.Popen(["bash", "-c", ui.replace("7860", str(port))], cwd=tmp_path,
                              env={**os.environ, "PATH": f"{tmp_path / '.bin'}{os.pathsep}{os.environ['PATH']}",
                                   "PYTHONPATH": str(ROOT), "LORAQ_HOME": str(tmp_path / "home")}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        page = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, server.stdout.read().decode() if server.poll() is not None else "no answer in 120 s"
        assert "LoRA Queue" in page or "gradio" in page.lower()
    finally:
        server.terminate()
        server.wait(30)
    assert sorted(set(done)) == sorted(set(commands)), "a README command has no case in this test"
