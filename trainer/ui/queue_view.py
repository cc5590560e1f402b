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


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def loss_svg(progress: Sequence[ProgressRow], title: str = "", width: int = 720, height: int = 300,
             max_points: int = 400) -> str:
    """The loss plot of :func:`loss_figure` as inline SVG: a few milliseconds of string formatting where matplotlib
    takes most of a second of the interpreter, which every poll of a training job would take from the page's
    other answers. Raw and smoothed loss on the left axis, learning rate (dashed) on the right, one colour per phase."""
    left, right, top, bottom = 64, 72, 26, 38
    w, h = width - left - right, height - top - bottom
    phases = list(dict.fromkeys(p.phase for p in progress))
    steps = [p.step for p in progress]
    losses = [v for p in progress for v in (p.loss, p.smoothed_loss) if v is not None and math.isfinite(v)]
    rates = [p.lr for p in progress if p.lr is not None and math.isfinite(p.lr)]
    out = [f'<svg class="loraq-plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="100%" style="max-width:{width}px" role="img" aria-label="{html.escape(title or "loss plot")}">',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="currentColor" stroke-opacity="0.4"/>']
    if title:
        out.append(f'<text x="{left + w / 2}" y="16" text-anchor="middle" font-size="12">{html.escape(title)}</text>')
    if not steps or not losses:
        out.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" font-size="12">'
                   "no steps recorded yet</text></svg>")
        return "".join(out)
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = _padded(min(losses), max(losses))
    r0, r1 = _padded(0.0, max(rates)) if rates else (0.0, 1.0)

    def sx(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * w

    def sy(value: float, low: float, high: float) -> float:
        return top + h - (value - low) / (high - low) * h

    for i, tick in enumerate(_ticks(x0, x1)):
        out.append(f'<text x="{sx(tick):.1f}" y="{top + h + 14}" text-anchor="middle" font-size="10">{tick:g}</text>')
    for tick in _ticks(y0, y1):
        y = sy(tick, y0, y1)
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor" '
                   f'stroke-opacity="0.1"/><text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="10">'
                   f"{tick:.3g}</text>")
    if rates:
        for tick in _ticks(r0, r1):
            out.append(f'<text x="{left + w + 4}" y="{sy(tick, r0, r1) + 3:.1f}" font-size="10">{tick:.2g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle" font-size="11">step</text>'
               f'<text x="14" y="{top + h / 2}" font-size="11" transform="rotate(-90 14 {top + h / 2})" '
               f'text-anchor="middle">loss</text><text x="{width - 8}" y="{top + h / 2}" font-size="11" '
               f'transform="rotate(90 {width - 8} {top + h / 2})" text-anchor="middle">learning rate</text>')
    legend = []
    for i, phase in enumerate(phases):
        rows = [p for p in progress if p.phase == phase]
        rows = rows[::max(1, math.ceil(len(rows) / max_points))] + ([rows[-1]] if len(rows) > max_points else [])
        label = f"{phase} " if phase else ""
        loss_colour, lr_colour = _COLOURS[(2 * i) % len(_COLOURS)], _COLOURS[(2 * i + 1) % len(_COLOURS)]
        for attr, style, name in (("loss", 'stroke-width="0.8" stroke-opacity="0.35"', "loss (raw)"),
                                  ("smoothed_loss", 'stroke-width="1.8"', "loss (smoothed)")):
            points = _points([(sx(p.step), sy(getattr(p, attr), y0, y1)) for p in rows
                              if getattr(p, attr) is not None and math.isfinite(getattr(p, attr))])
            if points:
                out.append(f'<polyline fill="none" stroke="{loss_colour}" {style} points="{points}"/>')
                legend.append((loss_colour, "", label + name))
        points = _points([(sx(p.step), sy(p.lr, r0, r1)) for p in rows if p.lr is not None and math.isfinite(p.lr)])
        if points:
            out.append(f'<polyline fill="none" stroke="{lr_colour}" stroke-width="1" stroke-dasharray="4 3" '
                       f'points="{points}"/>')
            legend.append((lr_colour, ' stroke-dasharray="4 3"', label + "lr"))
    if legend:
        out.append(f'<rect class="loraq-plot-legend" x="{left + w - 154}" y="{top + 3}" width="150" '
                   f'height="{12 * len(legend) + 4}"/>')
    for i, (colour, dash, name) in enumerate(legend):
        y = top + 10 + 12 * i
        out.append(f'<line x1="{left + w - 150}" x2="{left + w - 132}" y1="{y}" y2="{y}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/><text x="{left + w - 128}" y="{y + 3}" font-size="9">'
                   f"{html.escape(name)}</text>")
    out.append("</svg>")
    return "".join(out)


def _points(xy: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)


def _padded(low: float, high: float) -> tuple[float, float]:
    span = high - low
    if span <= 0:
        span = abs(high) or 1.0
    return low - 0.05 * span, high + 0.05 * span


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values inside [low, high] about ``count`` apart, as an axis shows them."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step) + 1)]
