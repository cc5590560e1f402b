"""Our standard mode against kohya sd-scripts' ``train_network.py``, side by side, at equal settings.

Both sides train a LoRA on the same random-weight full-size SD1.5 single-file checkpoint (or, with ``--arch sdxl``,
SDXL's, stored in fp16 and trained in fp32 by both, kohya's ``sdxl_train_network.py`` with its text-encoder outputs
cached as we cache ours), the same 4 images
at 256 px with captions (a kohya ``1_subject`` folder), with rank 16 / alpha 8 on the UNet's attention and
MLP (kohya's default LoRA), AdamW at a constant 1e-4, batch 1, fp32, latents cached, one thread, kohya with
``--sdpa``; gradient checkpointing off and on. Each run is its own process, started from the command line
as a user would, runs alternate (ours, kohya, ours, kohya, ...), and for each we record:

- the steady step time: the spacing of the optimizer's steps (``torch.optim.AdamW.step`` stamped by a
  ``sitecustomize`` on both sides), median of the steps after the first two;
- the peak RSS of the process (``os.wait4``);
- the time from the command to the end of the first step.

kohya is never committed: its sources are taken from a git snapshot (``--sd-scripts-git``, e.g. the one
``fetch github:kohya-ss/sd-scripts`` leaves, or a clone) into a temporary folder, and the packages it pins
that differ from ours are pip-installed (``--no-deps``) into a temporary folder put first on its
``PYTHONPATH``: our virtualenv's packages never move. torchvision's PyPI wheel needs the CUDA torch, so
kohya gets a stand-in for the three transforms it uses on this path (ToTensor, Normalize, Compose).

    flock /tmp/loraq-heavy.lock python bench/kohya_compare.py [--steps 8] [--rounds 2] [--checkpointing off,on]
    python bench/kohya_compare.py --arch sdxl --steps 6 --rounds 1 --checkpointing on   # the machine alone
    python bench/kohya_compare.py --profile on     # torch.profiler of one steady step on each side, per op
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from heavy_lock import DEFAULT as LOCK_FILE, HeavyLock  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/kohya-ss+sd-scripts/repo")
#: What train_network.py imports on the SD1.5 path that our venv has at another version (kohya's pins).
KOHYA_PINS = ["transformers==4.54.1", "tokenizers>=0.21,<0.22", "diffusers==0.32.1", "huggingface-hub==0.34.3",
              "accelerate==1.6.0", "toml==0.10.2", "voluptuous==0.15.2", "imagesize==1.4.1",
              "opencv-python-headless==4.10.0.84"]

TORCHVISION_STANDIN = '''"""Stand-in for the torchvision transforms kohya's train_util uses (the PyPI wheel needs CUDA torch)."""
'''
TRANSFORMS_STANDIN = '''import numpy as np
import torch


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    def __call__(self, image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x):
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


class functional:
    @staticmethod
    def pil_to_tensor(image):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))
'''

# Loaded by both sides (PYTHONPATH): stamps each optimizer step; optionally profiles one step.
SITECUSTOMIZE = '''import os, resource, time
_stamps = os.environ.get("BENCH_STAMPS")
if _stamps:
    import torch
    torch.set_num_threads(1)
    _original = torch.optim.AdamW.step
    _profile_at = int(os.environ.get("BENCH_PROFILE_STEP", "0"))
    _state = {"n": 0, "prof": None}

    def _step(self, *args, **kwargs):
        out = _original(self, *args, **kwargs)
        _state["n"] += 1
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(_stamps, "a") as f:   # wall, user and system CPU seconds, minor page faults so far
            f.write(f"{time.time()} {usage.ru_utime} {usage.ru_stime} {usage.ru_minflt}\\n")
        if _profile_at and _state["n"] == _profile_at:
            from torch.profiler import ProfilerActivity, profile
            _state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            _state["prof"].__enter__()
        elif _profile_at and _state["n"] == _profile_at + 1 and _state["prof"] is not None:
            prof = _state["prof"]
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            with open(os.environ["BENCH_PROFILE_OUT"], "w") as f:
                f.write(table)
        return out

    torch.optim.AdamW.step = _step
