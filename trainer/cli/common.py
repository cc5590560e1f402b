"""What the commands share: reading job files, printing job errors, the progress bar. No torch."""
from __future__ import annotations

import sys
from pathlib import Path

from trainer import jobs


class ProgressBar:
    """tqdm progress bar fed by the loop's progress events (one bar per pass)."""

    def __init__(self):
        self.bar, self.phase = None, None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None or p.phase != self.phase:
            self.close()
            self.bar, self.phase = tqdm(total=p.total, desc=p.phase or "training", unit="step", file=sys.stderr), p.phase
        self.bar.update(p.step - self.bar.n)
        self.bar.set_postfix(loss=f"{p.smoothed_loss:.4f}", lr=f"{p.lr:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_job_error(e: jobs.JobError) -> None:
    if e.errors:
        print("error: the job has problems:", file=sys.stderr)
        for field, message in e.errors.items():
            print(f"  {field}: {message}", file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)


def load_job(path: str) -> jobs.Job:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise jobs.JobError(f"cannot read job file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise jobs.JobError(f"job file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                            "save it as UTF-8 (any editor's 'save with encoding')") from None
    return jobs.job_from_json(text)
