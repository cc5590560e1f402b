"""The tab in a real browser: headless Chromium drives the standalone app on the demo model under gradio 3.41.2.

One session, as a user would go: an invalid job is refused with its messages next to the fields; a
copier job (red circle -> blue circle, two uploaded images) is queued, trains to 100 % while the
queue answers quickly, shows its loss plot and a comparison grid; its two LoRAs are merged.

pytest runs in the main environment (diffusers 0.42, no gradio); this file then runs itself as a
script in ``.venv-gradio3`` (A1111's pins: gradio 3.41.2, fastapi 0.94.0, httpx 0.24.1), which
serves the app and drives the browser, and writes what it measured to ``session.json``.
Screenshots go to the test's folder and, with LORAQ_UPDATE_SCREENSHOTS=1, to docs/screenshots/ for the README.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-gradio3" / "bin" / "python"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = ("1_invalid_job", "2_copier_job", "3_queue_done", "4_loss_plot", "5_grid", "6_merge")
PROMPT = "a red circle on a white background"
#: The error messages showing, and what the user sees of them: colour, outline of the field, on screen or not.
ERRORS_SEEN = """() => { const seen = {}, out = [];
  for (const box of document.querySelectorAll('[id^=loraq_err_]')) {
    if (seen[box.id] || box.offsetParent === null || !box.textContent.trim()) continue;
    seen[box.id] = true;
    const key = box.id.slice('loraq_err_'.length), field = document.querySelector('#loraq_f_' + key);
    const text = box.querySelector('p') || box, r = field.getBoundingClientRect();
    out.push({key, color: getComputedStyle(text).color, outlined: getComputedStyle(field).boxShadow.includes('inset'),
              on_screen: r.top >= 0 && r.bottom <= window.innerHeight});
  }
  return out; }"""
#: Titles of the form's sections a user sees.
SECTIONS_SHOWN = """() => Array.from(document.querySelectorAll('[id^=loraq_group_], #loraq_copier_passes'))
  .filter(e => e.offsetParent !== null && !e.id.endsWith('_advanced')).map(e => e.id)"""
#: Click the job's row and wait for its details on the page (selection cleared first): milliseconds.
CLICK_TO_SUMMARY_MS = """async () => {
  const summary = () => document.querySelector('#loraq_job_summary').innerText;
  const wait = async (done) => { const t = performance.now();
    while (!done() && performance.now() - t < 10000) await new Promise(r => setTimeout(r, 5)); };
  const box = document.querySelector('#loraq_selected_job textarea, #loraq_selected_job input');
  box.value = ''; box.dispatchEvent(new Event('input', {bubbles: true}));
  await wait(() => !summary().includes('job 1:'));
  await new Promise(r => setTimeout(r, 700));      // as a person clicks: not within the answers to the last click
  const t0 = performance.now();
  document.querySelector("tr.loraq-row[data-job-id='1'] td").click();
  await wait(() => summary().includes('job 1:'));
  const took = performance.now() - t0;
  window.loraqClickRequests = (window.loraqClickRequests || []).concat([performance.getEntriesByType('resource')
    .filter(e => e.startTime >= t0 - 1).map(e => [e.name.split('/').slice(-2).join('/'), Math.round(e.startTime - t0),
                                                  Math.round(e.duration)])]);
  return took; }"""
#: What identifies the loss plot's picture.
PLOT_KEY = """() => { const i = document.querySelector('#loraq_loss_plot svg');
  return i && i.querySelector('polyline') ? i.innerHTML.length + ':' + i.innerHTML.slice(-200) : ''; }"""
ANSWER_MS = """() => { const r = performance.getEntriesByType('resource')
  .filter(e => e.name.includes('/run/predict') || e.name.includes('/api/predict')).pop();
  return r ? r.responseEnd - r.startTime : 1e9; }"""


def ui_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_browser_session_on_demo_model_under_gradio_3_41(tmp_path):
    browser_session(tmp_path, "3.41")


def test_browser_session_on_demo_model_under_gradio_4_40(tmp_path):
    browser_session(tmp_path, "4.40")


def browser_session(tmp_path: Path, gradio: str) -> None:
    """The app is served by the gradio of A1111 (3.41.2) or of Forge (4.40.0); the browser is driven from
    the gradio-3 environment, which has playwright."""
    app_python = VENV_PYTHON if gradio == "3.41" else ROOT / ".venv-gradio4" / "bin" / "python"
    assert app_python.is_file(), f"{app_python} is missing: run ./dev setup (it builds the gradio envs)"
    assert VENV_PYTHON.is_file(), f"{VENV_PYTHON} is missing: run ./dev setup (it builds the gradio 3.41.2 env)"
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run ./dev setup (as root it installs Debian's chromium)"
    started = time.perf_counter()
    run = subprocess.run([str(VENV_PYTHON), __file__, str(tmp_path), str(app_python)], env=ui_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    print(run.stdout[-6000:], run.stderr[-6000:], sep="\n")
    assert run.returncode == 0, f"browser session failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    session = json.loads((tmp_path / "session.json").read_text())

    # An invalid job: both messages next to their fields, and nothing queued.
    assert "must be >= 1 (got 0)" in session["error_next_to_network_dim"]
    # Add to queue on the first screen of a 1366x768 laptop, in standard and in copier mode
    assert all(px <= 768 for px in session["add_bottom_px"].values()), session["add_bottom_px"]
    # only the mode's sections: no copier or LCM headers in standard mode, no dataset options for a copier
    assert "loraq_group_copier" not in session["sections_in_standard"], session["sections_in_standard"]
    assert "loraq_group_lcm" not in session["sections_in_standard"] and "loraq_copier_passes" not in \
        session["sections_in_standard"]
    assert {"loraq_group_copier", "loraq_copier_passes"} <= set(session["sections_in_copier"])
    assert "loraq_group_lcm" not in session["sections_in_copier"]
    assert len(session["thumbnails"]) == 2 and min(session["thumbnails"]) > 0, session["thumbnails"]
    assert all(n >= 1 for n in session["clear_buttons"].values()), session["clear_buttons"]
    # Errors in red, the fields outlined, the first on screen (network_dim, dataset_dir, sample_every_n_steps)
    seen = {e["key"]: e for e in session["errors_seen"]}
    assert {"network_dim", "dataset_dir", "sample_every_n_steps"} <= set(seen), session["errors_seen"]
    for e in seen.values():
        r, g, b = map(int, re.findall(r"\d+", e["color"])[:3])
        assert r > 150 and g < 80 and b < 80, e      # red (#b42318), not gradio's grey
        assert e["outlined"], e
    assert session["errors_seen"][0]["on_screen"], session["errors_seen"]
    # the one error left sits in the collapsed Previews section: opened, outlined and scrolled into view
    assert [e["key"] for e in session["deep_error_seen"]] == ["sample_every_n_steps"], session["deep_error_seen"]
    assert session["deep_error_seen"][0]["on_screen"] and session["deep_error_seen"][0]["outlined"]
    assert "dataset folder is required" in session["error_next_to_dataset_dir"]
    assert session["jobs_after_invalid_add"] == 0
    # The copier job ran to the end, and the page kept answering while it trained.
    assert session["progress_text"].startswith("100%")
    assert session["state"] == "done"
    assert session["loss_plot_shown"]
    # the selected job's summary and its outputs, several polls after the click
    summary = session["summary"]
    done = re.search(r"job 1: red_to_blue \(copier\) — done, step (\d+)/(\d+)", summary)
    assert done and done.group(1) == done.group(2), summary
    assert "output: red_to_blue.safetensors" in summary, summary
    assert session["selected_rows"] == 1, "the selected job's row lost its highlight"
    assert session["loss_plot_after_polls"]
    # While it trains: a click on its row shows its details (click to text on the page; the goal is 200 ms, measured
    # 270-480 ms median on a 2-core machine at load 6-13, see bench/README.md), the queue answers a refresh within
    # 200 ms, the plot moves, and the summary follows the steps.
    clicks = sorted(session["click_to_summary_ms"])
    assert len(clicks) >= 3 and clicks[len(clicks) // 2] <= 600 and clicks[-1] < 2500, clicks  # as many as the job lasts (<= 5)
    times = sorted(session["refresh_ms"])
    assert len(times) >= 2 and times[len(times) // 2] < 200, session["refresh_ms"]
    assert session["plots_while_training"] >= 2, session["plots_while_training"]
    running = [s for s in session["summaries_while_training"] if "running, step" in s]
    assert len({re.search(r"step (\d+)/", s).group(1) for s in running}) >= 2, session["summaries_while_training"]
    # A job that failed at its turn: its message, no traceback, still shown after the polls
    assert "dataset" in session["error_box"] and "Traceback" not in session["error_box"], session["error_box"]
    assert session["error_box_later"] == session["error_box"]
    # The grid: 7 strengths x 3 seeds of 64 px cells, upscaled to 128 px, below a label row.
    assert session["grid_size"][0] >= 7 * 128 and session["grid_size"][1] >= 3 * 128
    # the LoRA file by its name in the LoRA folder, not a cut-off absolute path; no grid of another job
    shown = session["checkpoint_shown"]
    assert "red_to_blue.safetensors" in shown and str(tmp_path) not in shown and "/" not in shown, shown
    assert session["grid_status_other_job"].strip() == ""
    # The merge of the difference and its copier.
    assert "merged 2 LoRAs" in session["merge_report"] and "total:" in session["merge_report"]
    assert session["merged_file_bytes"] > 10_000
    # The Resize section of the LoRA tools: the click named the merge there (the merge text kept its two lines)
    assert session["resize_report"].startswith("resized red_to_blue_merged.safetensors"), session["resize_report"]
    assert "rank 2" in session["resize_report"] and "total:" in session["resize_report"]
    assert session["merge_inputs_after_resize_click"] == "red_to_blue:1.0\nred_to_blue_copier:1.0"
    assert session["form_after_reload"] == "vanishing", "a reload must not lose the form"
    # Edit: the finished job came back as a new job of its own name + _2, the queued copy was changed in place
    assert "loaded as a new job" in session["edit_done"]["status"] and session["edit_done"]["pass1_steps"] == "60"
    assert session["edit_done"]["button"].strip() == "Add to queue"
    assert "✔ saved job 2" in session["edit_queued"]["status"], session["edit_queued"]
    assert session["edit_queued"]["button_after"].strip() == "Add to queue"
    assert session["rows_after_edit"] == 2
    assert session["stored_job_2"] == ["red_to_blue_2", "queued", 30], session["stored_job_2"]
    assert session["fresh_resolution"] == "64"
    assert "red_to_blue.safetensors" in session["train_status"], "Add to queue says where the LoRA will go"
    for name in SCREENSHOTS:
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
    # gradio 4.40's Tabs warn once each at page load (they try the selected tab before it registers); with a tab
    # without an id they warned at every poll while the LoRA tools' Extract, Bake or Merge showed (76 a session)
    assert session["console_warnings"]["non-interactive or hidden tab"] <= 2, session["console_warnings"]
    print(f"gradio {gradio}: click to details while training (ms): {clicks}, refresh answers (ms): {times}, "
          f"console warnings: {session['console_warnings']}, files picked twice: {session.get('picked_again')}")
    assert seconds < 180, f"the browser session took {seconds:.0f} s (budget 180 s)"


# ------------------------------------------------------------------------------------------------
# The results area (previews, comparison grid, morning sheet): its own session, so the form's session and
# this one change independently. A standard job with previews every 10 steps is queued into the app's store
# before the page opens (the form is tested above); the session watches it from the Queue tab.
# ------------------------------------------------------------------------------------------------

def test_results_area_under_gradio_3_41(tmp_path):
    results_session_checked(tmp_path, "3.41")


def test_results_area_under_gradio_4_40(tmp_path):
    results_session_checked(tmp_path, "4.40")


def results_session_checked(tmp_path: Path, gradio: str) -> None:
    app_python = VENV_PYTHON if gradio == "3.41" else ROOT / ".venv-gradio4" / "bin" / "python"
    assert app_python.is_file() and VENV_PYTHON.is_file(), "run ./dev setup (it builds the gradio envs)"
    started = time.perf_counter()
    run = subprocess.run([str(VENV_PYTHON), __file__, str(tmp_path), str(app_python), "results"], env=ui_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    print(run.stdout[-6000:], run.stderr[-6000:], sep="\n")
    assert run.returncode == 0, f"results session failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    facts = json.loads((tmp_path / "session.json").read_text())
    # The gallery shows the job's previews while it trains, and more of them as it goes on.
    assert facts["previews_while_running"] >= 1, facts
    assert facts["previews_at_end"] > facts["previews_while_running"], facts
    assert "step" in facts["preview_captions"][0] and facts["preview_captions"][-1] == "final", facts
    # The job's outputs list the preview files.
    assert any(o.endswith("squares.preview.png") for o in facts["outputs"]), facts["outputs"]
    # The grid's defaults come from the job: its preview prompt, its sampling; files relative to the LoRA folder.
    assert facts["grid_prompt"] == PROMPT
    assert "files: squares.safetensors" in facts["grid_status"] and "/tmp" not in facts["grid_status"], facts
    # 7 strengths x 3 seeds, then 2 strengths x 3 seeds: the grid follows the strengths typed.
    assert facts["grid_sizes"][0][0] >= 7 * 128 and facts["grid_sizes"][0][1] >= 3 * 128, facts["grid_sizes"]
    assert facts["grid_sizes"][1][0] < facts["grid_sizes"][0][0] - 4 * 128, facts["grid_sizes"]
    assert facts["grid_pixels_differ"], "the grid did not change when the strengths changed"
    assert "saved squares_grid.png" in facts["grid_status"], facts["grid_status"]
    # The morning sheet: shown in the tab and saved beside the LoRA.
    assert facts["morning_size"][0] >= 3 * 128 and facts["morning_size"][1] >= 2 * 3 * 128 + 200, facts["morning_size"]
    assert "squares.morning.png" in facts["morning_status"] and facts["morning_file_bytes"] > 10_000, facts
    assert "best" in facts["morning_status"], facts["morning_status"]
    assert seconds < 200, f"the results session took {seconds:.0f} s"


def results_session(out: Path, app_python: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    from trainer import jobs
    from trainer.models.demo.shapes import draw
    from trainer.queue.admission import Admission
    from trainer.queue.store import JobQueue

    out.mkdir(parents=True, exist_ok=True)
    images, data = out / "squares", out / "data"
    images.mkdir(exist_ok=True)
    for i, colour in enumerate(("red", "red")):
        draw(colour, "square", "white", 64).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(PROMPT)
    job = jobs.StandardJob(name="squares", dataset_dir=str(images), resolution=64, min_bucket_reso=64,
                           max_bucket_reso=128, steps=80, lr=5e-3, network_dim=4, network_alpha=4.0,
                           save_every_n_steps=40, sample_every_n_steps=20, sample_prompts=[PROMPT], seed=1)
    queue = JobQueue(data / "queue.sqlite")
    job_id = queue.add(job, admission=Admission(data / "loras"))
    queue.close()
    port = free_port()
    log = open(out / "app.log", "w")
    app = subprocess.Popen([app_python, "-m", "trainer", "ui", "--model", "demo", "--port", str(port),
                            "--data", str(data), "--threads", "1"], cwd=ROOT, env=ui_env(), stdout=log, stderr=log)
    facts: dict = {}
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, app)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.wait_for_selector("#loraq_add")

            def box(elem_id: str):
                return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox])").first

            def el(elem_id: str):
                return page.locator(f"#{elem_id}").first

            page.locator(".tab-nav button", has_text="Queue").first.click()
            table = el("loraq_queue_table")
            table.locator("tr.loraq-row", has_text="squares").click()
            expect(box("loraq_selected_job")).to_have_value(str(job_id), timeout=10_000)
            previews = page.locator("#loraq_previews img")
            # 1. While the job trains, its previews appear in the gallery (the poll brings them).
            deadline = time.time() + 120
            while time.time() < deadline:
                shown, state = previews.count(), queue_state(data, job_id)
                if shown and state == "running":
                    facts["previews_while_running"] = shown
                    break
                if state in ("done", "failed"):
                    break
                time.sleep(0.5)
            wait_for_state(data, job_id, ("done", "failed"), 150)
            facts["state"] = queue_state(data, job_id)
            expect(page.locator("#loraq_previews img")).to_have_count(4, timeout=15_000)  # steps 20, 40, 60 + final
            facts["previews_at_end"] = previews.count()
            facts["preview_captions"] = [c.strip() for c in page.locator("#loraq_previews .caption-label, "
                                                                         "#loraq_previews figcaption").all_inner_texts()]
            page.locator("#loraq_previews").scroll_into_view_if_needed()
            page.screenshot(path=str(out / "7_previews.png"))
            facts["outputs"] = JobQueue(data / "queue.sqlite").get(job_id).outputs

            # 2. The comparison grid: the job's prompt and final LoRA by default; new strengths give a new grid.
            expect(box("loraq_grid_prompt")).to_have_value(PROMPT, timeout=10_000)
            facts["grid_prompt"] = box("loraq_grid_prompt").input_value()
            grid = page.locator("#loraq_grid img")
            sizes, pixels = [], []
            for strengths in ("-1, -0.5, 0, 0.5, 1, 1.5, 2", "0, 2"):
                field = box("loraq_grid_strengths")
                field.fill(strengths)
                field.press("Tab")
                page.click("#loraq_grid_generate")
                expect(el("loraq_grid_status")).to_contain_text(f"x {len(strengths.split(','))} strengths",
                                                                timeout=90_000)
                expect(grid).to_be_visible(timeout=10_000)
                sizes.append(page.evaluate("() => { const i = document.querySelector('#loraq_grid img');"
                                           " return [i.naturalWidth, i.naturalHeight]; }"))
                pixels.append(page.evaluate(CELL_PIXELS))
            facts["grid_sizes"], facts["grid_status"] = sizes, el("loraq_grid_status").inner_text()
            facts["grid_pixels_differ"] = pixels[0] != pixels[1]
            page.locator("#loraq_grid").scroll_into_view_if_needed()
            page.screenshot(path=str(out / "8_grid_strengths.png"))

            # 3. The morning sheet.
            box("loraq_grid_strengths").fill("0, 1, 2")    # 2 checkpoints x 3 strengths x 3 seeds: quick
            box("loraq_grid_strengths").press("Tab")
            page.click("#loraq_morning_generate")
            expect(el("loraq_morning_status")).to_contain_text("✔", timeout=120_000)
            facts["morning_status"] = el("loraq_morning_status").inner_text()
            el("loraq_morning").scroll_into_view_if_needed()   # gradio 4 loads the (tall) picture lazily
            page.wait_for_function("() => { const i = document.querySelector('#loraq_morning img');"
                                   " return i && i.complete && i.naturalWidth > 0; }", timeout=20_000)
            facts["morning_size"] = page.evaluate("() => { const i = document.querySelector('#loraq_morning img');"
                                                  " return [i.naturalWidth, i.naturalHeight]; }")
            sheet = data / "loras" / "squares.morning.png"
            facts["morning_file_bytes"] = sheet.stat().st_size if sheet.exists() else 0
            page.locator("#loraq_morning").scroll_into_view_if_needed()
            page.screenshot(path=str(out / "9_morning.png"))
            browser.close()
    finally:
        (out / "session.json").write_text(json.dumps(facts, indent=1))
        app.terminate()
        try:
            app.wait(15)
        except subprocess.TimeoutExpired:
            app.kill()
        log.close()
    if os.environ.get("LORAQ_UPDATE_SCREENSHOTS") == "1":
        shots = ROOT / "docs" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        for name in ("7_previews", "8_grid_strengths", "9_morning"):
            shutil.copyfile(out / f"{name}.png", shots / f"{name}.png")


#: A digest of the grid as drawn in the browser (a 32 x 32 thumbnail's pixels): changes when its images change.
CELL_PIXELS = """() => { const i = document.querySelector('#loraq_grid img'); const c = document.createElement('canvas');
  c.width = 32; c.height = 32; const x = c.getContext('2d'); x.drawImage(i, 0, 0, 32, 32);
  return Array.from(x.getImageData(0, 0, 32, 32).data).join(','); }"""


def queue_state(data: Path, job_id: int) -> str:
    from trainer.queue.store import JobQueue

    q = JobQueue(data / "queue.sqlite")
    try:
        return q.get(job_id).state
    finally:
        q.close()


def wait_for_state(data: Path, job_id: int, states, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and queue_state(data, job_id) not in states:
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# The session itself: runs in .venv-gradio3 (python tests/test_ui_browser.py OUT)
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, app: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"the app exited with {app.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def session(out: Path, app_python: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect, sync_playwright

    from trainer import jobs
    from trainer.models.demo.shapes import draw

    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    images.mkdir(exist_ok=True)
    draw("red", "circle", "white", 64).save(images / "red_circle.png")
    draw("blue", "circle", "white", 64).save(images / "blue_circle.png")
    data = out / "data"
    port = free_port()
    log = open(out / "app.log", "w")
    app = subprocess.Popen([app_python, "-m", "trainer", "ui", "--model", "demo", "--port", str(port),
                            "--data", str(data), "--threads", "1"], cwd=ROOT, env=ui_env(), stdout=log, stderr=log)
    facts: dict = {}
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, app)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1366, "height": 768})   # a common laptop screen
            page.set_default_timeout(30_000)
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.goto(url)
            page.wait_for_selector("#loraq_add")

            def box(elem_id: str):
                return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox])").first

            def fill(elem_id: str, value) -> None:
                field = box(elem_id)
                field.fill(str(value))
                field.press("Tab")

            def el(elem_id: str):
                return page.locator(f"#{elem_id}").first    # gradio 3 repeats a markdown's id inside it

            def tab(title: str):
                return page.locator(".tab-nav button", has_text=title).first

            def shot(name: str, full: bool = True) -> None:
                page.screenshot(path=str(out / f"{name}.png"), full_page=full)

            # 0. On the 64 px demo model a fresh form starts at 64 px (at 512 a job takes hours on a CPU).
            expect(box("loraq_f_resolution")).to_have_value("64", timeout=15_000)
            facts["fresh_resolution"] = box("loraq_f_resolution").input_value()
            standard_sections = page.evaluate(SECTIONS_SHOWN)

            def bottom_of(elem_id: str) -> float:
                return page.evaluate(f"() => document.querySelector('#{elem_id}').getBoundingClientRect().bottom")

            # 1. The form's top holds what a job needs: Add to queue is on the first screen.
            facts["add_bottom_px"] = {"standard": bottom_of("loraq_add")}

            # An invalid standard job: rank 0 and no dataset folder, and a preview interval of -5 set in the
            # collapsed Previews section.
            section = page.locator("#loraq_group_preview").get_by_text("Previews").first
            section.click()
            fill("loraq_f_sample_every_n_steps", -5)
            section.click()
            fill("loraq_f_network_dim", 0)
            page.click("#loraq_add")
            error_dim = el("loraq_err_network_dim")
            expect(error_dim).to_contain_text("must be >= 1", timeout=15_000)
            time.sleep(0.6)   # the page script outlines the fields and scrolls once the answer has rendered
            facts["error_next_to_network_dim"] = error_dim.inner_text()
            facts["error_next_to_dataset_dir"] = el("loraq_err_dataset_dir").inner_text()
            facts["errors_seen"] = page.evaluate(ERRORS_SEEN)
            shot("1_invalid_job", full=False)
            # Only the error in the collapsed section is left: its section opens and the page scrolls to it.
            fill("loraq_f_network_dim", 16)
            fill("loraq_f_dataset_dir", str(images))
            page.evaluate("() => window.scrollTo(0, 0)")
            page.click("#loraq_add")
            expect(el("loraq_train_status")).to_contain_text("1 field to fix", timeout=15_000)
            time.sleep(0.6)
            facts["deep_error_seen"] = page.evaluate(ERRORS_SEEN)
            fill("loraq_f_sample_every_n_steps", 0)

            # 2. The copier job: two uploaded images, tiny passes.
            page.evaluate("() => window.scrollTo(0, 0)")
            page.locator("#loraq_mode label", has_text="copier").click()
            expect(page.locator("#loraq_f_image_a")).to_be_visible()
            facts["sections_in_standard"] = standard_sections
            facts["sections_in_copier"] = page.evaluate(SECTIONS_SHOWN)
            fill("loraq_f_name", "red_to_blue")
            fill("loraq_f_resolution", 64)
            # A, then B, as a user picks them; their previews show beside the passes' settings
            facts["picked_again"] = []
            for key, picture in (("image_a", "red_circle.png"), ("image_b", "blue_circle.png")):
                picker = page.locator(f"#loraq_f_{key} input[type=file]")
                try:   # gradio renders the picker only while the field holds no file
                    picker.wait_for(state="attached", timeout=60_000)
                except PlaywrightTimeout:
                    raise AssertionError(f"no file picker in {key} after 60 s; the field shows: " + page.evaluate(
                        f"() => document.querySelector('#loraq_f_{key}').outerHTML.slice(0, 1500)")) from None
                picker.set_input_files(str(images / picture))
                try:
                    expect(page.locator(f"#loraq_thumbs_{key} img")).to_have_count(1, timeout=25_000)
                except AssertionError:
                    # gradio 3.41's upload can stall on a loaded machine (its /upload answered, no change event
                    # sent); a user picks the file again, and so do we, once, and the session reports it
                    facts["picked_again"].append(key)
                    again = page.locator(f"#loraq_f_{key} input[type=file]")
                    if again.count() == 0:   # it holds the file and sent nothing: cleared first, as a user would
                        page.locator(f"#loraq_f_{key} button[aria-label='Clear']").first.click()
                        again.wait_for(state="attached", timeout=30_000)
                    again.set_input_files(str(images / picture))
                    expect(page.locator(f"#loraq_thumbs_{key} img")).to_have_count(1, timeout=40_000)
                # the button the retry above clears a held file with (checked on every run: the retry is rare)
                facts.setdefault("clear_buttons", {})[key] = page.locator(
                    f"#loraq_f_{key} button[aria-label='Clear']").count()
            for key, value in (("steps", 60), ("network_dim", 4), ("network_alpha", 4), ("lr", 0.002),
                               ("batch_size", 1)):
                fill(f"loraq_f_copier_pass__{key}", value)
            fill("loraq_f_difference_pass__network_dim", 4)
            fill("loraq_f_difference_pass__network_alpha", 4)
            facts["add_bottom_px"]["copier"] = bottom_of("loraq_add")
            facts["thumbnails"] = page.evaluate(
                "() => Array.from(document.querySelectorAll('.loraq-thumb img')).map(i => i.naturalWidth)")
            shot("2_copier_job", full=False)
            page.locator("#loraq_group_copier").get_by_text(jobs.GROUPS["copier"]).first.click()
            fill("loraq_f_prompt", PROMPT)
            page.locator("#loraq_f_save_copier input[type=checkbox]").check()
            status = el("loraq_train_status")
            page.click("#loraq_add")
            page.wait_for_function(   # this answer, not step 1's refusal of 2 fields still on the page
                "() => { const t = document.querySelector('#loraq_train_status').innerText;"
                " return t.includes('✔ queued') || (t.includes('not queued') && !t.includes('2 fields')); }",
                timeout=30_000)
            # gradio 3.41 may hand over an image picked a moment ago before its upload finished: the form says
            # so next to the image, and a user clicks again once it has arrived; so does this session (once).
            if "not queued" in status.inner_text():
                facts["add_retried_because"] = [t for t in page.evaluate(
                    "() => Array.from(document.querySelectorAll('[id^=loraq_err_]')).map(e => e.id + ': ' + e.textContent)")
                    if "⚠" in t]
                assert any("still be uploading" in t for t in facts["add_retried_because"]), \
                    (status.inner_text(), facts["add_retried_because"])
                time.sleep(2)
                page.click("#loraq_add")
            expect(status).to_contain_text("✔ queued", timeout=15_000)
            facts["train_status"] = el("loraq_train_status").inner_text()

            # 3. The queue while the job trains: a click on its row shows its details (timed, click to text on the
            # page), the queue answers a refresh quickly, and the loss plot moves with the training.
            tab("Queue").click()
            table = el("loraq_queue_table")
            expect(table).to_contain_text("red_to_blue", timeout=15_000)
            facts["jobs_after_invalid_add"] = table.locator("tr.loraq-row").count() - 1
            click_ms, refresh_ms, plots, steps = [], [], [], []
            deadline = time.time() + 150
            while time.time() < deadline:
                text = table.inner_text()
                if "done" in text or "failed" in text:
                    break
                if "running" in text:
                    # clicks and refreshes alternate, so a job that ends early still leaves both measured
                    if len(click_ms) < 5 and (len(click_ms) <= len(refresh_ms) or len(refresh_ms) >= 3):
                        click_ms.append(round(page.evaluate(CLICK_TO_SUMMARY_MS), 1))
                    elif len(refresh_ms) < 3:
                        # The answer time as the browser saw it: request sent -> response received.
                        with page.expect_response(lambda r: "/run/predict" in r.url or "/api/predict" in r.url):
                            page.click("#loraq_queue_refresh")
                        refresh_ms.append(round(page.evaluate(ANSWER_MS), 1))
                    if click_ms:     # selected: what the page shows of it as it trains
                        plots.append(page.evaluate(PLOT_KEY))
                        steps.append(el("loraq_job_summary").inner_text())
                        if len(set(p for p in plots if p)) == 2 and "4_loss_plot" not in facts:
                            el("loraq_loss_plot").scroll_into_view_if_needed()
                            shot("4_loss_plot", full=False)
                            facts["4_loss_plot"] = True
                time.sleep(0.3)
            facts["click_to_summary_ms"], facts["refresh_ms"] = click_ms, refresh_ms
            facts["click_requests"] = page.evaluate("() => window.loraqClickRequests")
            facts["plots_while_training"] = len(set(p for p in plots if p))
            facts["summaries_while_training"] = steps
            row = table.locator("tr.loraq-row[data-job-id='1']")
            expect(row).to_contain_text("100%", timeout=10_000)
            facts["progress_text"] = row.locator(".loraq-bar-text").inner_text()
            facts["state"] = row.locator(".loraq-state").inner_text()
            page.evaluate("() => window.scrollTo(0, 0)")
            shot("3_queue_done", full=False)

            # 4. The selected job, done: its summary, outputs and plot, still there several polls later (gradio
            # 3.41 re-runs polls with the page-load values unless they read server-side state).
            # selected while it ran: select it again for its files (the results panel lists them on a selection)
            fill("loraq_selected_job", "")
            expect(el("loraq_job_summary")).not_to_contain_text("job 1:", timeout=10_000)
            row.click()
            expect(box("loraq_selected_job")).to_have_value("1", timeout=10_000)
            plot = page.locator("#loraq_loss_plot svg polyline").first
            expect(plot).to_be_visible(timeout=20_000)
            facts["loss_plot_shown"] = plot.is_visible()
            time.sleep(3.5)
            facts["summary"] = el("loraq_job_summary").inner_text()
            facts["selected_rows"] = table.locator("tr.loraq-selected").count()
            facts["loss_plot_after_polls"] = plot.is_visible()
            if "4_loss_plot" not in facts:      # the assertion on plots_while_training says why
                shot("4_loss_plot", full=False)

            # 5. The comparison grid on the job's own model.
            expect(page.locator("#loraq_grid_prompt textarea, #loraq_grid_prompt input").first).to_have_value(
                PROMPT, timeout=10_000)
            facts["checkpoint_shown"] = el("loraq_checkpoint").inner_text()   # a multiselect: its chosen chips
            page.click("#loraq_grid_generate")
            grid = page.locator("#loraq_grid img")
            expect(grid).to_be_visible(timeout=90_000)
            facts["grid_status"] = el("loraq_grid_status").inner_text()
            facts["grid_size"] = page.evaluate(
                "() => { const i = document.querySelector('#loraq_grid img'); return [i.naturalWidth, i.naturalHeight]; }")
            page.locator("#loraq_grid").scroll_into_view_if_needed()
            shot("5_grid")

            # 5b. Edit: the finished job into the form becomes a new job; a queued one is saved back in place.
            page.click("#loraq_q_pause")    # the queue takes no next job: the edited ones stay queued
            expect(el("loraq_queue_status")).to_contain_text("takes no next job", timeout=10_000)
            page.click("#loraq_op_edit")
            expect(box("loraq_f_name")).to_have_value("red_to_blue_2", timeout=10_000)
            facts["edit_done"] = {"status": el("loraq_train_status").inner_text(),  # pass-1 steps 60 as queued
                                  "mode": page.locator("#loraq_mode input:checked").get_attribute("value")
                                  if page.locator("#loraq_mode input:checked").count() else None,
                                  "pass1_steps": box("loraq_f_copier_pass__steps").input_value(),
                                  "button": page.locator("#loraq_add").inner_text()}
            page.click("#loraq_add")
            expect(el("loraq_train_status")).to_contain_text("✔ queued", timeout=15_000)
            tab("Queue").click()
            copy = table.locator("tr.loraq-row[data-job-id='2']")
            expect(copy).to_contain_text("red_to_blue_2", timeout=10_000)
            copy.click()
            expect(box("loraq_selected_job")).to_have_value("2", timeout=10_000)
            # another job selected: job 1's grid is gone, not shown under job 2
            expect(page.locator("#loraq_grid img")).to_have_count(0, timeout=10_000)
            facts["grid_status_other_job"] = el("loraq_grid_status").inner_text()
            page.click("#loraq_op_edit")
            expect(page.locator("#loraq_add")).to_have_text("Save job 2", timeout=10_000)
            fill("loraq_f_copier_pass__steps", 30)
            page.click("#loraq_add")
            expect(el("loraq_train_status")).to_contain_text("✔ saved job 2", timeout=15_000)
            facts["edit_queued"] = {"status": el("loraq_train_status").inner_text(),
                                    "button_after": page.locator("#loraq_add").inner_text()}
            tab("Queue").click()
            expect(table).to_contain_text("red_to_blue_2", timeout=10_000)
            facts["rows_after_edit"] = table.locator("tr.loraq-row").count()
            from trainer.queue.store import JobQueue
            stored = JobQueue(data / "queue.sqlite").get(2)
            facts["stored_job_2"] = [stored.name, stored.state, stored.job.copier_pass.steps]

            # 6. Merge the difference with its copier (clicks on the list add name:1.0).
            tab("LoRA tools").click()
            page.click("#loraq_lora_refresh")
            page.locator(".loraq-lora[data-name='red_to_blue']").click()
            page.locator(".loraq-lora[data-name='red_to_blue_copier']").click()
            expect(box("loraq_merge_inputs")).to_have_value("red_to_blue:1.0\nred_to_blue_copier:1.0")
            fill("loraq_merge_output", "red_to_blue_merged")
            page.click("#loraq_merge_run")
            report = box("loraq_merge_report")
            expect(report).to_have_value(__import__("re").compile("total:"), timeout=60_000)
            facts["merge_report"] = report.input_value()
            merged = data / "loras" / "red_to_blue_merged.safetensors"
            facts["merged_file_bytes"] = merged.stat().st_size if merged.exists() else 0
            shot("6_merge")

            # 6b. Resize the merge in the Resize section: a click on the list names the LoRA to resize there.
            tab("Resize").click()
            page.click("#loraq_lora_refresh")
            page.locator(".loraq-lora[data-name='red_to_blue_merged']").click()
            expect(box("loraq_resize_input")).to_have_value("red_to_blue_merged")
            fill("loraq_resize_rank", 2)
            fill("loraq_resize_output", "red_to_blue_r2")
            page.click("#loraq_resize_run")
            resized = box("loraq_resize_report")
            expect(resized).to_have_value(__import__("re").compile("total:"), timeout=60_000)
            facts["resize_report"] = resized.input_value()
            facts["merge_inputs_after_resize_click"] = box("loraq_merge_inputs").input_value()

            # 6c. A job that fails at its turn (its dataset vanished after it was queued): the error box stays.
            tab("Train").click()
            page.locator("#loraq_mode label", has_text="standard").click()
            vanishing = out / "vanishing"
            vanishing.mkdir()
            draw("red", "circle", "white", 64).save(vanishing / "a.png")
            (vanishing / "a.txt").write_text(PROMPT)
            fill("loraq_f_name", "vanishing")
            fill("loraq_f_dataset_dir", str(vanishing))
            fill("loraq_f_steps", 5)
            page.click("#loraq_add")
            expect(el("loraq_train_status")).to_contain_text("✔ queued **vanishing**".replace("**", ""),
                                                           timeout=15_000)
            shutil.rmtree(vanishing)
            tab("Queue").click()
            table.locator("tr.loraq-row[data-job-id='2']").click()   # the edited copy is not run: deleted
            expect(box("loraq_selected_job")).to_have_value("2", timeout=10_000)
            page.click("#loraq_op_delete")
            expect(el("loraq_queue_status")).to_contain_text("job 2 deleted", timeout=10_000)
            page.click("#loraq_q_resume")
            failed = table.locator("tr.loraq-row[data-job-id='3']")
            expect(failed).to_contain_text("failed", timeout=60_000)
            failed.click()
            error_box = page.locator("#loraq_job_error textarea")
            expect(error_box).to_be_visible(timeout=10_000)
            facts["error_box"] = error_box.input_value()
            time.sleep(4.5)     # two detail polls and four table polls later
            facts["error_box_later"] = error_box.input_value() if error_box.is_visible() else None
            facts["console_warnings"] = {w: sum(w in m for m in console) for w in ("Too many arguments",
                                                                                    "non-interactive or hidden tab")}

            # 7. A reload keeps the form as last queued, and lists the built-in presets.
            page.reload()
            page.wait_for_selector("#loraq_add")
            expect(box("loraq_f_name")).to_have_value("vanishing", timeout=15_000)
            facts["form_after_reload"] = box("loraq_f_name").input_value()
            browser.close()
    finally:
        (out / "session.json").write_text(json.dumps(facts, indent=1))
        app.terminate()
        try:
            app.wait(15)
        except subprocess.TimeoutExpired:
            app.kill()
        log.close()
    # The README's pictures are refreshed on request only, so a test run leaves the work tree alone:
    # LORAQ_UPDATE_SCREENSHOTS=1 ./dev test tests/test_ui_browser.py
    if os.environ.get("LORAQ_UPDATE_SCREENSHOTS") == "1":
        shots = ROOT / "docs" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        for name in SCREENSHOTS:
            shutil.copyfile(out / f"{name}.png", shots / f"{name}.png")


if __name__ == "__main__":
    if sys.argv[3:] == ["results"]:
        results_session(Path(sys.argv[1]), sys.argv[2])
    else:
        session(Path(sys.argv[1]), sys.argv[2])