'''


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- setup -------------------------------------------------------------------------------------------------

def extract_sd_scripts(git_dir: Path, dest: Path) -> str:
    """kohya's train_network.py, library/ and networks/ from a git snapshot; returns the commit."""
    dest.mkdir(parents=True)
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.Popen(["git", "--git-dir", str(git_dir), "archive", "HEAD", "train_network.py",
                                "sdxl_train_network.py", "library", "networks"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.wait()
    return commit


def install_kohya_packages(site: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(site), *KOHYA_PINS], check=True)
    (site / "torchvision").mkdir()
    (site / "torchvision" / "__init__.py").write_text(TORCHVISION_STANDIN + "from . import transforms\n")
    (site / "torchvision" / "transforms.py").write_text(TRANSFORMS_STANDIN)


def build_checkpoint(path: Path, arch: str = "sd15") -> None:
    """A random-weight full-size checkpoint in the ldm / sgm layout (UNet, VAE, text encoders), seeded.

    SD1.5 in fp32 (4.3 GB); SDXL in fp16 (6.9 GB; built in fp16 so that the 10 GB fp32 UNet never exists here).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(ROOT / "tests"))
    from ldm_convert import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    configs = ROOT / "trainer/models/configs" / arch
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if arch == "sdxl" else torch.float32)
    try:
        state = unet_to_ldm(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")))
        state.update(vae_to_ldm(AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json"))
        if arch == "sdxl":
            state.update(clip_to_ldm(text, "conditioner.embedders.0.transformer."))
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(configs / "text_encoder_2" / "config.json"))
            state.update(open_clip_to_ldm(text_2, "conditioner.embedders.1.model."))
        else:
            state.update(clip_to_ldm(text, "cond_stage_model.transformer."))
    finally:
        torch.set_default_dtype(previous)
    save_streaming({k: v.detach().contiguous() for k, v in state.items()}, path)


def save_streaming(tensors: dict, path: Path) -> None:
    """A safetensors file written tensor by tensor: ``safetensors.torch.save_file`` copies every tensor to
    bytes first, which for SDXL (6.9 GB) doubles the peak of this process."""
    from trainer.merge.tensor_file import header_bytes, tensor_bytes
    from trainer.models.single_file import SAFETENSORS_DTYPES

    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    layout, offset = {}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        layout[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    with open(path, "wb") as f:
        f.write(header_bytes(layout, {}))
        for tensor in tensors.values():
            f.write(tensor_bytes(tensor))


def build_dataset(folder: Path) -> Path:
    """4 images at 256 px with captions, as kohya's ``1_subject`` folder (both sides read the parent)."""
    import numpy as np
    from PIL import Image

    sub = folder / "1_subject"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = ["a red square on a white background", "a blue circle in a garden", "a green triangle at night",
                "a yellow star over the sea"]
    for i, caption in enumerate(captions):
        pixels = (rng.random((256, 256, 3)) * 255).astype("uint8")
        pixels[64:192, 64:192] = [(200, 40, 40), (40, 40, 200), (40, 200, 40), (220, 220, 40)][i]
        Image.fromarray(pixels).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(caption)
    return folder


def write_tokenizer(folder: Path) -> Path:
    """The CLIP tokenizers where kohya's ``--tokenizer_cache_dir`` looks (built offline from open-clip's BPE):
    CLIP-L, and the same vocabulary under SDXL's second name (kohya sets its pad id to 0 itself)."""
    from trainer.models.clip_vocab import write_tokenizer_files

    for name in ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        target = folder / name
        write_tokenizer_files(target)
        (target / "tokenizer_config.json").write_text(json.dumps({
            "model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return folder


# -- runs --------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, steps: int, arch: str = "sd15"):
        self.work, self.steps, self.arch = work, steps, arch
        self.ckpt = work / f"{arch}_random.safetensors"
        self.data = work / "img"
        self.kohya = work / "sd-scripts"
        self.site = work / "kohya-site"
        self.hooks = work / "hooks"
        self.tok = work / "tok"
        self.runs = 0
        #: free memory a run needs before it starts (kohya's SDXL process peaks near 20 GiB with fp32 weights)
        self.need_gib = 20.0 if arch == "sdxl" else 8.0

    def setup(self, git_dir: Path, site: Path | None = None) -> str:
        commit = extract_sd_scripts(git_dir, self.kohya)
        if site:
            self.site = site
        else:
            log(f"sd-scripts {commit[:8]} extracted; installing its pins into {self.site}")
            install_kohya_packages(self.site)
        self.hooks.mkdir()
        (self.hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        build_dataset(self.data)
        write_tokenizer(self.tok)
        if self.ckpt.exists():
            log(f"using {self.ckpt}")
        else:
            log(f"building the random-weight {self.arch} checkpoint at {self.ckpt}")
            # in a child: Linux carries a parent's peak RSS at fork into the child's ru_maxrss, so a parent
            # that held the model (4-7 GB) would floor both sides' measured peaks
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
                    f"from kohya_compare import build_checkpoint; build_checkpoint(Path({str(self.ckpt)!r}), {self.arch!r})")
            subprocess.run([sys.executable, "-c", code], check=True)
        return commit

    def _env(self, stamps: Path, extra_path: list[Path], profile: Path | None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   BENCH_STAMPS=str(stamps), PYTHONPATH=os.pathsep.join(str(p) for p in [self.hooks, *extra_path]))
        if profile:
            env.update(BENCH_PROFILE_STEP=str(self.steps - 2), BENCH_PROFILE_OUT=str(profile))
        return env

    def ours_command(self, checkpointing: bool, run: Path) -> list[str]:
        job = {"mode": "standard", "name": "ours", "dataset_dir": str(self.data), "resolution": 256,
               "enable_buckets": False, "network_dim": 16, "network_alpha": 8.0, "target_set": "attn_mlp",
               "optimizer": "AdamW", "lr": 1e-4, "lr_scheduler": "constant", "batch_size": 1,
               "steps": self.steps, "mixed_precision": "no", "save_precision": "fp32", "overwrite": True,
               "gradient_checkpointing": checkpointing, "max_grad_norm": 1.0, "seed": 42}
        (run / "job.json").write_text(json.dumps(job))
        return [sys.executable, "-m", "trainer", "train", str(run / "job.json"), "--model", str(self.ckpt),
                "--out", str(run / "out")]

    def kohya_command(self, checkpointing: bool, run: Path) -> list[str]:
        script, extra = "train_network.py", []
        if self.arch == "sdxl":     # the text encoders' outputs cached, as ours (SD1.5's script has no such flag)
            script, extra = "sdxl_train_network.py", ["--cache_text_encoder_outputs"]
        return [sys.executable, str(self.kohya / script), *extra,
                "--pretrained_model_name_or_path", str(self.ckpt), "--train_data_dir", str(self.data),
                "--output_dir", str(run / "out"), "--output_name", "kohya", "--save_model_as", "safetensors",
                "--resolution", "256", "--network_module", "networks.lora", "--network_dim", "16",
                "--network_alpha", "8", "--network_train_unet_only", "--optimizer_type", "AdamW",
                "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--train_batch_size", "1",
                "--max_train_steps", str(self.steps), "--mixed_precision", "no", "--save_precision", "float",
                "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0", "--seed", "42",
                "--caption_extension", ".txt", "--tokenizer_cache_dir", str(self.tok), "--max_grad_norm", "1.0",
                *(["--gradient_checkpointing"] if checkpointing else [])]

    def run(self, side: str, checkpointing: bool, profile: Path | None = None) -> dict:
        wait_for_memory(self.need_gib)
        self.runs += 1
        run = self.work / f"run{self.runs:02d}-{side}"
        run.mkdir()
        stamps = run / "stamps.txt"
        if side == "ours":
            command, path, cwd = self.ours_command(checkpointing, run), [ROOT], ROOT
        else:
            command, path, cwd = self.kohya_command(checkpointing, run), [self.site, self.kohya], self.kohya
        env = self._env(stamps, path, profile)
        env["LORAQ_HOME"] = str(run / "home")          # a fresh latent cache: both sides encode their latents
        with open(run / "log.txt", "w") as out:
            start = time.time()
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"{side} failed ({process.returncode}); see {run / 'log.txt'}:\n"
                               + (run / "log.txt").read_text()[-3000:])
        rows = [[float(x) for x in line.split()] for line in stamps.read_text().splitlines() if line.strip()]
        # per step: wall, user and system CPU seconds, minor page faults (system time spent faulting fresh pages
        # in is wall time no op profile shows)
        steps, user, system, faults = ([b[i] - a[i] for a, b in zip(rows, rows[1:])] for i in range(4))
        result = {"side": side, "checkpointing": checkpointing, "steady": statistics.median(steps[1:]),
                  "steps": steps, "first_step": rows[0][0] - start, "peak_rss": usage.ru_maxrss * 1024,
                  "wall": time.time() - start, "step_user_s": statistics.median(user[1:]),
                  "step_system_s": statistics.median(system[1:]), "step_minor_faults": statistics.median(faults[1:])}
        log(f"{side:5s} checkpointing {'on ' if checkpointing else 'off'}: step {result['steady']:.2f} s "
            f"(user {result['step_user_s']:.2f} s, system {result['step_system_s']:.2f} s, "
            f"{result['step_minor_faults']:.0f} minor faults), first step after {result['first_step']:.1f} s, "
            f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB")
        return result


def wait_for_memory(gib: float, timeout: float = 1800.0) -> None:
    """Start a run only when the machine has ``gib`` GiB available (another process's WebUI would make the
    peak a measure of swap-less thrashing, or get one of us killed)."""
    deadline = time.time() + timeout
    while True:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
        if available >= gib:
            return
        if time.time() > deadline:
            raise RuntimeError(f"only {available:.1f} GiB available after {timeout:.0f} s; a run needs {gib:.0f}")
        log(f"waiting for memory: {available:.1f} GiB available, {gib:.0f} needed")
        time.sleep(30)


def summarise(results: list[dict], checkpointing: bool) -> dict:
    ours = [r for r in results if r["side"] == "ours" and r["checkpointing"] == checkpointing]
    theirs = [r for r in results if r["side"] == "kohya" and r["checkpointing"] == checkpointing]
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    return {"checkpointing": checkpointing, "runs": len(ours),
            "step_ours": med(ours, "steady"), "step_kohya": med(theirs, "steady"),
            "step_ratio": med(ours, "steady") / med(theirs, "steady"),
            "rss_ours": med(ours, "peak_rss"), "rss_kohya": med(theirs, "peak_rss"),
            "rss_ratio": med(ours, "peak_rss") / med(theirs, "peak_rss"),
            "first_ours": med(ours, "first_step"), "first_kohya": med(theirs, "first_step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15", help="the checkpoint's architecture")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first two are not counted)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per side and setting")
    parser.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    parser.add_argument("--profile", choices=("off", "on"), help="profile one steady step on each side instead")
    parser.add_argument("--sd-scripts-git", type=Path, default=MIRROR, help="a git dir holding sd-scripts")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--site", type=Path, help="a folder where a previous run installed kohya's pins (--keep)")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--ckpt", type=Path, help="the random checkpoint: built there if missing, kept (default: "
                        "built in the temporary folder)")
    parser.add_argument("--lock", default=LOCK_FILE, help="the file locked around each pair of runs (a caller that "
                        "holds the heavy lock itself passes another)")
    args = parser.parse_args()
    if not args.sd_scripts_git.exists():
        sys.exit(f"no sd-scripts snapshot at {args.sd_scripts_git}: clone https://github.com/kohya-ss/sd-scripts "
                 "with --mirror somewhere and pass --sd-scripts-git")
    work = Path(tempfile.mkdtemp(prefix="kohya-compare-"))
    try:
        bench = Bench(work, args.steps, args.arch)
        if args.ckpt:
            bench.ckpt = args.ckpt
        commit = bench.setup(args.sd_scripts_git, args.site)
        if args.profile:
            on = args.profile == "on"
            for side in ("ours", "kohya"):
                out = work / f"profile-{side}.txt"
                with HeavyLock(args.lock):
                    bench.run(side, on, profile=out)
                print(f"\n== {side}, checkpointing {args.profile}: one steady step, per op ==\n{out.read_text()}")
            return
        settings = [s == "on" for s in args.checkpointing.split(",")]
        results = []
        for round_ in range(args.rounds):
            for checkpointing in settings:
                order = ("ours", "kohya") if round_ % 2 == 0 else ("kohya", "ours")
                with HeavyLock(args.lock):
                    results += [bench.run(side, checkpointing) for side in order]
        print(f"\n{args.arch}, sd-scripts {commit[:10]}, {args.steps} steps per run, {args.rounds} interleaved runs per side")
        print("| checkpointing | step ours / kohya (s) | ratio | peak RSS ours / kohya (GiB) | ratio | "
              "command to first step ours / kohya (s) |")
        print("|---|---|---|---|---|---|")
        summary = [summarise(results, c) for c in settings]
        for s in summary:
            print(f"| {'on' if s['checkpointing'] else 'off'} | {s['step_ours']:.2f} / {s['step_kohya']:.2f} | "
                  f"{s['step_ratio']:.3f}x | {s['rss_ours'] / 2**30:.2f} / {s['rss_kohya'] / 2**30:.2f} | "
                  f"{s['rss_ratio']:.2f}x | {s['first_ours']:.1f} / {s['first_kohya']:.1f} |")
        if args.json:
            args.json.write_text(json.dumps({"commit": commit, "results": results, "summary": summary}, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    main()
