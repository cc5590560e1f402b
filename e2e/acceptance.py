"""Acceptance test of LoRA Queue inside a running AUTOMATIC1111 / Forge, as a user would do it.

    python e2e/acceptance.py --url http://127.0.0.1:7860 --webui-dir /work/webui/a1111 --host a1111 \
        [--log /work/webui/a1111.log] [--restart-cmd /work/webui/start_a1111.sh] [--json out.json] [--only b,c]

Drives the LoRA Queue tab in a headless Chromium (Playwright, Debian's /usr/bin/chromium) and checks
the results through the WebUI API (the WebUI must run with --api). One line per check, PASS/FAIL/SKIP
with its numbers, and a JSON summary. Every check has its own timeout; a failure does not stop the
others (later checks that need an earlier one's LoRA are skipped).

Checks a-x (see CHECKS). For A1111's module count (c) the WebUI must log at DEBUG: the log itself is
looked at; /work/webui/start_a1111.sh ignores its arguments, so start it with SD_WEBUI_LOG_LEVEL=DEBUG.

Needs: playwright (python), Pillow. Nothing of the extension is imported: this is the user's view.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
RES = 64
RUN_TAG = time.strftime("%H%M%S")
OURS_BAD = re.compile(r"(\.state|\.loss\.csv|\.tmp|_copier\.safetensors$)", re.I)
#: images a job or the tab writes beside its LoRA (NAME.safetensors in the same folder): the final preview (the
#: WebUI shows it as the LoRA's card), an LCM job's comparison sheet, the morning sheet
SIDE_IMAGE = re.compile(r"^(?P<stem>.+)\.(preview|comparison|morning)\.png$")


def unexpected_files(folder: Path, files: list[str]) -> list[str]:
    """Files under the LoRA folder that are neither a LoRA nor an image beside its LoRA (SIDE_IMAGE)."""
    bad = []
    for f in files:
        m = SIDE_IMAGE.match(Path(f).name)
        if m and (folder / Path(f).parent / f"{m.group('stem')}.safetensors").is_file():
            continue
        if OURS_BAD.search(f) or not f.endswith(".safetensors"):
            bad.append(f)
    return bad


class CheckFailed(Exception):
    def __init__(self, message: str, numbers: dict | None = None):
        super().__init__(message)
        self.numbers = numbers      # what the check measured before it failed, kept in the report


class Timeout(CheckFailed):
    pass


def _finished(row: dict) -> bool:
    return row.get("state") == "done" and row.get("progress", "").startswith("100")


def _follow_to_the_end(p, job: int, seconds: float, what: str, numbers: dict) -> tuple[dict, list[str]]:
    """Watch a job's row in the tab until it is done at 100 % (or ``seconds`` pass); a failed or cancelled
    job raises CheckFailed with its error and ``numbers``. Returns the last row and the states seen."""
    final, seen = {}, []
    end = time.time() + seconds
    while time.time() < end:
        final = p.job_row(job)
        seen.append(f"{final.get('state')} {final.get('progress')}")
        if _finished(final):
            break
        if final.get("state") in ("failed", "cancelled"):
            _, err = p.job_summary(job)
            raise CheckFailed(f"{what} {final['state']}: {err or final.get('error')}", numbers=numbers)
        p.page.wait_for_timeout(3000)
    return final, seen


# -- WebUI API ----------------------------------------------------------------------------------

class Api:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body=None, timeout: float = 120):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise CheckFailed(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def get(self, path, timeout=60):
        return self.call("GET", path, timeout=timeout)

    def post(self, path, body, timeout=600):
        return self.call("POST", path, body, timeout=timeout)

    def up(self) -> bool:
        try:
            self.get("/sdapi/v1/sd-models", timeout=5)
            self.get("/sdapi/v1/loras", timeout=5)
            return True
        except Exception:
            return False

    def txt2img(self, prompt: str, seed: int = 7, steps: int = 4, timeout: float = 600, **extra):
        body = {"prompt": prompt, "negative_prompt": "", "width": RES, "height": RES, "steps": steps,
                "seed": seed, "cfg_scale": 5, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1, **extra}
        t0 = time.perf_counter()
        r = self.post("/sdapi/v1/txt2img", body, timeout=timeout)
        dt = time.perf_counter() - t0
        images = [Image.open(io.BytesIO(base64.b64decode(b.split(",", 1)[-1]))).convert("RGB") for b in r["images"]]
        return images, dt, r

    def lora_names(self) -> dict[str, str]:
        return {x["name"]: x.get("path", "") for x in self.get("/sdapi/v1/loras")}


# -- process, memory, files ---------------------------------------------------------------------

def webui_pid(webui_dir: Path, pidfile: Path | None) -> int | None:
    """The WebUI's python process: the start script's pid file, else a launch.py running in webui_dir."""
    if pidfile and pidfile.is_file():
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (ValueError, OSError):
            pass
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if any(c.endswith(b"launch.py") or c.endswith(b"webui.py") for c in cmd) and \
                    os.readlink(d / "cwd") == str(webui_dir):
                return int(d.name)
        except OSError:
            continue
    return None


def rss_gb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024 / 1024, 2)
    except OSError:
        return None
    return None


class RssSampler:
    """RSS of ``pid`` every ``every`` seconds in a thread while the block runs: peak and a few samples."""

    def __init__(self, pid: int | None, every: float = 1.0):
        import threading
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.time()
        while not self._stop.is_set():
            v = rss_gb(self.pid)
            if v is not None:
                self.samples.append((round(time.time() - t0, 1), v))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        return False

    @property
    def peak(self) -> float | None:
        return max((v for _, v in self.samples), default=None)

    def summary(self, n: int = 12) -> list:
        """About n (t, GB) samples spread over the run, the peak's among them."""
        if len(self.samples) <= n:
            return self.samples
        step = len(self.samples) / n
        picked = {int(i * step) for i in range(n)} | {len(self.samples) - 1}
        peak_i = max(range(len(self.samples)), key=lambda i: self.samples[i][1])
        return [self.samples[i] for i in sorted(picked | {peak_i})]


def safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


_SHA = {}


def file_sha256(path: Path) -> str:
    import hashlib
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def make_variant(src: Path, dst: Path, key: str = "model.diffusion_model.input_blocks.0.0.bias") -> None:
    """Copy a safetensors checkpoint with one value of ``key`` changed: a different file (and hash) that
    loads as the same architecture. Pure bytes: the header gives the tensor's offsets and dtype."""
    import shutil
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        entry = header[key]
        size = {"F16": 2, "BF16": 2, "F32": 4}[entry["dtype"]]
        f.seek(8 + n + entry["data_offsets"][0])
        first = f.read(size)
        f.seek(8 + n + entry["data_offsets"][0])
        if entry["dtype"] == "F32":
            f.write(struct.pack("<f", struct.unpack("<f", first)[0] + 0.01))
        elif entry["dtype"] == "F16":
            f.write(struct.pack("<e", struct.unpack("<e", first)[0] + 0.01))
        else:
            f.write(bytes([first[0] ^ 0x01, first[1]]))


def lora_modules(keys: list[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in keys if k.endswith(".lora_down.weight") or ".lora_down." in k})


