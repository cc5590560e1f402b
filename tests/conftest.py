"""Test-wide settings: offline, one torch thread (tiny models; shared 2-core machines)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# The commands the tests start (python -m trainer ..., the apps) on one thread too: two workers share two cores,
# and a second thread per process only makes them take turns.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# Tests whose assertions are times (a click answered in 600 ms, a sample in 1 s, a cancel within 2 s). `./dev test`
# runs the rest on two workers, then these alone, so that the other worker's training never sits on their core.
TIMING = {
    "test_ui_browser.py": None,           # every browser session measures click-to-update and refresh times
    "test_demo_model.py": {"test_sampling_is_fast"},
    "test_cli.py": {"test_queue_list_answers_in_half_a_second"},
    "test_queue.py": {"test_listing_10000_finished_jobs_takes_under_50_ms",
                      "test_cancel_takes_effect_within_2_s_while_latents_are_cached_or_the_lcm_teacher_generates",
                      "test_freeing_memory_between_jobs_takes_little_time_on_a_big_heap"},
    "test_ui_build.py": {"test_the_loss_plot_draws_each_phase_in_milliseconds"},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "timing: asserts a time; run alone (see TIMING in tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        names = TIMING.get(item.path.name, ())
        if names is None or item.originalname in names:
            item.add_marker(pytest.mark.timing)
