"""What the queue panel shows, as pure functions of the store's rows: the table and the loss plot."""
from __future__ import annotations

import datetime
import html
import math
import time
from typing import Sequence

from trainer.queue.store import JobRow, ProgressRow

COLUMNS = ("id", "name", "mode", "state", "progress", "loss", "ETA", "started", "took")


def format_eta(seconds: float | None) -> str:
    """``3725`` -> ``"1:02:05"``; ``75`` -> ``"1:15"``; unknown -> ``"-"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def clock(t: float | None, now: float | None = None) -> str:
    """A start time as people read a night's queue: ``23:14`` today, ``Mon 23:14`` on another day."""
    if not t:
        return "-"
    when = datetime.datetime.fromtimestamp(t)
    today = datetime.datetime.fromtimestamp(now if now is not None else time.time()).date()
    return when.strftime("%H:%M") if when.date() == today else when.strftime("%a %H:%M")


def took(row: JobRow, now: float | None = None) -> str:
    """How long the job ran: to its end, or so far while it runs."""
    if not row.started:
        return "-"
    end = row.finished if row.finished else (now if now is not None else time.time()) if row.state == "running" else None
    return format_eta(end - row.started) if end else "-"


def queue_summary(rows: Sequence[JobRow], seconds_left: float | None, paused: bool) -> str:
    """One line above the table: counts by state, the queued work's total time, and whether the queue is paused."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    parts = [f"{n} {state}" for state, n in counts.items()]
    text = ", ".join(parts) if parts else "no jobs"
    if seconds_left:
        text += f" — queued work about {format_eta(seconds_left)} at the latest speed"
    if paused:
        text += " — ⏸ paused: the queue takes no next job (Resume queue)"
    return text


def percent_done(row: JobRow) -> int:
    """Progress in whole percent: step / total, 100 for a finished job that ran all its steps."""
    if row.state == "done" and (not row.total or row.step >= row.total):
        return 100
    if not row.total:
        return 0
    return max(0, min(100, int(100 * row.step / row.total)))


def queue_table_html(rows: Sequence[JobRow], selected: int | None = None) -> str:
    """The queue as an HTML table; a click on a row selects the job (javascript/loraq.js)."""
    if not rows:
        return '<div class="loraq-empty">The queue is empty: add a job in the Train tab.</div>'
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        pct = percent_done(r)
        loss = f"{r.smoothed_loss:.4f}" if r.smoothed_loss is not None else "-"
        eta = format_eta(r.eta_s) if r.state == "running" else "-"
        phase = f" {html.escape(r.phase)}" if r.phase and r.state == "running" else ""
        bar = (f'<div class="loraq-bar" role="progressbar" aria-valuenow="{pct}" aria-valuemin="0" aria-valuemax="100">'
               f'<div class="loraq-bar-fill loraq-state-{r.state}" style="width:{pct}%"></div>'
               f'<span class="loraq-bar-text">{pct}%{phase}</span></div>')
        cls = "loraq-row" + (" loraq-selected" if r.id == selected else "")
        title = html.escape(r.error or "", quote=True)
        body.append(f'<tr class="{cls}" data-job-id="{r.id}" title="{title}"><td>{r.id}</td>'
                    f"<td>{html.escape(r.name)}</td><td>{r.mode}</td>"
                    f'<td><span class="loraq-state loraq-state-{r.state}">{r.state}</span></td>'
                    f"<td>{bar}</td><td>{loss}</td><td>{eta}</td><td>{clock(r.started)}</td><td>{took(r)}</td></tr>")
    return (f'<table class="loraq-queue-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def loss_figure(progress: Sequence[ProgressRow], title: str = ""):
    """Loss (raw and smoothed) and learning rate over the steps, one line per phase (copier passes)."""
    from matplotlib.figure import Figure   # a bare Figure needs no backend: no global matplotlib state

    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax_lr = ax.twinx()
    phases = list(dict.fromkeys(p.phase for p in progress))
    for i, phase in enumerate(phases):
        rows = [p for p in progress if p.phase == phase]
        steps = [p.step for p in rows]
        label = f"{phase} " if phase else ""
        colour = f"C{2 * i}"
        ax.plot(steps, [_nan(p.loss) for p in rows], color=colour, alpha=0.3, linewidth=0.8, label=f"{label}loss (raw)")
        ax.plot(steps, [_nan(p.smoothed_loss) for p in rows], color=colour, linewidth=1.8,
                label=f"{label}loss (smoothed)")
        ax_lr.plot(steps, [_nan(p.lr) for p in rows], color=f"C{2 * i + 1}", linestyle="--", linewidth=1,
                   label=f"{label}lr")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if not progress:
        ax.text(0.5, 0.5, "no steps recorded yet", ha="center", va="center", transform=ax.transAxes)
    else:
        lines = ax.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x