def all_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def image_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference (0-255)."""
    d = ImageChops.difference(a, b)
    hist = d.convert("L").histogram()
    return sum(i * n for i, n in enumerate(hist)) / max(1, sum(hist))


def make_dataset(folder: Path, n: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30), (200, 40, 200), (30, 200, 200)]
    for i in range(n):
        img = Image.new("RGB", (128, 128), colours[i % len(colours)])
        d = ImageDraw.Draw(img)
        d.ellipse((20 + 5 * i, 20, 100, 100 - 5 * i), fill=(255, 255, 255))
        d.rectangle((10, 90, 60 + 8 * i, 120), fill=(0, 0, 0))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a loraqtok shape, number {i}")


def make_pair(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a = Image.new("RGB", (RES, RES), (90, 120, 160))
    ImageDraw.Draw(a).ellipse((12, 12, 52, 52), fill=(240, 220, 200))
    b = a.copy()
    ImageDraw.Draw(b).rectangle((24, 24, 40, 40), fill=(200, 0, 0))
    pa, pb = folder / "copier_a.png", folder / "copier_b.png"
    a.save(pa)
    b.save(pb)
    return pa, pb


# -- the browser --------------------------------------------------------------------------------

class Page:
    """The WebUI page with the LoRA Queue tab; gradio 3.41 (A1111) and 4.40 (Forge)."""

    def __init__(self, pw, url: str, log):
        self.url, self.log = url, log
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        self.console_errors: list[str] = []
        self.console: list[tuple[str, str]] = []   # (type, text) of every console message (warnings too)
        self.open()

    def _on_console(self, m):
        self.console.append((m.type, m.text))
        if m.type == "error":
            self.console_errors.append(m.text)

    def open(self):
        self.ctx = self.browser.new_context(viewport={"width": 1500, "height": 1100})
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(30000)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", self._on_pageerror)
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=120000)
        self.page.wait_for_selector("#tabs", timeout=180000)
        self.page.wait_for_selector("#loraq_add", state="attached", timeout=120000)

    def _on_pageerror(self, e):
        stack = getattr(e, "stack", "") or ""
        text = f"pageerror: {e}" + (" @ " + " | ".join(stack.splitlines()[1:3]).strip() if stack else "")
        self.console_errors.append(text)
        self.console.append(("pageerror", text))

    def fresh(self):
        """Load the page again in the same context (console listeners stay)."""
        self.page.reload(wait_until="domcontentloaded")
        self.page.wait_for_selector("#tabs", timeout=120000)
        self.page.wait_for_selector("#loraq_add", state="attached", timeout=120000)

    def reload(self):
        try:
            self.ctx.close()
        except Exception:
            pass
        self.open()

    def close(self):
        try:
            self.browser.close()
        except Exception:
            pass

    # top-level tabs
    def top_tab(self, name: str):
        btn = self.page.locator("#tabs > .tab-nav button, #tabs > div > button").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$", re.I))
        btn.first.click()   # case-insensitive: Forge labels the tab "Txt2img"
        self.page.wait_for_timeout(500)

    def loraq_tab(self, inner: str | None = None):
        self.top_tab("LoRA Queue")
        if inner:
            self.page.locator("#loraq_tabs button").filter(has_text=re.compile(rf"^\s*{inner}\s*$")).first.click()
            self.page.wait_for_timeout(400)

    # form controls
    def field(self, elem_id: str):
        return self.page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox]):not([type=file])").first

    def reveal(self, elem_id: str):
        """Open the closed accordions (groups, "advanced") around a control, outermost first."""
        for part, title in (("copier_pass", "Pass 1"), ("difference_pass", "Pass 2")):
            if f"loraq_f_{part}__" in elem_id:   # the two copier passes were tabs; since the compact form, columns
                tab = self.page.locator("#loraq_copier_passes button").filter(has_text=title)
                if tab.count():
                    tab.first.click()
                    self.page.wait_for_timeout(300)
        ids = self.page.evaluate("""(id) => { const el = document.getElementById(id); const out = [];
            for (let n = el && el.parentElement; n; n = n.parentElement)
                if (n.id && n.classList && n.classList.contains('gradio-accordion')) out.push(n.id);
            return out.reverse(); }""", elem_id)
        for acc in ids:
            wrap = self.page.locator(f"#{acc} > .label-wrap").first
            if wrap.count() and "open" not in (wrap.get_attribute("class") or ""):
                wrap.click()
                self.page.wait_for_timeout(300)

    def set_text(self, elem_id: str, value):
        self.reveal(elem_id)
        f = self.field(elem_id)
        f.fill(str(value))
        f.dispatch_event("input")
        f.dispatch_event("change")
        f.blur()

    def set_check(self, elem_id: str, on: bool):
        self.reveal(elem_id)
        box = self.page.locator(f"#{elem_id} input[type=checkbox]").first
        if box.is_checked() != on:
            box.click()

    def set_radio(self, elem_id: str, label: str):
        self.page.locator(f"#{elem_id} label").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first.click()
        self.page.wait_for_timeout(800)

    def set_files(self, elem_id: str, paths):
        self.page.locator(f"#{elem_id} input[type=file]").first.set_input_files([str(p) for p in paths])
        end = time.time() + 30   # wait until the component lists every uploaded file
        while time.time() < end:
            shown = self.page.locator(f"#{elem_id}").first.inner_text()
            if all(Path(p).name in shown for p in paths):
                break
            self.page.wait_for_timeout(500)
        self.page.wait_for_timeout(3000)

    def text(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id}").first.inner_text()

    def value(self, elem_id: str) -> str:
        return self.field(elem_id).input_value()

    # actions
    def add_job(self, mode: str, fields: dict, checks: dict | None = None, files: dict | None = None,
                timeout: float = 60) -> int:
        self.loraq_tab("Train")
        self.set_radio("loraq_mode", mode)
        if "sample_prompts" not in fields:
            # the form comes back as last queued (check o): an earlier job's preview prompts (g2, q) would give
            # this job previews at every save and at the end, minutes each on CPU (j's job in the 2026-12-03 run)
            fields = {"sample_prompts": "", **fields}
        for k, v in fields.items():
            elem = "loraq_f_" + k.replace(".", "__")
            if k == "sample_prompts" and not self.page.locator(f"#{elem}").count():
                continue   # a mode without the field
            self.set_text(elem, v)
        for k, v in (checks or {}).items():
            self.set_check("loraq_f_" + k.replace(".", "__"), v)
        for k, v in (files or {}).items():
            self.set_files("loraq_f_" + k.replace(".", "__"), v)
        last = self.max_job_id()
        self.loraq_tab("Train")
        self.page.locator("#loraq_add").click()
        end = time.time() + timeout
        while time.time() < end:
            status = self.text("loraq_train_status")
            m = re.search(r"as job (\d+)", status)
            if m and int(m.group(1)) > last:
                return int(m.group(1))
            if "not queued" in status or status.strip().startswith("⚠"):
                raise CheckFailed(f"not queued: {status.strip()!r}")
            self.page.wait_for_timeout(500)
        raise Timeout(f"no 'queued' message after {timeout} s (status {self.text('loraq_train_status')!r})")

    def max_job_id(self) -> int:
        self.loraq_tab("Queue")
        self.page.locator("#loraq_queue_refresh").click()
        self.page.wait_for_timeout(800)
        ids = [int(x) for x in self.page.eval_on_selector_all(
            "#loraq_queue_table tr[data-job-id]", "rows => rows.map(r => r.dataset.jobId)")]
        return max(ids, default=0)

    def queue_rows(self) -> list[dict]:
        """Every row of the queue table (after a Refresh click): id, name, state, progress, selected."""
        self.loraq_tab("Queue")
        self.page.locator("#loraq_queue_refresh").click()
        self.page.wait_for_timeout(800)
        return self.page.eval_on_selector_all("#loraq_queue_table tr[data-job-id]", """rows => rows.map(r => ({
            id: +r.dataset.jobId, name: r.cells[1].innerText.trim(), state: r.cells[3].innerText.trim(),
            progress: r.cells[4].innerText.trim(), selected: r.classList.contains('loraq-selected')}))""")

    def select(self, job_id: int):
        self.loraq_tab("Queue")
        self.set_text("loraq_selected_job", job_id)
        self.page.wait_for_timeout(1200)

    def job_row(self, job_id: int) -> dict:
        """State, progress and error of a job as the queue table shows it (after a Refresh click)."""
        if not self.page.locator("#loraq_queue_refresh").first.is_visible():
            self.loraq_tab("Queue")
        self.page.locator("#loraq_queue_refresh").click()
        self.page.wait_for_timeout(700)
        row = self.page.locator(f"#loraq_queue_table tr[data-job-id='{job_id}']")
        if row.count() == 0:
            return {"state": None}
        cells = row.first.locator("td").all_inner_texts()
        return {"state": row.first.locator(".loraq-state").inner_text().strip(), "progress": cells[4].strip(),
                "loss": cells[5].strip(), "error": row.first.get_attribute("title") or ""}

    def job_summary(self, job_id: int) -> tuple[str, str]:
        """(summary line, error text incl. detail) of the selected job."""
        self.select(job_id)
        self.page.wait_for_timeout(2500)
        summary = self.text("loraq_job_summary")
        err = ""
        box = self.page.locator("#loraq_job_error textarea")
        if box.count() and box.first.is_visible():
            err = box.first.input_value()
        return summary.strip(), err.strip()

    def wait_state(self, job_id: int, states, timeout: float, on_poll=None) -> dict:
        states = (states,) if isinstance(states, str) else tuple(states)
        self.loraq_tab("Queue")
        end, row = time.time() + timeout, {}
        while time.time() < end:
            row = self.job_row(job_id)
            if on_poll:
                on_poll(row)
            if row.get("state") in states:
                return row
            if row.get("state") in ("failed", "cancelled") and row["state"] not in states:
                _, err = self.job_summary(job_id)
                raise CheckFailed(f"job {job_id} {row['state']}: {err or row.get('error')}")
            self.page.wait_for_timeout(3000)
        raise Timeout(f"job {job_id} not {'/'.join(states)} after {timeout:.0f} s (last: {row})")

    def operation(self, job_id: int, elem: str) -> str:
        self.select(job_id)
        self.page.locator(f"#{elem}").click()
        self.page.wait_for_timeout(1500)
        return self.text("loraq_queue_status").strip()


# -- the checks ---------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.api = Api(args.url)
        self.webui = Path(args.webui_dir).resolve()
        self.lora_dir = Path(args.lora_dir) if args.lora_dir else self.webui / "models" / "Lora"
        self.out_dir = self.lora_dir / "lora_queue"
        self.log_path = Path(args.log) if args.log else Path(f"/work/webui/{args.host}.log")
        self.pidfile = Path(args.pidfile) if args.pidfile else Path(f"/work/webui/{args.host}.pid")
        self.data = self.webui / "models" / "loraq_e2e" / RUN_TAG
        self.results: list[dict] = []
        self.facts: dict = {"host": args.host, "url": args.url, "run_tag": RUN_TAG}
        self.page: Page | None = None
        self.names: dict[str, str] = {}

    def pid(self):
        return webui_pid(self.webui, self.pidfile)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def record(self, check: str, title: str, fn, timeout: float):
        t0 = time.time()
        entry = {"check": check, "title": title, "timeout_s": timeout}
        try:
            numbers = fn(timeout) or {}
            entry.update(result="PASS", numbers=numbers)
        except Skip as e:
            entry.update(result="SKIP", error=str(e))
        except CheckFailed as e:
            entry.update(result="FAIL", error=str(e), numbers=e.numbers or {})
        except Exception as e:  # a bug or a page that did not behave: a failure with its traceback
            entry.update(result="FAIL", error=f"{type(e).__name__}: {e}".strip()[:2000],
                         traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = round(time.time() - t0, 1)
        self.results.append(entry)
        nums = json.dumps(entry.get("numbers", {}), default=str)
        line = f"{entry['result']:4}  {check}  {title}  ({entry['seconds']} s)  {nums}"
        if entry.get("error"):
            line += f"\n      error: {entry['error']}"
        print(line, flush=True)
        self.write_json()
        return entry["result"] == "PASS"

    def write_json(self):
        out = Path(self.args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"facts": self.facts, "checks": self.results}, indent=2, default=str))

    def ensure_page(self, pw):
        if self.page is None:
            self.page = Page(pw, self.args.url, print)
        return self.page

    # a. the tab and the settings section
    def check_a(self, timeout):
        p = self.page
        t0 = time.time()
        p.loraq_tab("Train")
        seen = {}
        for inner, elems in (("Train", ["loraq_mode", "loraq_f_name", "loraq_f_dataset_dir", "loraq_f_steps",
                                        "loraq_add"]),
                             ("Queue", ["loraq_queue_table", "loraq_selected_job", "loraq_op_stop",
                                        "loraq_op_resume", "loraq_results"]),
                             ("LoRA tools", ["loraq_lora_list", "loraq_merge_inputs", "loraq_merge_run"])):
            p.loraq_tab(inner)
            for e in elems:
                seen[e] = p.page.locator(f"#{e}").first.is_visible()
        missing = [e for e, v in seen.items() if not v]
        n_controls = p.page.locator("[id^=loraq_f_]").count()
        p.top_tab("Settings")
        p.page.wait_for_timeout(1000)
        section = p.page.locator("#settings .tab-nav button, #settings button").filter(has_text=re.compile(r"^\s*LoRA Queue\s*$"))
        has_section = section.count() > 0
        if has_section:
            section.first.click()
            p.page.wait_for_timeout(600)
        opts = {k: p.page.locator(f"#setting_{k}").count() > 0 and p.page.locator(f"#setting_{k}").first.is_visible()
                for k in ("loraq_data_dir", "loraq_output_subdir", "loraq_resume_interrupted")}
        nums = {"form_controls": n_controls, "train_opposite_control": p.page.locator("#loraq_f_train_opposite").count(),
                "visible": sum(seen.values()), "of": len(seen),
                "settings_section": has_section, "settings_options_visible": opts,
                "seconds": round(time.time() - t0, 1)}
        if missing or not has_section or not all(opts.values()):
            raise CheckFailed(f"not visible: {missing}; settings section {has_section}; options {opts}", numbers=nums)
        return nums

    # b. a standard job reaches done; its file is listed, nothing else of ours is
    def check_b(self, timeout):
        p = self.page
        ds = self.data / "dataset"
        make_dataset(ds, 4)
        name = f"e2e_std_{RUN_TAG}"
        self.facts["rss_before_job_gb"] = rss_gb(self.pid())
        t0 = time.time()
        job = p.add_job("standard", {"name": name, "dataset_dir": ds, "resolution": RES, "steps": self.args.steps,
                                     "network_dim": 4, "network_alpha": 4, "batch_size": 1,
                                     "min_bucket_reso": 64, "max_bucket_reso": 256, "lr": 1e-3},
                        checks={"train_text_encoder": True})
        queued = time.time() - t0
        self.facts["standard_job"] = job
        row = p.wait_state(job, "done", timeout)
        took = time.time() - t0
        summary, _ = p.job_summary(job)
        self.facts["rss_after_job_gb"] = rss_gb(self.pid())
        listed = self.api.lora_names()
        files = all_files(self.lora_dir)
        ours_bad = unexpected_files(self.lora_dir, files)
        listed_bad = [n for n, path in listed.items() if OURS_BAD.search(path or n)]
        f = self.out_dir / f"{name}.safetensors"
        preview = self.out_dir / f"{name}.preview.png"
        nums = {"job": job, "queue_s": round(queued, 1), "done_after_s": round(took, 1), "row": row,
                "summary": summary, "listed_in_api": name in listed, "file": str(f), "file_exists": f.is_file(),
                "preview_beside_lora": preview.is_file(),
                "files_under_lora_dir": files, "unexpected_files": ours_bad, "unexpected_listed": listed_bad,
                "rss_before_gb": self.facts["rss_before_job_gb"], "rss_after_gb": self.facts["rss_after_job_gb"]}
        if f.is_file():
            self.names["standard"] = name
        if name not in listed or ours_bad or listed_bad or not f.is_file():
            raise CheckFailed("LoRA not listed or unexpected files under the LoRA folder", numbers=nums)
        return nums

    # c. the host's LoRA loader loads every module; the image changes
    def check_c(self, timeout):
        name = self.names.get("standard") or raise_skip("no LoRA from check b")
        f = self.out_dir / f"{name}.safetensors"
        keys = safetensors_keys(f)
        modules = lora_modules(keys)
        te = [m for m in modules if m.startswith("lora_te")]
        base, t_base, _ = self.api.txt2img("a photo of a loraqtok shape", seed=11, timeout=timeout)
        off = self.log_size()
        with_lora, t_lora, info = self.api.txt2img(f"a photo of a loraqtok shape <lora:{name}:1>", seed=11,
                                                   timeout=timeout)
        time.sleep(1)
        log = self.log_since(off)
        self.facts["rss_after_lora_gen_gb"] = rss_gb(self.pid())
        diff = image_diff(base[0], with_lora[0])
        infotext = json.loads(info.get("info") or "{}").get("infotexts", [""])[0]
        nums = {"keys_in_file": len(keys), "modules_in_file": len(modules), "text_encoder_modules": len(te),
                "unet_modules": len(modules) - len(te), "mean_pixel_diff": round(diff, 2),
                "txt2img_s_without": round(t_base, 1), "txt2img_s_with": round(t_lora, 1),
                "lora_in_infotext": "Lora hashes" in infotext or name in infotext,
                "rss_after_lora_gen_gb": self.facts["rss_after_lora_gen_gb"]}
        self.facts["txt2img_idle_s"] = round(t_base, 1)
        problems = []
        if self.args.host == "forge":
            m = [x for x in re.findall(r"\[LORA\][^\n]*", log)]
            nums["forge_log"] = m
            loaded = [re.search(r"Loaded\s+(.*?)\s+for\s+(\S+).*?(\d+)\s+keys.*?skipped\s+(\d+)\s+keys", x) for x in m]
            skipped = sum(int(x.group(4)) for x in loaded if x)
            total = sum(int(x.group(3)) for x in loaded if x)
            nums.update(forge_keys_loaded=total, forge_keys_skipped=skipped)
            bad_lines = [x for x in m if "Mismatch" in x or "unmatched keys" in x or "mismatch" in x]
            if bad_lines:
                problems.append(f"Forge reports: {bad_lines[:3]}")
            if total and total != len(modules):   # Forge counts a module (down, up, alpha) as one key
                problems.append(f"Forge loaded {total} modules of the file's {len(modules)}")
            if not any(loaded):
                problems.append("no '[LORA] Loaded ... (skipped K keys)' line in the log")
            elif skipped:
                problems.append(f"Forge skipped {skipped} keys")
        else:
            failed = re.findall(r"didn't match keys: (\{.*?\})\s*$", log, re.M)
            unsupported = re.findall(r"Network \S+ layer (\S+): couldn't find supported operation", log)
            errors = re.findall(r"(?:Error|error) (?:loading|applying) network[^\n]*|Traceback[^\n]*", log)
            # from the log itself, not from --loglevel-debug: a start script may drop the flag (it did:
            # /work/webui/start_a1111.sh ignores its arguments; SD_WEBUI_LOG_LEVEL=DEBUG works)
            debug_on = bool(re.search(r"^\S+ \S+ DEBUG \[", self.log_since(0), re.M))
            n_failed = sum(len(re.findall(r"': '", x)) for x in failed)
            nums.update(a1111_debug_log=debug_on, unmatched_keys=n_failed, unsupported_layers=len(unsupported),
                        load_errors=errors[:3], modules_loaded=len(modules) - len(set(unsupported)) if not failed else None)
            if not debug_on:
                problems.append("A1111 log has no DEBUG line: unmatched keys cannot be counted (start it with "
                                "--loglevel DEBUG or SD_WEBUI_LOG_LEVEL=DEBUG)"
                                + (" although --loglevel-debug was given" if self.args.loglevel_debug else ""))
            if failed:
                problems.append(f"A1111 did not match keys: {failed[0][:500]}")
            if unsupported or errors:
                problems.append(f"unsupported layers {unsupported[:5]} / errors {errors[:3]}")
        if diff < 0.5:
            problems.append(f"image with the LoRA is (almost) the same as without: mean diff {diff:.3f}")
        if not nums["lora_in_infotext"]:
            problems.append("infotext does not mention the LoRA")
        if problems:
            raise CheckFailed("; ".join(problems), numbers=nums)
        return nums

    # d. memory
    def check_d(self, timeout):
        nums = {k: self.facts.get(k) for k in ("rss_start_gb", "rss_before_job_gb", "rss_after_job_gb",
                                                 "rss_after_lora_gen_gb")}
        nums["rss_now_gb"] = rss_gb(self.pid())
        nums["pid"] = self.pid()
        before, after, gen = (nums.get(k) for k in ("rss_before_job_gb", "rss_after_job_gb", "rss_after_lora_gen_gb"))
        if before is not None and after is not None:
            nums["job_delta_gb"] = round(after - before, 2)   # the issue asks at most the LoRA + 100 MB
        if after is not None and gen is not None:
            nums["lora_gen_delta_gb"] = round(gen - after, 2)
        nums["previous_run_gb"] = PREVIOUS_RSS.get(self.args.host)
        if nums["rss_now_gb"] is None:
            raise CheckFailed("no WebUI process found to measure")
        return nums

    # e + f. txt2img during a running job; stop and save, then resume
    def check_e(self, timeout):
        p = self.page
        ds = self.data / "dataset"
        make_dataset(ds, 4)
        name = f"e2e_long_{RUN_TAG}"
        job = p.add_job("standard", {"name": name, "dataset_dir": ds, "resolution": RES,
                                     "steps": self.args.long_steps, "network_dim": 4, "network_alpha": 4,
                                     "batch_size": 1, "min_bucket_reso": 64, "max_bucket_reso": 256, "lr": 1e-3},
                        checks={"train_text_encoder": False})
        self.facts["long_job"] = job
        self.facts["long_name"] = name
        t0 = time.time()
        p.wait_state(job, "running", timeout / 2)
        # wait until training steps are under way (past caching)
        end = time.time() + timeout / 2
        row = {}
        while time.time() < end:
            row = p.job_row(job)
            m = re.match(r"(\d+)%", row.get("progress", ""))
            if row.get("state") != "running" or (m and int(m.group(1)) >= 5):
                break
            p.page.wait_for_timeout(2000)
        if row.get("state") != "running":
            raise CheckFailed(f"job {job} not running any more before txt2img: {row}")
        progress_before = row.get("progress")
        _, dt, _ = self.api.txt2img("a photo of a cat", seed=3, timeout=timeout)
        row_after = p.job_row(job)
        return {"job": job, "job_progress_at_call": progress_before, "txt2img_latency_s": round(dt, 1),
                "txt2img_idle_s": self.facts.get("txt2img_idle_s"), "job_after_call": row_after,
                "waited_for_running_s": round(time.time() - t0 - dt, 1)}

    def check_f(self, timeout):
        p = self.page
        job = self.facts.get("long_job") or raise_skip("no long job from check e")
        row = p.job_row(job)
        if row.get("state") != "running":
            raise CheckFailed(f"long job not running when stop and save was to be pressed: {row}")
        msg = p.operation(job, "loraq_op_stop")
        stopped = p.wait_state(job, ("stopped", "done"), timeout / 2)   # "stopped" since main 0fb1b1d
        summary_stopped, _ = p.job_summary(job)
        step = re.search(r"step (\d+)/(\d+)", summary_stopped)
        files_stopped = all_files(self.lora_dir)
        listed_stopped = list(self.api.lora_names())
        msg2 = p.operation(job, "loraq_op_resume")
        m = re.search(r"job (\d+) duplicated|as job (\d+)|resumed as job (\d+)", msg2)
        resumed_id = job
        if m:
            resumed_id = int(next(g for g in m.groups() if g))
        # the resumed job must reach its last step
        final, seen = _follow_to_the_end(p, resumed_id, timeout / 2, f"resumed job {resumed_id}",
                                         {"stop_message": msg, "resume_message": msg2,
                                          "stopped_summary": summary_stopped})
        summary_final, _ = p.job_summary(resumed_id)
        name = self.facts.get("long_name")
        nums = {"stop_message": msg, "stopped_row": stopped, "stopped_at": step.group(0) if step else None,
                "files_after_stop": files_stopped, "name_listed_after_stop": name in listed_stopped,
                "resume_message": msg2, "resumed_job": resumed_id, "final_row": final, "final_summary": summary_final,
                "progress_seen_after_resume": list(dict.fromkeys(seen))[:12]}
        if not _finished(final):
            raise CheckFailed(f"resumed job did not finish all steps in time: {final}", numbers=nums)
        if (self.out_dir / f"{name}.safetensors").is_file():
            self.names["long"] = name
        return nums

    # g. copier and LCM jobs
    def check_g_copier(self, timeout):
        p = self.page
        a, b = make_pair(self.data / "pair")
        name = f"e2e_cop_{RUN_TAG}"
        s = self.args.steps
        job = p.add_job("copier", {"name": name, "resolution": RES, "prompt": "a photo of a ball",
                                   "copier_pass.steps": s, "copier_pass.batch_size": 1,
                                   "copier_pass.network_dim": 4, "copier_pass.network_alpha": 4,
                                   "difference_pass.network_dim": 4, "difference_pass.network_alpha": 4},
                        files={"image_a": [a], "image_b": [b]})
        t0 = time.time()
        row = p.wait_state(job, "done", timeout)
        summary, _ = p.job_summary(job)
        f = self.out_dir / f"{name}.safetensors"
        files = all_files(self.lora_dir)
        bad = [x for x in files if OURS_BAD.search(x)]
        nums = {"job": job, "done_after_s": round(time.time() - t0, 1), "row": row, "summary": summary,
                "file_exists": f.is_file(), "listed": name in self.api.lora_names(), "unexpected_files": bad}
        if not f.is_file() or bad:
            raise CheckFailed("copier output missing or unexpected files", numbers=nums)
        self.names["copier"] = name
        return nums

    def check_g_lcm(self, timeout):
        p = self.page
        ds = self.data / "dataset"
        make_dataset(ds, 4)
        name = f"e2e_lcm_{RUN_TAG}"
        # one preview prompt: the comparison sheet (on by default) renders 1 prompt x 2 seeds instead of up to 4
        # training captions (the 2026-12-02 run: 4 prompts, 24 min on the loaded CPU)
        job = p.add_job("lcm", {"name": name, "resolution": RES, "dataset_dir": ds, "steps": self.args.steps,
                                "batch_size": 1, "network_dim": 4, "network_alpha": 4, "prompts": "a photo of a cat",
                                "num_generated_images": 2, "sample_prompts": "a photo of a loraqtok shape"})
        t0 = time.time()
        seen, phase_at, row = [], None, {}
        end = time.time() + timeout
        while time.time() < end:
            row = p.job_row(job)
            seen.append(f"{row.get('state')} {row.get('progress')}")
            if row.get("state") == "running" and "comparison sheet" in (row.get("progress") or "") and phase_at is None:
                phase_at = round(time.time() - t0, 1)
            if row.get("state") == "done":
                break
            if row.get("state") in ("failed", "cancelled"):
                _, err = p.job_summary(job)
                raise CheckFailed(f"LCM job {row['state']}: {err or row.get('error')}",
                                  numbers={"job": job, "progress_seen": list(dict.fromkeys(seen))[:20]})
            p.page.wait_for_timeout(3000)
        took = round(time.time() - t0, 1)
        summary, _ = p.job_summary(job)
        f = self.out_dir / f"{name}.safetensors"
        sheet = self.out_dir / f"{name}.comparison.png"
        nums = {"job": job, "done_after_s": took, "row": row, "summary": summary,
                "progress_seen": list(dict.fromkeys(seen))[:20], "comparison_sheet_phase_seen_after_s": phase_at,
                "sheet_phase_s": round(took - phase_at, 1) if phase_at is not None else None,
                "comparison_png": sheet.is_file(), "file_exists": f.is_file(), "listed": name in self.api.lora_names()}
        if sheet.is_file():
            with Image.open(sheet) as im:
                nums["comparison_png_px"] = list(im.size)
        if row.get("state") != "done":
            raise Timeout(f"LCM job not done after {timeout} s (last {row})", numbers=nums)
        if not f.is_file():
            raise CheckFailed("LCM output missing", numbers=nums)
        if phase_at is None or not sheet.is_file():
            raise CheckFailed(f"the queue never showed the job 'running ... comparison sheet' (seen "
                              f"{nums['progress_seen']}); sheet file {sheet.is_file()}", numbers=nums)
        self.names["lcm"] = name
        return nums

    # h. merge from the LoRA tools tab (its Merge section)
    def check_h(self, timeout):
        p = self.page
        inputs = [n for n in (self.names.get("standard"), self.names.get("long"), self.names.get("lcm"),
                              self.names.get("copier")) if n][:2]
        if not inputs:   # run on its own (--only h): the newest standard LoRA an earlier run left
            found = sorted(self.out_dir.glob("e2e_std_*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
            inputs = [f.stem for f in found[:2]]
        if len(inputs) < 1:
            raise_skip("no LoRA to merge")
        if len(inputs) < 2:
            inputs = inputs * 2
        p.loraq_tab("LoRA tools")
        p.page.locator("#loraq_lora_refresh").click()
        p.page.wait_for_timeout(1500)
        clicked = 0
        p.set_text("loraq_merge_inputs", "")
        for n in dict.fromkeys(inputs):
            # names are relative to the LoRA folder since 640d880 ("lora_queue/NAME")
            btn = p.page.locator(f"#loraq_lora_list .loraq-lora[data-name='{n}'], "
                                 f"#loraq_lora_list .loraq-lora[data-name$='/{n}']")
            if btn.count():
                btn.first.click()
                clicked += 1
                p.page.wait_for_timeout(400)
        text = p.value("loraq_merge_inputs")
        if clicked < len(dict.fromkeys(inputs)):
            p.set_text("loraq_merge_inputs", "\n".join(f"{self.out_dir.name}/{n}:0.5" for n in dict.fromkeys(inputs)))
            text = p.value("loraq_merge_inputs")
        out = f"e2e_merged_{RUN_TAG}"
        p.set_text("loraq_merge_output", out)
        p.set_text("loraq_merge_rank", 4)
        before = set(self.api.lora_names())
        p.page.locator("#loraq_merge_run").click()
        end, report = time.time() + timeout, ""
        while time.time() < end:
            report = p.page.locator("#loraq_merge_report textarea").first.input_value()
            if report.strip():
                break
            p.page.wait_for_timeout(1000)
        listed = self.api.lora_names()
        nums = {"inputs_text": text, "names_clicked": clicked, "report_head": report.splitlines()[:2],
                "file_exists": (self.out_dir / f"{out}.safetensors").is_file(), "listed_without_restart": out in listed,
                "was_listed_before": out in before}
        if not report.startswith("merged") or out not in listed:
            raise CheckFailed(f"merge report {report[:300]!r}; listed {out in listed}", numbers=nums)
        return nums

    # i. x/y/z plot with our axes
    def check_i(self, timeout):
        p = self.page
        names = [n for n in (self.names.get("standard"), self.names.get("long"), self.names.get("lcm")) if n]
        if not names:   # run on its own (--only i): the newest standard LoRA an earlier run left
            found = sorted(self.out_dir.glob("e2e_std_*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
            names = [f.stem for f in found[:1]]
        if not names:
            raise_skip("no LoRA for the x/y/z axis")
        names = names[:2]
        p.fresh()   # a fresh page: the LoRA choices are read when it builds
        errors_before = len(p.console_errors)
        p.top_tab("txt2img")
        # By keyboard: on A1111 an option of the upward-opening X type list chosen with the mouse lets the
        # mouse-up land on the Height slider, whose `release` runs A1111's JS-only hires-fix handler
        # (modules/ui.py registers it with outputs=[], javascript/hires_fix.js returns 6 values) and gradio
        # 3.41 throws "Cannot read properties of undefined (reading 'props')" for any axis type.
        pick_by_keyboard(p.page, "#script_list", "X/Y/Z plot")
        p.page.wait_for_selector("#script_txt2img_xyz_plot_x_type", state="visible", timeout=30000)
        p.page.wait_for_timeout(1500)
        errors_script = p.console_errors[errors_before:]
        n = len(p.console_errors)
        options = pick_by_keyboard(p.page, "#script_txt2img_xyz_plot_x_type", "[LoRA Queue] LoRA")
        p.page.wait_for_timeout(2000)
        errors_axis = p.console_errors[n:]
        # the "X values" dropdown has no elem_id: it is the other dropdown in the x_type's row, shown
        # instead of the X values textbox for an axis with choices
        textbox_visible = p.page.locator("#script_txt2img_xyz_plot_x_values").first.is_visible()
        row = p.page.locator("#script_txt2img_xyz_plot_x_type").locator("xpath=..")
        inputs = row.locator("input[role=listbox], input[aria-expanded], .wrap input, input.border-none")
        dd_visible, dd_options = False, []
        for k in range(inputs.count()):
            inp = inputs.nth(k)
            inside_type = inp.evaluate("e => !!e.closest('#script_txt2img_xyz_plot_x_type')")
            if inside_type or not inp.is_visible():
                continue
            dd_visible = True
            inp.click()
            p.page.wait_for_timeout(600)
            opts = p.page.locator("ul.options li")
            dd_options = [t.lstrip("✓").strip() for t in opts.all_inner_texts()]
            p.page.keyboard.press("Escape")
            break
        console = p.console_errors[errors_before:]
        console = [c for c in console if "iframeResizer" not in c and "cdn" not in c.lower()]
        # the cause seen with the mouse, on its own: a plain click on the Height slider (not judged)
        n = len(p.console_errors)
        height = p.page.locator("#txt2img_height input[type=range]").first
        if height.count() and height.is_visible():
            height.click()
            p.page.wait_for_timeout(1500)
        errors_height_click = p.console_errors[n:]
        if "[LoRA Queue] LoRA" not in options or "[LoRA Queue] Strength" not in options:
            raise CheckFailed(f"axes not offered: {options}")
        x_idx, y_idx = options.index("[LoRA Queue] LoRA"), options.index("[LoRA Queue] Strength")
        args = [x_idx, "", names, y_idx, "0.5, 1", [], 0, "", [], True, True, False, False, 0, 0, 0, 0, False]
        runs = []
        for _ in range(2):
            imgs, dt, info = self.api.txt2img("a photo of a loraqtok shape", seed=5, timeout=timeout / 2,
                                              script_name="x/y/z plot", script_args=args)
            runs.append((imgs, dt))
            out = Path(self.args.json).with_name(f"xyz-{self.args.host}-run{len(runs)}")
            out.mkdir(parents=True, exist_ok=True)
            for k, im in enumerate(imgs):
                im.save(out / f"{k}.png")
            infotexts = json.loads(info.get("info") or "{}").get("infotexts", [])
            (out / "infotexts.json").write_text(json.dumps(infotexts, indent=1))
        (a, ta), (b, tb) = runs
        n = min(len(a), len(b))
        same = [image_diff(a[i], b[i]) == 0 for i in range(n)]
        cells_a = a[1:] if len(a) > 1 else a
        distinct = len({c.tobytes() for c in cells_a})
        nums = {"axis_options": len(options), "x_index": x_idx, "y_index": y_idx, "values_dropdown_visible": dd_visible, "values_textbox_visible": textbox_visible,
                "dropdown_choices": dd_options, "console_errors": console,
                "console_errors_on_script_pick": errors_script, "console_errors_on_lora_axis_pick": errors_axis,
                "picked_by": "keyboard", "console_errors_on_height_slider_click_not_judged": errors_height_click,
                "x_values": names, "prompts": [t.split("\n")[0] for t in infotexts], "images_per_run": [len(a), len(b)],
                "identical": f"{sum(same)}/{n}", "distinct_cells": distinct, "seconds": [round(ta, 1), round(tb, 1)]}
        missing = [x for x in names if x not in dd_options]
        nums["lora_choices_missing_from_dropdown"] = missing
        if console or not all(same) or len(a) < 2 or distinct < 2 or not dd_visible or missing:
            raise CheckFailed(f"console errors {console[:3]}; values dropdown shown {dd_visible}, our LoRAs missing "
                            f"from it {missing}; identical {sum(same)}/{n}; distinct cells {distinct}", numbers=nums)
        return nums

    # j. kill -9 mid-job, restart, resume
    def check_j(self, timeout):
        if not self.args.restart_cmd:
            raise_skip("no --restart-cmd given")
        p = self.page
        ds = self.data / "dataset"
        make_dataset(ds, 4)
        name = f"e2e_kill_{RUN_TAG}"
        steps = self.args.long_steps
        job = p.add_job("standard", {"name": name, "dataset_dir": ds, "resolution": RES, "steps": steps,
                                     "network_dim": 4, "network_alpha": 4, "batch_size": 1,
                                     "min_bucket_reso": 64, "max_bucket_reso": 256, "lr": 1e-3,
                                     "save_every_n_steps": max(2, steps // 4)})
        t0 = time.time()
        p.wait_state(job, "running", timeout / 3)
        end, row = time.time() + timeout / 3, {}
        while time.time() < end:
            row = p.job_row(job)
            m = re.match(r"(\d+)%", row.get("progress", ""))
            if row.get("state") != "running" or (m and int(m.group(1)) >= 40):
                break
            p.page.wait_for_timeout(2000)
        if row.get("state") != "running":
            raise CheckFailed(f"job {job} not running before the kill: {row}")
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        killed_at = row.get("progress")
        for _ in range(60):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.5)
        # the dead process' pid file
        files_after_kill = all_files(self.lora_dir)
        p.close()
        self.page = None
        t1 = time.time()
        r = subprocess.run(self.args.restart_cmd, shell=True, capture_output=True, text=True, timeout=timeout / 3)
        end = time.time() + 180
        while time.time() < end and not self.api.up():
            time.sleep(2)
        up_s = round(time.time() - t1, 1)
        self.page = Page(self._pw, self.args.url, print)
        p = self.page
        after_restart = p.job_row(job)
        msg = p.operation(job, "loraq_op_resume") if after_restart.get("state") != "running" else "(running by itself)"
        final, seen = _follow_to_the_end(p, job, timeout / 3, f"job {job} after resume",
                                         {"killed_at": killed_at, "after_restart": after_restart,
                                          "resume_message": msg})
        summary, _ = p.job_summary(job)
        nums = {"job": job, "killed_pid": pid, "killed_at": killed_at, "restart_rc": r.returncode,
                "restart_out": r.stdout.strip().splitlines()[-1:], "api_up_after_s": up_s,
                "state_after_restart": after_restart, "resume_message": msg, "final_row": final,
                "final_summary": summary, "files_after_kill": files_after_kill,
                "progress_seen_after_resume": list(dict.fromkeys(seen))[:12],
                "total_s": round(time.time() - t0, 1)}
        if not _finished(final):
            raise CheckFailed(f"job did not finish after the restart: {final}", numbers=nums)
        return nums


    # k. a dataset outside the allowed input folders is refused in the tab
    def check_k(self, timeout):
        p = self.page
        outside = Path("/tmp/loraq_outside") / RUN_TAG
        make_dataset(outside, 4)
        name = f"e2e_outside_{RUN_TAG}"
        before = p.queue_rows()
        refused, status, job = "", "", None
        try:
            job = p.add_job("standard", {"name": name, "dataset_dir": outside, "resolution": RES,
                                         "steps": self.args.steps, "network_dim": 4, "network_alpha": 4,
                                         "batch_size": 1, "min_bucket_reso": 64, "max_bucket_reso": 256, "lr": 1e-3},
                            timeout=min(60, timeout / 2))
        except Timeout:
            raise
        except CheckFailed as e:
            refused = str(e)
        p.loraq_tab("Train")
        status = p.text("loraq_train_status").strip()
        err_box = p.page.locator("#loraq_err_dataset_dir").first
        field_msg = err_box.inner_text().strip() if err_box.count() and err_box.is_visible() else ""
        after = p.queue_rows()
        nums = {"dataset_dir": str(outside), "images": len(list(outside.glob("*.png"))), "refused": bool(refused),
                "status": status, "dataset_field_message": field_msg,
                "rows_before": len(before), "rows_after": len(after),
                "max_id_before": max((r["id"] for r in before), default=0),
                "max_id_after": max((r["id"] for r in after), default=0),
                "queued_as": job, "name_in_queue": any(r["name"] == name for r in after)}
        problems = []
        if job is not None or not refused:
            problems.append(f"queued as job {job}: {status!r}")
        if "outside the folders" not in field_msg:
            problems.append(f"message next to the dataset field {field_msg!r} does not say 'outside the folders'")
        if len(after) > len(before) or nums["max_id_after"] > nums["max_id_before"] or nums["name_in_queue"]:
            problems.append(f"the queue grew: {len(before)} -> {len(after)} rows")
        if problems:
            raise CheckFailed("; ".join(problems), numbers=nums)
        return nums

    # l. the selected job's summary and row highlight survive the polls
    def check_l(self, timeout):
        p = self.page
        rows = p.queue_rows()
        done = [r for r in rows if r["state"] == "done" and r["progress"].startswith("100")]
        if not done:
            raise_skip("no finished job in the queue")
        want = self.facts.get("standard_job")
        row = next((r for r in done if r["id"] == want), done[0])
        # a fresh page: nothing selected yet, the polls start from the page-load values
        p.fresh()
        p.loraq_tab("Queue")
        p.page.wait_for_timeout(1500)
        p.page.locator(f"#loraq_queue_table tr[data-job-id='{row['id']}'] td").nth(1).click()
        t0 = time.time()
        samples = []
        for at in (0.5, 1.0, 2.0, 3.0, 4.0):
            p.page.wait_for_timeout(max(0, int((t0 + at - time.time()) * 1000)))
            summary = p.page.locator("#loraq_job_summary").first.inner_text().strip()
            selected = p.page.eval_on_selector_all("#loraq_queue_table tr.loraq-selected",
                                                    "rows => rows.map(r => +r.dataset.jobId)")
            samples.append({"t_s": at, "summary": summary[:160], "selected_rows": selected,
                            "selected_field": p.value("loraq_selected_job")})
        last = samples[-1]
        summary = last["summary"]
        nums = {"job": row["id"], "name": row["name"], "state": row["state"], "samples": samples,
                "summary_after_4s": summary, "selected_rows_after_4s": last["selected_rows"],
                "summary_blank_at": [x["t_s"] for x in samples if not x["summary"]]}
        problems = []
        if row["name"] not in summary or row["state"] not in summary:
            problems.append(f"summary after 4 s {summary[:200]!r} lacks the job's name/state ({row['name']}, {row['state']})")
        if last["selected_rows"] != [row["id"]]:
            problems.append(f"rows with class loraq-selected after 4 s: {last['selected_rows']} (want [{row['id']}])")
        if problems:
            raise CheckFailed("; ".join(problems), numbers=nums)
        return nums

    # m. console warnings of the polls ("Too many arguments provided for the endpoint.", gradio 4)
    def check_m(self, timeout):
        p = self.page
        marker = "Too many arguments provided for the endpoint."
        p.fresh()
        n0 = len(p.console)
        p.page.wait_for_timeout(2000)
        at_load = p.console[n0:]
        n1 = len(p.console)
        p.loraq_tab("Train")
        p.page.wait_for_timeout(10000)
        in_tab = p.console[n1:]
        n2 = len(p.console)
        p.loraq_tab("Queue")
        p.page.wait_for_timeout(10000)
        in_queue = p.console[n2:]

        def count(msgs):
            return sum(1 for _, t in msgs if marker in t)

        window = at_load + in_tab + in_queue
        props = [t for k, t in window if "props" in t and k in ("error", "pageerror")]
        props_run = [t for k, t in p.console if "props" in t and k in ("error", "pageerror")]
        nums = {"too_many_args_at_page_load": count(at_load), "too_many_args_lora_queue_tab_10s": count(in_tab),
                "too_many_args_queue_subtab_10s": count(in_queue),
                "console_messages_in_window": len(window),
                "console_types_in_window": {k: sum(1 for x, _ in window if x == k) for k in {x for x, _ in window}},
                "distinct_messages_in_window": {f"{k}: {t[:160]}": sum(1 for x in window if x == (k, t))
                                                for k, t in dict.fromkeys(window)},
                "errors_in_window": [t[:300] for k, t in window if k in ("error", "pageerror")][:10],
                "props_errors_in_window": props[:5], "props_errors_this_page": props_run[:5]}
        if count(in_tab) or count(in_queue):
            raise CheckFailed(f"{count(in_tab)} + {count(in_queue)} '{marker}' warnings in 10 s + 10 s", numbers=nums)
        return nums


    # n. a job names its checkpoint; the worker switches the WebUI back to it
    def _checkpoint(self) -> str:
        return self.api.get("/sdapi/v1/options").get("sd_model_checkpoint") or ""

    def _loaded_sha(self) -> str:
        """SHA256 of the checkpoint the WebUI has actually loaded: both hosts set ``sd_checkpoint_hash`` when
        they load weights, while ``sd_model_checkpoint`` is only the choice (Forge resets it on a page load)."""
        return self.api.get("/sdapi/v1/options").get("sd_checkpoint_hash") or ""

    def _set_checkpoint(self, title: str, sha: str, other: str, timeout: float) -> float:
        """Make ``title`` (content ``sha``) the loaded checkpoint through /sdapi/v1/options, as the dropdown.

        Forge's options call only reloads when the option changes (``checkpoint_change`` compares with the
        option), and loads at the next generation: when the option already names ``title`` but another model
        is loaded, it is set to ``other`` first, and a 2-step txt2img loads it."""
        t0 = time.time()
        if self.args.host == "forge" and self._checkpoint().split(" [")[0] == title.split(" [")[0]:
            self.api.post("/sdapi/v1/options", {"sd_model_checkpoint": other}, timeout=timeout)
        self.api.post("/sdapi/v1/options", {"sd_model_checkpoint": title}, timeout=timeout)
        if self.args.host == "forge":
            self.api.txt2img("a red circle", steps=2, timeout=timeout)
        end = time.time() + timeout
        while time.time() < end:
            if self._loaded_sha() == sha:
                return round(time.time() - t0, 1)
            time.sleep(2)
        raise Timeout(f"{title!r} not loaded after {timeout:.0f} s (sd_checkpoint_hash {self._loaded_sha()[:10]!r}, "
                      f"want {sha[:10]!r}; sd_model_checkpoint {self._checkpoint()!r})")

    def _second_checkpoint(self, original_file: Path) -> tuple[Path, bool]:
        """B: --second-ckpt, or a copy of the original with one weight changed (different content, so a
        different hash: a hard link would let a host that never reloads look as if it had)."""
        folder = self.webui / "models" / "Stable-diffusion"
        if self.args.second_ckpt:
            src = Path(self.args.second_ckpt).resolve()
            if src.parent == folder.resolve():
                return src, False
            dst = folder / src.name
            if dst.exists():
                return dst, False
            os.link(src, dst)
            return dst, True
        dst = folder / "sd15_random_b.safetensors"
        if dst.exists():
            return dst, False
        make_variant(original_file, dst)
        return dst, True

    def check_n(self, timeout):
        p = self.page
        original = self._checkpoint()
        models = {m["title"]: m for m in self.api.get("/sdapi/v1/sd-models")}
        orig_model = next((m for t, m in models.items() if t.split(" [")[0] == original.split(" [")[0]), None)
        if orig_model is None:
            raise CheckFailed(f"the chosen checkpoint {original!r} is not in /sdapi/v1/sd-models: {list(models)}")
        orig_file = Path(orig_model["filename"])
        extra, made = self._second_checkpoint(orig_file)
        nums = {"original": original, "second": extra.name, "second_made": made}
        b_title = None
        try:
            sha_a, sha_b = file_sha256(orig_file), file_sha256(extra)
            nums["sha256"] = {"original": sha_a[:10], "second": sha_b[:10]}
            if sha_a == sha_b:
                raise CheckFailed(f"{extra} has the same content as {orig_file}: give a checkpoint of different content")
            self.api.post("/sdapi/v1/refresh-checkpoints", {})
            titles = [m["title"] for m in self.api.get("/sdapi/v1/sd-models")]
            b_title = next((t for t in titles if t.split(" [")[0] == extra.name or t.startswith(extra.stem)), None)
            nums["titles"] = titles
            if not b_title:
                raise CheckFailed(f"{extra.name} not in /sdapi/v1/sd-models after refresh: {titles}")
            nums["switch_to_b_s"] = self._set_checkpoint(b_title, sha_b, original, 600)
            p.fresh()   # the tab reads the loaded checkpoint when a job is queued (and Forge resets its option)
            nums["option_after_page_load"] = self._checkpoint()
            p.loraq_tab("Queue")
            p.page.locator("#loraq_q_pause").click()
            p.page.wait_for_timeout(1500)
            nums["pause_status"] = p.text("loraq_queue_status").strip()
            ds = self.data / "dataset"
            if not ds.is_dir():
                make_dataset(ds, 4)
            name = f"e2e_ckpt_{RUN_TAG}"
            job = p.add_job("standard", {"name": name, "dataset_dir": ds, "resolution": RES, "steps": self.args.steps,
                                         "network_dim": 4, "network_alpha": 4, "batch_size": 1,
                                         "min_bucket_reso": 64, "max_bucket_reso": 256, "lr": 1e-3})
            nums["job"] = job
            queued_summary, _ = p.job_summary(job)
            nums["summary_when_queued"] = queued_summary
            nums["switch_to_original_s"] = self._set_checkpoint(original, sha_a, b_title, 600)
            nums["loaded_before_resume"] = self._loaded_sha()[:10]
            p.fresh()   # a page load between the switch and the job's turn: the option may change, the model not
            nums["option_before_resume"] = self._checkpoint()
            p.loraq_tab("Queue")
            p.page.locator("#loraq_q_resume").click()
            p.page.wait_for_timeout(1500)
            nums["resume_status"] = p.text("loraq_queue_status").strip()
            t0 = time.time()
            nums["row"] = p.wait_state(job, "done", timeout - 120)
            nums["done_after_resume_s"] = round(time.time() - t0, 1)
            nums["loaded_after_job"] = self._loaded_sha()[:10]
            nums["option_after_job"] = self._checkpoint()
            summary, err = p.job_summary(job)
            nums["summary_after"] = summary
            warn = [l for l in summary.splitlines() if re.search(r"warning: the WebUI's checkpoint was switched from .+ to ", l)]
            nums["warning_lines"] = warn
            problems = []
            if not re.search(r"base model: `?[^\n]*" + re.escape(extra.stem), queued_summary):
                problems.append(f"summary when queued lacks 'base model: ...{extra.stem}...': {queued_summary[:300]!r}")
            if self._loaded_sha() != sha_b:
                problems.append(f"after the job the loaded model is {nums['loaded_after_job']!r}, not B {sha_b[:10]!r}")
            if not warn:
                problems.append(f"no 'warning: the WebUI's checkpoint was switched from ... to ...' line: {summary[:400]!r}")
            if problems:
                raise CheckFailed("; ".join(problems), numbers=nums)
            return nums
        except CheckFailed as e:
            if not e.numbers:
                e.numbers = nums
            raise
        finally:
            try:
                p.loraq_tab("Queue")
                p.page.locator("#loraq_q_resume").click()
            except Exception:
                pass
            try:
                if self._loaded_sha() != file_sha256(orig_file):
                    self._set_checkpoint(original, file_sha256(orig_file), b_title or original, 600)
            except Exception as e:
                nums["cleanup_error"] = str(e)
            if made and extra.exists():
                extra.unlink()
            try:
                self.api.post("/sdapi/v1/refresh-checkpoints", {})
            except Exception:
                pass
            nums["extra_removed"] = not extra.exists() if made else "kept (not made by the check)"

    # o. the Train form survives a reload; the preset list has the built-in presets
    def check_o(self, timeout):
        p = self.page
        name = f"e2e_reload_{RUN_TAG}"
        ds = self.data / "dataset"
        if not ds.is_dir():
            make_dataset(ds, 4)
        p.loraq_tab("Queue")
        p.page.locator("#loraq_q_pause").click()   # the job need not run: it is deleted afterwards
        p.page.wait_for_timeout(1000)
        nums = {}
        try:
            job = p.add_job("standard", {"name": name, "dataset_dir": ds, "resolution": RES, "steps": self.args.steps,
                                         "network_dim": 4, "network_alpha": 4})
            nums["job"] = job
            p.fresh()
            p.loraq_tab("Train")
            end, shown = time.time() + 20, ""
            while time.time() < end:
                shown = p.value("loraq_f_name")
                if shown == name:
                    break
                p.page.wait_for_timeout(500)
            nums["name_after_reload"] = shown
            box = p.page.locator("#loraq_preset_name input").first
            box.click()
            p.page.wait_for_timeout(700)
            opts = p.page.locator("#loraq_preset_name ul.options li")
            if not opts.count():
                opts = p.page.locator("ul.options li")
            options = [t.lstrip("✓").strip() for t in opts.all_inner_texts()]
            p.page.keyboard.press("Escape")
            box.blur()
            nums["preset_options"] = options
            builtin = [o for o in options if o.startswith("built-in")]
            nums["built_in"] = len(builtin)
            problems = []
            if shown != name:
                problems.append(f"name field after reload {shown!r}, queued {name!r}")
            if not builtin:
                problems.append(f"no preset starting with 'built-in': {options}")
            if problems:
                raise CheckFailed("; ".join(problems), numbers=nums)
            return nums
        finally:
            self._delete_job_and_resume_queue(nums)

    def _delete_job_and_resume_queue(self, nums: dict) -> None:
        """A check's cleanup: its job (``nums["job"]``) deleted, the queue resumed; a failure is only recorded."""
        p = self.page
        try:
            if nums.get("job"):
                nums["delete_status"] = p.operation(nums["job"], "loraq_op_delete")
            p.loraq_tab("Queue")
            p.page.locator("#loraq_q_resume").click()
            p.page.wait_for_timeout(800)
        except Exception as e:
            nums["cleanup_error"] = str(e)

    # -- checks of the features landed on 2026-12-01/02 (p-w) -----------------------------------------

    def _wait_text(self, elem_id: str, ok, timeout: float, textarea: bool = False) -> str:
        """Poll the text of ``elem_id`` (its textarea's value if ``textarea``) until ``ok(text)``; the last text."""
        p, end, text = self.page, time.time() + timeout, ""
        while time.time() < end:
            if textarea:
                box = p.page.locator(f"#{elem_id} textarea").first
                text = box.input_value() if box.count() else ""
            else:
                text = p.text(elem_id)
            if ok(text):
                return text
            p.page.wait_for_timeout(1000)
        return text

    def _shot(self, page, what: str) -> str:
        out = Path(f"/work/webui/shots/{self.args.host}-{what}-{RUN_TAG}.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(out))
        except Exception:
            return ""
        return str(out)

    def _lora_name(self) -> str:
        name = self.names.get("standard") or self.names.get("previews") or self.names.get("long")
        if not name:   # run on its own: the newest standard LoRA an earlier run left
            found = sorted(self.out_dir.glob("e2e_std_*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
            name = found[0].stem if found else raise_skip("no LoRA from check b")
        return name

    # p. the Train form at 1366x768: "Add to queue" in view without scrolling; an empty dataset is refused red
    def check_p(self, timeout):
        p = self.page
        ctx = p.browser.new_context(viewport={"width": 1366, "height": 768})
        page = ctx.new_page()
        nums = {"viewport": "1366x768"}
        try:
            page.goto(self.args.url, wait_until="domcontentloaded", timeout=120000)
            page.wait_for_selector("#tabs", timeout=180000)
            page.wait_for_selector("#loraq_add", state="attached", timeout=120000)
            page.locator("#tabs > .tab-nav button, #tabs > div > button").filter(
                has_text=re.compile(r"^\s*LoRA Queue\s*$", re.I)).first.click()
            page.wait_for_timeout(600)
            page.locator("#loraq_tabs button").filter(has_text=re.compile(r"^\s*Train\s*$")).first.click()
            page.wait_for_timeout(600)
            page.locator("#loraq_mode label").filter(has_text=re.compile(r"^\s*standard\s*$")).first.click()
            page.wait_for_timeout(1000)
            page.evaluate("() => window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            box = page.locator("#loraq_add").first.bounding_box()
            nums["scroll_y"] = page.evaluate("() => window.scrollY")
            nums["add_box"] = {k: round(v) for k, v in (box or {}).items()}
            in_view = bool(box) and box["y"] >= 0 and box["y"] + box["height"] <= 768 and box["x"] + box["width"] <= 1366
            nums["add_in_view"] = in_view
            nums["screenshot_form"] = self._shot(page, "p-form")
            # an empty dataset folder: refused, the message below the field, red, the field outlined
            last = p.max_job_id()
            for elem, value in (("loraq_f_name", f"e2e_empty_{RUN_TAG}"), ("loraq_f_dataset_dir", "")):
                f = page.locator(f"#{elem} textarea, #{elem} input").first
                f.fill(value)
                f.dispatch_event("input")
                f.blur()
            page.wait_for_timeout(800)
            page.locator("#loraq_add").first.click()
            end, status = time.time() + 60, ""
            while time.time() < end:
                status = page.locator("#loraq_train_status").first.inner_text()
                if "not queued" in status or re.search(r"as jobs? \d+", status):   # not "the form as last queued"
                    break
                page.wait_for_timeout(500)
            page.wait_for_timeout(1200)   # loraq.js marks the fields 350 ms after the answer
            nums["status"] = status.strip()
            err = page.locator("#loraq_err_dataset_dir").first
            nums["error_visible"] = err.is_visible()
            nums["error_text"] = err.inner_text().strip() if err.count() else ""
            colour = page.evaluate("""() => { const b = document.querySelector('#loraq_err_dataset_dir');
                if (!b) return null; const t = b.querySelector('p') || b; return getComputedStyle(t).color; }""")
            nums["error_colour"] = colour
            rgb = [int(x) for x in re.findall(r"\d+", colour or "")[:3]]
            red = len(rgb) == 3 and rgb[0] >= 150 and rgb[1] <= 110 and rgb[2] <= 110
            nums["error_red"] = red
            nums["field_outlined"] = "loraq-invalid" in (page.locator("#loraq_f_dataset_dir").first.get_attribute("class") or "")
            err_box = err.bounding_box() if nums["error_visible"] else None
            field_box = page.locator("#loraq_f_dataset_dir").first.bounding_box()
            nums["error_below_field"] = bool(err_box and field_box and err_box["y"] >= field_box["y"] + field_box["height"] - 4
                                             and abs(err_box["x"] - field_box["x"]) < 40)
            nums["screenshot_error"] = self._shot(page, "p-error")
            nums["queue_grew"] = p.max_job_id() > last
            problems = []
            if not in_view:
                problems.append(f"'Add to queue' not in the 1366x768 view without scrolling: {nums['add_box']}")
            if "not queued" not in status:
                problems.append(f"status {status.strip()[:200]!r} does not say 'not queued'")
            if not nums["error_visible"] or "dataset" not in (nums["error_text"] + status).lower():
                problems.append(f"no visible message naming the dataset field: {nums['error_text']!r}")
            if not red:
                problems.append(f"message colour {colour!r} is not red")
            if not nums["field_outlined"]:
                problems.append("the dataset field is not outlined (.loraq-invalid)")
            if nums["queue_grew"]:
                problems.append("the queue grew")
            if problems:
                raise CheckFailed("; ".join(problems), numbers=nums)
            return nums
        finally:
            ctx.close()

    # q + r. a standard job with preview prompts, previews every N steps: the gallery of the selected job fills
    # while it trains, and the SVG loss plot changes
    def check_q(self, timeout):
        p = self.page
        ds = self.data / "dataset"
        make_dataset(ds, 4)
        name = f"e2e_prev_{RUN_TAG}"
        steps = self.args.preview_steps
        every = self.args.preview_every or max(1, steps // 4)
        job = p.add_job("standard", {"name": name, "dataset_dir": ds, "resolution": RES, "steps": steps,
                                     "network_dim": 4, "network_alpha": 4, "batch_size": 1,
                                     "min_bucket_reso": 64, "max_bucket_reso": 256, "lr": 1e-3,
                                     "sample_prompts": "a photo of a loraqtok shape", "sample_every_n_steps": every},
                        checks={"train_text_encoder": False})
        self.facts["previews_job"] = job
        t0 = time.time()
        p.select(job)
        svgs, images_seen, states, first_image_s, first_image_state = [], [], [], None, None
        end, row = time.time() + timeout, {}
        while time.time() < end:
            # no Refresh click: the gallery and the plot come from their own polls, as the user sees them
            row_state = p.page.evaluate(f"""() => {{ const r = document.querySelector("#loraq_queue_table tr[data-job-id='{job}']");
                return r ? [r.querySelector('.loraq-state').innerText.trim(), r.cells[4].innerText.trim()] : [null, null]; }}""")
            state, progress = row_state
            svg = p.page.evaluate("() => { const s = document.querySelector('#loraq_loss_plot svg'); return s ? s.outerHTML : ''; }")
            n_img = p.page.evaluate("""() => [...document.querySelectorAll('#loraq_previews img')]
                .filter(i => i.naturalWidth > 0).map(i => i.src.split('/').pop()).length""")
            if state == "running" and (not svgs or svgs[-1][1] != svg):
                svgs.append((progress, svg))
            images_seen.append((state, progress, n_img))
            if n_img and first_image_s is None:
                first_image_s, first_image_state = round(time.time() - t0, 1), f"{state} {progress}"
            states.append(f"{state} {progress}")
            if state in ("done", "failed", "cancelled"):
                row = {"state": state, "progress": progress}
                break
            p.page.wait_for_timeout(1500)
        p.page.wait_for_timeout(4000)   # the gallery's poll after the final preview
        final_imgs = p.page.evaluate("""() => [...document.querySelectorAll('#loraq_previews img')]
            .filter(i => i.naturalWidth > 0).length""")
        folder_pngs = sorted(x.name for x in self.out_dir.rglob(f"{name}*.png"))
        self.facts["previews_svgs"] = [(prog, len(svg)) for prog, svg in svgs]
        self.facts["previews_svg_distinct"] = len({svg for _, svg in svgs})
        self.facts["previews_row"] = row
        shot = self._shot(p.page, "q-previews")
        nums = {"job": job, "steps": steps, "preview_every": every, "done_after_s": round(time.time() - t0, 1),
                "final_row": row, "first_image_after_s": first_image_s, "first_image_at": first_image_state,
                "images_while_running": max([n for s, _, n in images_seen if s == "running"], default=0),
                "images_at_end": final_imgs, "preview_pngs": folder_pngs,
                "states_seen": list(dict.fromkeys(states))[:15], "screenshot": shot}
        # since f7dce93 the row names the phase while a preview renders ("running 50% preview")
        nums["preview_phase_seen"] = [x for x in dict.fromkeys(states) if x.startswith("running") and "preview" in x]
        if row.get("state") != "done":
            _, err = p.job_summary(job)
            raise CheckFailed(f"previews job {row.get('state')}: {err}", numbers=nums)
        self.names["previews"] = name
        if self.args.expect_preview_phase and not nums["preview_phase_seen"]:
            raise CheckFailed(f"the row never said 'preview' while one rendered: {nums['states_seen']}", numbers=nums)
        if not final_imgs or not nums["images_while_running"]:
            raise CheckFailed(f"gallery: {nums['images_while_running']} image(s) while running, {final_imgs} at the end "
                            f"(files {folder_pngs})", numbers=nums)
        return nums

    def check_r(self, timeout):
        svgs = self.facts.get("previews_svgs") or raise_skip("no running job watched by check q")
        nums = {"svg_versions_while_running": len(svgs), "distinct": self.facts.get("previews_svg_distinct"),
                "progress_at_each_version": [prog for prog, _ in svgs][:20],
                "svg_lengths": [n for _, n in svgs][:20]}
        if (nums["distinct"] or 0) < 2:
            raise CheckFailed("the loss plot did not change while the job trained", numbers=nums)
        return nums

    # s. the morning view of a finished job writes NAME.morning.png and shows it
    def check_s(self, timeout):
        p = self.page
        job = self.facts.get("previews_job") or self.facts.get("standard_job") or raise_skip("no finished job")
        name = self.names.get("previews") if self.facts.get("previews_job") else self.names.get("standard")
        if not name:
            raise_skip("the job of check q/b has no LoRA")
        target = self.out_dir / f"{name}.morning.png"
        existed = target.exists()
        p.select(job)
        p.page.wait_for_timeout(1500)
        p.set_text("loraq_grid_strengths", "0, 1")
        p.set_text("loraq_grid_seeds", "1")
        t0 = time.time()
        p.page.locator("#loraq_morning_generate").click()
        status = self._wait_text("loraq_morning_status", lambda t: t.strip().startswith(("✔", "⚠")), timeout)
        took = time.time() - t0
        p.page.wait_for_timeout(1500)
        shown = p.page.evaluate("""() => { const i = document.querySelector('#loraq_morning img');
            return i ? [i.naturalWidth, i.naturalHeight] : null; }""")
        size = None
        if target.is_file():
            with Image.open(target) as im:
                size = list(im.size)
        nums = {"job": job, "status": status.strip()[:400], "seconds": round(took, 1), "file": str(target),
                "file_exists": target.is_file(), "existed_before": existed, "file_size_px": size,
                "shown_px": shown, "screenshot": self._shot(p.page, "s-morning")}
        if not status.strip().startswith("✔") or not target.is_file() or not shown or not shown[0]:
            raise CheckFailed(f"morning sheet: status {status.strip()[:300]!r}, file {target.is_file()}, shown {shown}", numbers=nums)
        return nums

    def _tools_tab(self, section: str):
        p = self.page
        p.loraq_tab("LoRA tools")
        p.page.locator("#loraq_tools_tabs button").filter(has_text=re.compile(rf"^\s*{section}\s*$")).first.click()
        p.page.wait_for_timeout(500)

    # t. resize a LoRA from the LoRA tools tab: listed afterwards in /sdapi/v1/loras
    def check_t(self, timeout):
        p = self.page
        name = self._lora_name()
        self._tools_tab("Resize")
        p.page.locator("#loraq_lora_refresh").click()
        p.page.wait_for_timeout(1500)
        btn = p.page.locator(f"#loraq_lora_list .loraq-lora[data-name='{name}'], "
                             f"#loraq_lora_list .loraq-lora[data-name$='/{name}']")
        clicked = btn.count() > 0
        if clicked:
            btn.first.click()
            p.page.wait_for_timeout(800)
        picked = p.value("loraq_resize_input")
        if not clicked or not picked:
            p.set_text("loraq_resize_input", f"{self.out_dir.name}/{name}")
        out = f"e2e_resized_{RUN_TAG}"
        p.set_text("loraq_resize_rank", 2)
        p.set_text("loraq_resize_output", out)
        t0 = time.time()
        p.page.locator("#loraq_resize_run").click()
        report = self._wait_text("loraq_resize_report", lambda t: bool(t.strip()), timeout, textarea=True)
        took = time.time() - t0
        listed = self.api.lora_names()
        f = self.lora_dir / f"{out}.safetensors"
        found = [x for x in self.lora_dir.rglob(f"{out}.safetensors")]
        nums = {"source": name, "clicked_in_list": clicked, "input_after_click": picked, "seconds": round(took, 1),
                "report_head": report.splitlines()[:3], "files": [str(x) for x in found],
                "listed_without_refresh": out in listed}
        if not report.startswith("resized") or out not in listed:
            raise CheckFailed(f"resize report {report[:300]!r}; listed {out in listed}", numbers=nums)
        if found:
            modules = lora_modules(safetensors_keys(found[0]))
            nums["modules"] = len(modules)
        self.names["resized"] = out
        return nums

    # u. the merge preview renders images
    def check_u(self, timeout):
        p = self.page
        name = self._lora_name()
        other = self.names.get("resized") or self.names.get("long") or name
        self._tools_tab("Merge")
        # names relative to the LoRA folder: the tools write into its lora_queue/ subfolder too
        p.set_text("loraq_merge_inputs", f"{self.out_dir.name}/{name}:0.5\n{self.out_dir.name}/{other}:0.5")
        p.set_text("loraq_merge_rank", 4)
        p.set_text("loraq_preview_prompt", "a photo of a loraqtok shape")
        p.set_text("loraq_preview_seeds", "1")
        p.set_text("loraq_preview_steps", self.args.preview_sampling_steps)
        t0 = time.time()
        p.page.locator("#loraq_preview_run").click()
        report = self._wait_text("loraq_preview_report", lambda t: bool(t.strip()), timeout, textarea=True)
        took = time.time() - t0
        p.page.wait_for_timeout(1500)
        shown = p.page.evaluate("""() => { const i = document.querySelector('#loraq_preview_image img');
            return i ? [i.naturalWidth, i.naturalHeight] : null; }""")
        nums = {"inputs": p.value("loraq_merge_inputs"), "seconds": round(took, 1), "report_head": report.splitlines()[:4],
                "image_px": shown, "screenshot": self._shot(p.page, "u-preview")}
        if report.startswith("error") or not shown or not shown[0]:
            raise CheckFailed(f"merge preview: report {report[:300]!r}, image {shown}", numbers=nums)
        return nums

    # v. bake a LoRA into the loaded checkpoint: the WebUI lists the new file as a checkpoint after a refresh
    def check_v(self, timeout):
        p = self.page
        name = self._lora_name()
        self._tools_tab("Bake")
        out = f"e2e_baked_{RUN_TAG}"
        p.set_text("loraq_bake_base", "")
        p.set_text("loraq_bake_inputs", f"{self.out_dir.name}/{name}:0.5")
        p.set_text("loraq_bake_output", out)
        pid = self.pid()
        rss0 = rss_gb(pid)
        t0 = time.time()
        with RssSampler(pid) as during:   # Bake gives the heap back afterwards (free_memory): before, peak, after
            p.page.locator("#loraq_bake_run").click()
            report = self._wait_text("loraq_bake_report", lambda t: bool(t.strip()), timeout, textarea=True)
        took = time.time() - t0
        rss_after = rss_gb(pid)
        time.sleep(10)
        nums = {"lora": name, "seconds": round(took, 1), "report_head": report.splitlines()[:4],
                "rss_before_gb": rss0, "rss_peak_during_gb": during.peak, "rss_samples_during": during.summary(),
                "rss_after_gb": rss_after, "rss_10s_after_gb": rss_gb(pid)}
        made = [m for m in re.findall(r"(/\S+?\.safetensors)", report) if out in m]
        models_dir = self.webui / "models" / "Stable-diffusion"
        found = made or [str(x) for x in models_dir.rglob(f"{out}.safetensors")]
        nums["file"] = found[:1]
        try:
            self.api.post("/sdapi/v1/refresh-checkpoints", {})
            titles = [m["title"] for m in self.api.get("/sdapi/v1/sd-models")]
            nums["listed_as_checkpoint"] = [t for t in titles if out in t]
            if report.startswith("error") or not found or not nums["listed_as_checkpoint"]:
                raise CheckFailed(f"bake: report {report[:300]!r}; file {found[:1]}; listed {nums['listed_as_checkpoint']}", numbers=nums)
            if found:
                nums["file_gb"] = round(Path(found[0]).stat().st_size / 1e9, 2)
            return nums
        finally:
            for x in found:   # 2 GB each: not kept
                try:
                    Path(x).unlink()
                except OSError:
                    pass
            try:
                self.api.post("/sdapi/v1/refresh-checkpoints", {})
            except Exception:
                pass

    # x. a symlink to the checkpoint, beside it in models/Stable-diffusion, is taken as the bake base
    def check_x(self, timeout):
        p = self.page
        name = self._lora_name()
        original = self._checkpoint()
        models = {m["title"]: m for m in self.api.get("/sdapi/v1/sd-models")}
        model = next((m for t, m in models.items() if t.split(" [")[0] == original.split(" [")[0]), None)
        if model is None:
            raise CheckFailed(f"the chosen checkpoint {original!r} is not in /sdapi/v1/sd-models: {list(models)}")
        real = Path(model["filename"])
        link = real.with_name(f"e2e_link_{RUN_TAG}.safetensors")
        out = f"e2e_baked_link_{RUN_TAG}"
        models_dir = self.webui / "models" / "Stable-diffusion"
        nums = {"link": str(link), "target": str(os.path.realpath(real)), "target_is_link": real.is_symlink()}
        found = []
        try:
            link.symlink_to(real.name)   # relative, as people link a model into the folder
            nums["link_resolves_to"] = os.path.realpath(link)
            self._tools_tab("Bake")
            p.set_text("loraq_bake_base", str(link))
            p.set_text("loraq_bake_inputs", f"{self.out_dir.name}/{name}:0.5")
            p.set_text("loraq_bake_output", out)
            pid = self.pid()
            nums["rss_before_gb"] = rss_gb(pid)
            t0 = time.time()
            with RssSampler(pid) as during:
                p.page.locator("#loraq_bake_run").click()
                report = self._wait_text("loraq_bake_report", lambda t: bool(t.strip()) and out in t or
                                         t.strip().startswith("error"), timeout, textarea=True)
            nums.update(seconds=round(time.time() - t0, 1), report_head=report.splitlines()[:4],
                        rss_peak_during_gb=during.peak, rss_after_gb=rss_gb(pid))
            found = [str(x) for x in models_dir.rglob(f"{out}.safetensors")]
            nums["file"] = found[:1]
            if found:
                nums["file_gb"] = round(Path(found[0]).stat().st_size / 1e9, 2)
            if not report.startswith("baked") or link.name not in report or not found:
                raise CheckFailed(f"bake from the link: report {report[:400]!r}; file {found[:1]}", numbers=nums)
            return nums
        finally:
            p.set_text("loraq_bake_base", "")
            for x in found:
                try:
                    Path(x).unlink()
                except OSError:
                    pass
            if link.is_symlink():
                link.unlink()
            nums["link_removed"] = not link.is_symlink()
            try:
                self.api.post("/sdapi/v1/refresh-checkpoints", {})
            except Exception:
                pass

    # w. the LCM "distil" button queues an LCM job
    def check_w(self, timeout):
        p = self.page
        p.loraq_tab("Queue")
        p.page.locator("#loraq_q_pause").click()   # the job is hundreds of teacher images: deleted, not run
        p.page.wait_for_timeout(1000)
        nums = {}
        try:
            last = p.max_job_id()
            p.loraq_tab("Train")
            p.page.locator("#loraq_distil").click()
            status = self._wait_text("loraq_distil_status", lambda t: "as job" in t or "not queued" in t, timeout)
            nums["status"] = status.strip()[:500]
            m = re.search(r"as job (\d+)", status)
            rows = p.queue_rows()
            job = int(m.group(1)) if m else None
            row = next((r for r in rows if r["id"] == job), None)
            nums.update(job=job, row=row, queue_grew=p.max_job_id() > last)
            if job:
                mode = p.page.evaluate(f"""() => {{ const r = document.querySelector("#loraq_queue_table tr[data-job-id='{job}']");
                    return r ? r.cells[2].innerText.trim() : null; }}""")
                nums["mode_in_table"] = mode
                summary, _ = p.job_summary(job)
                nums["summary"] = summary[:400]
            if not job or not row or nums.get("mode_in_table") != "lcm" or row["state"] != "queued":
                raise CheckFailed(f"distil: {status.strip()[:300]!r}; row {row}; mode {nums.get('mode_in_table')!r}", numbers=nums)
            return nums
        finally:
            self._delete_job_and_resume_queue(nums)


class Skip(Exception):
    pass


def raise_skip(why):
    raise Skip(why)


def pick(page, selector: str, label: str) -> list[str]:
    """Choose ``label`` in a gradio dropdown (3.41 and 4.x: an input with a list of options); its options."""
    box = page.locator(f"{selector} input").first
    box.click()
    page.wait_for_timeout(500)
    opts = page.locator(f"{selector} ul.options li")
    options = [t.strip() for t in opts.all_inner_texts()]
    if not options:  # gradio 4 renders the option list elsewhere
        opts = page.locator("ul.options li")
        options = [t.strip() for t in opts.all_inner_texts()]
    want = [i for i, t in enumerate(options) if t.strip().lstrip("✓").strip() == label]
    options = [t.lstrip("✓").strip() for t in options]
    if not want:
        page.keyboard.press("Escape")
        raise CheckFailed(f"{label!r} not among the options of {selector}: {options}")
    opts.nth(want[0]).click()
    page.wait_for_timeout(700)
    return options


def pick_by_keyboard(page, selector: str, label: str) -> list[str]:
    """Choose ``label`` in a gradio dropdown with the keyboard only (focus, type to filter, arrows, Enter):
    no mouse-up lands on whatever lies under the closing option list. Returns the dropdown's options."""
    box = page.locator(f"{selector} input").first
    box.focus()
    page.wait_for_timeout(500)

    def shown() -> list[str]:
        opts = page.locator(f"{selector} ul.options li")
        if not opts.count():   # gradio 4 renders the option list elsewhere
            opts = page.locator("ul.options li")
        return [t.lstrip("✓").strip() for t in opts.all_inner_texts()]

    options = shown()
    if not options:
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(400)
        options = shown()
    if label not in options:
        page.keyboard.press("Escape")
        raise CheckFailed(f"{label!r} not among the options of {selector}: {options}")
    page.keyboard.press("Control+A")
    page.keyboard.type(label, delay=20)
    page.wait_for_timeout(500)
    filtered = shown()
    if label not in filtered:
        page.keyboard.press("Escape")
        raise CheckFailed(f"typing {label!r} in {selector} left the options {filtered}")
    active = page.evaluate("""(sel) => { const lis = [...document.querySelectorAll(sel + ' ul.options li, ul.options li')];
        return lis.findIndex(li => li.classList.contains('active')); }""", selector)   # the highlighted option
    want = filtered.index(label)
    steps = want - active if active >= 0 else want + 1
    for _ in range(max(0, steps)):
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(100)
    page.keyboard.press("Enter")
    page.wait_for_timeout(700)
    value = box.input_value().strip()
    if value != label:
        raise CheckFailed(f"keyboard pick in {selector}: value {value!r}, wanted {label!r} "
                          f"(filtered {filtered}, active index {active})")
    box.blur()
    page.wait_for_timeout(300)
    return options


CHECKS = [
    ("a", "tab renders (form, queue, merge) and Settings has the LoRA Queue section", "check_a", 180),
    ("b", "standard job from the tab reaches done; listed in /sdapi/v1/loras; nothing else of ours", "check_b", 1500),
    ("c", "host's LoRA loader loads every module; image differs", "check_c", 600),
    ("d", "memory (RSS) before/after the job and after a LoRA generation", "check_d", 30),
    ("e", "txt2img while a job runs completes (latency)", "check_e", 1200),
    ("f", "stop and save, then resume, finishes the job (safe unpickler)", "check_f", 1800),
    ("g1", "copier job from the tab finishes", "check_g_copier", 1500),
    ("g2", "LCM job from the tab finishes; the queue shows 'comparison sheet' while its sheet renders", "check_g_lcm",
     2400),
    ("h", "merge from the LoRA tools tab is listed in /sdapi/v1/loras without restart", "check_h", 600),
    ("i", "x/y/z plot with our axes: no console error; same seed twice identical", "check_i", 900),
    ("j", "kill -9 mid-job, restart, resume: job done", "check_j", 1800),
    ("k", "dataset outside the allowed input folders is refused in the tab; the queue does not grow", "check_k", 180),
    ("l", "a clicked finished job's summary and row highlight are still there after 4 s", "check_l", 120),
    ("m", "no 'Too many arguments provided for the endpoint.' in 10 s of the tab + 10 s of its Queue sub-tab",
     "check_m", 120),
    ("n", "a job names its checkpoint; queued on B, WebUI switched to A before its turn: the worker loads B (read from the "
          "loaded model's sd_checkpoint_hash, B of different content), "
          "job done, summary warns of the switch", "check_n", 2400),
    ("o", "the Train form as last queued survives a reload; the preset list has built-in presets", "check_o", 180),
    ("p", "Train form at 1366x768: 'Add to queue' in view without scrolling (standard mode); an empty dataset is "
          "refused, its message red below the field, the field outlined, the queue does not grow", "check_p", 240),
    ("q", "a standard job with preview prompts, previews every N steps: the selected job's gallery shows images "
          "while it trains", "check_q", 1500),
    ("r", "the SVG loss plot of the selected job changes while it trains (from q's job)", "check_r", 30),
    ("s", "Morning sheet of a finished job writes NAME.morning.png and shows it", "check_s", 1200),
    ("t", "LoRA tools, Resize: the resized LoRA is listed in /sdapi/v1/loras", "check_t", 600),
    ("u", "LoRA tools, Merge preview renders images (at 512 px on SD1: the tools have no resolution)", "check_u", 2400),
    ("v", "LoRA tools, Bake into the loaded checkpoint: listed in /sdapi/v1/sd-models after refresh-checkpoints",
     "check_v", 900),
    ("w", "the 'Distil the loaded checkpoint' button queues an LCM job", "check_w", 180),
    ("x", "LoRA tools, Bake from a symlink to the checkpoint beside it in models/Stable-diffusion: taken as the base",
     "check_x", 900),
]
PREVIOUS_RSS = {  # GB, run of 2026-12-01 (A1111 @ 55c69e8, Forge @ ffaa07e)
    "a1111": {"before_job": 4.78, "after_job": 5.02, "after_lora_gen": 8.92},
    "forge": {"before_job": 0.70, "after_job": 5.11, "after_lora_gen": 6.40},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--webui-dir", required=True)
    ap.add_argument("--host", choices=("a1111", "forge"), required=True)
    ap.add_argument("--lora-dir", default="", help="the WebUI's LoRA folder (default WEBUI/models/Lora)")
    ap.add_argument("--log", default="", help="the WebUI's log file (default /work/webui/HOST.log)")
    ap.add_argument("--pidfile", default="", help="(default /work/webui/HOST.pid)")
    ap.add_argument("--restart-cmd", default="", help="shell command that starts the WebUI again (check j)")
    ap.add_argument("--loglevel-debug", action="store_true", help="A1111 runs with --loglevel DEBUG")
    ap.add_argument("--second-ckpt", default="", help="check n: a checkpoint of different content from the loaded "
                    "one (default: a copy of it with one weight changed, made in the models folder and removed)")
    ap.add_argument("--steps", type=int, default=6, help="steps of the small jobs")
    ap.add_argument("--long-steps", type=int, default=30, help="steps of the long jobs (e, f, j)")
    ap.add_argument("--preview-steps", type=int, default=6,
                    help="steps of the previews job (q); a 64 px preview of the full-size model costs ~1-2 min on CPU")
    ap.add_argument("--preview-every", type=int, default=3, help="previews every N steps in q (0: steps/4)")
    ap.add_argument("--preview-sampling-steps", type=int, default=4, help="sampling steps of the merge preview (u)")
    ap.add_argument("--expect-preview-phase", action="store_true", help="q: the row must show the phase 'preview' "
                    "while a preview renders (main since f7dce93)")
    ap.add_argument("--only", default="", help="comma-separated check ids, e.g. a,b,c")
    ap.add_argument("--json", default="", help="summary file (default e2e/results-HOST.json)")
    args = ap.parse_args(argv)
    if not args.json:
        args.json = str(Path(__file__).with_name(f"results-{args.host}.json"))
    from playwright.sync_api import sync_playwright

    run = Run(args)
    if not run.api.up():
        print(f"FAIL  -  the WebUI does not answer at {args.url} (/sdapi/v1/sd-models, /sdapi/v1/loras)")
        return 2
    run.facts["rss_start_gb"] = rss_gb(run.pid())
    run.facts["pid"] = run.pid()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    with sync_playwright() as pw:
        run._pw = pw
        t0 = time.time()
        run.page = Page(pw, args.url, print)
        run.facts["page_load_s"] = round(time.time() - t0, 1)
        for cid, title, method, timeout in CHECKS:
            if only and cid not in only and cid.rstrip("12") not in only:
                continue
            if run.page is None:
                run.page = Page(pw, args.url, print)
            run.record(cid, title, getattr(run, method), timeout)
        if run.page:
            run.facts["console_errors_total"] = [c for c in run.page.console_errors][:20]
            run.page.close()
    run.write_json()
    counts = {r: sum(1 for x in run.results if x["result"] == r) for r in ("PASS", "FAIL", "SKIP")}
    print(f"summary: {counts}  json: {args.json}")
    return 0 if counts["FAIL"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
