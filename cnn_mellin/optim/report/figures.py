"""The figures of ``optim report``, one function per figure.

Each function takes what it shows (trials, settings, importances) and returns a
:class:`Chart`: a plotly figure, or a note saying why the study has none (no completed
trial, no intermediate values, ...), so that the page can say so instead of leaving an
empty plot.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from cnn_mellin.optim import budget
from cnn_mellin.optim.attrs import (
    ADMISSION_BYTES,
    FAIL_KIND,
    FAIL_REASON,
    PEAK_BYTES,
    PEAK_METHOD,
    PRUNE_KIND,
    PRUNE_REASON,
    WORKER,
)
from cnn_mellin.optim.study import StudySettings

COLORS = {
    "complete": "#2f6fbd", "pruned": "#e69f00", "running": "#2ca25f", "waiting": "#b8bec6",
    "fail": "#c8423b", "best": "#111827", "grid": "#e5e7eb",
}
WIDTH = 1000  # PNG width in CSS pixels; the page lets figures fill their column
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


@dataclass
class Chart:
    """One figure of the report, or the reason it has none."""

    name: str  # file stem of its PNG
    title: str
    caption: str  # how to read it
    figure: go.Figure | None = None
    note: str | None = None  # why there is no figure
    height: int = 420


def _style(fig: go.Figure, height: int, **layout) -> go.Figure:
    fig.update_layout(
        template="plotly_white", height=height, font=dict(family=FONT, size=13),
        margin=dict(l=70, r=30, t=30, b=55), hoverlabel=dict(font_size=12),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0, xanchor="left"),
        **layout,
    )
    return fig


def finite_value(trial: FrozenTrial) -> bool:
    return trial.value is not None and math.isfinite(trial.value)


def completed(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value."""
    return [t for t in trials if t.state == TrialState.COMPLETE and finite_value(t)]


def worker_label(trial: FrozenTrial) -> str:
    """``host pid N (device)`` of the worker that ran ``trial``, or ``unknown worker``."""
    ident = trial.user_attrs.get(WORKER)
    if not isinstance(ident, dict) or not ident.get("host"):
        return "unknown worker"
    device = f" ({ident['device']})" if ident.get("device") else ""
    return f"{ident['host']} pid {ident.get('pid', '?')}{device}"


def reason_of(trial: FrozenTrial) -> tuple[str, str]:
    """(kind, reason) of a PRUNED or FAIL trial."""
    if trial.state == TrialState.PRUNED:
        return (str(trial.user_attrs.get(PRUNE_KIND, "unknown")),
                str(trial.user_attrs.get(PRUNE_REASON, "no reason recorded")))
    return (str(trial.user_attrs.get(FAIL_KIND, "unknown")),
            str(trial.user_attrs.get(FAIL_REASON, "no reason recorded")))


def budget_chart(trials: Sequence[FrozenTrial], settings: StudySettings) -> Chart:
    """Trials per state against the budget (failed ones are retried outside it)."""
    c = budget.count(trials, settings.num_trials)
    fig = go.Figure()
    for label, n, color in (
        ("complete", c.complete, COLORS["complete"]), ("pruned", c.pruned, COLORS["pruned"]),
        ("running", c.running, COLORS["running"]), ("waiting", c.waiting, COLORS["waiting"]),
    ):
        fig.add_bar(y=["budget"], x=[n], name=f"{label} {n}", orientation="h",
                    marker_color=color, text=[n if n else ""], textposition="inside",
                    hovertemplate=f"{label}: {n}<extra></extra>")
    fig.add_bar(y=["failed"], x=[c.fail], name=f"failed {c.fail}", orientation="h",
                marker_color=COLORS["fail"], text=[c.fail if c.fail else ""],
                textposition="inside", hovertemplate=f"failed: {c.fail}<extra></extra>")
    fig.add_vline(x=settings.num_trials, line=dict(color=COLORS["best"], dash="dash", width=2),
                  annotation_text=f"budget {settings.num_trials}",
                  annotation_position="top left")
    _style(fig, 230, barmode="stack", bargap=0.35, legend_traceorder="normal",
           xaxis=dict(title="trials", range=[0, max(settings.num_trials, c.live, c.fail) * 1.04]),
           yaxis=dict(categoryorder="array", categoryarray=["failed", "budget"]))
    fig.update_layout(margin=dict(t=45))
    return Chart("budget", f"Budget: {c.done} of {settings.num_trials} trials done",
                 "Trials by state against the study's budget. Failed trials do not count: "
                 "each is replaced by a retry or a fresh trial.", fig, height=230)


def history_chart(trials: Sequence[FrozenTrial], minimize: bool) -> Chart:
    """Values in order of completion with the best so far; pruned trials at their last value."""
    title = "History"
    caption = ("Each finished trial at the time it finished: completed trials at their value, "
               "pruned ones at the last value they reported; the line is the best so far.")
    done = sorted((t for t in completed(trials) if t.datetime_complete),
                  key=lambda t: t.datetime_complete)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.datetime_complete
              and t.intermediate_values]
    if not done and not pruned:
        return Chart("history", title, caption, note="No trial has finished with a value yet.")
    fig = go.Figure()
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        fig.add_scatter(
            x=[t.datetime_complete for t in pruned], y=last, mode="markers", name="pruned",
            marker=dict(symbol="x-thin", size=9, line=dict(width=2, color=COLORS["pruned"])),
            customdata=[[t.number, max(t.intermediate_values)] for t in pruned],
            hovertemplate="trial %{customdata[0]} pruned after epoch %{customdata[1]}<br>"
            "last value %{y:.4g}<extra></extra>",
        )
    if done:
        fig.add_scatter(
            x=[t.datetime_complete for t in done], y=[t.value for t in done], mode="markers",
            name="complete", marker=dict(size=8, color=COLORS["complete"], opacity=0.85),
            customdata=[t.number for t in done],
            hovertemplate="trial %{customdata}<br>value %{y:.4g}<extra></extra>",
        )
        pick = min if minimize else max
        best, so_far = [], None
        for t in done:
            so_far = t.value if so_far is None else pick(so_far, t.value)
            best.append(so_far)
        fig.add_scatter(x=[t.datetime_complete for t in done], y=best, mode="lines",
                        name="best so far", line=dict(shape="hv", color=COLORS["best"], width=2),
                        hoverinfo="skip")
    _style(fig, 420, xaxis_title="finished at", yaxis_title="value")
    return Chart("history", title, caption, fig)


def importance_chart(importances: list[tuple[str, float]] | None, why_none: str | None) -> Chart:
    """Normalised fANOVA importances (as ``optim important`` ranks them)."""
    title = "Parameter importance"
    caption = ("Normalised fANOVA importance over completed trials, seed 0: the ranking "
               "'optim important' prints, most important at the top.")
    if not importances:
        return Chart("importance", title, caption, note=why_none or "No importance computed.")
    names = [n for n, _ in importances][::-1]
    scores = [s for _, s in importances][::-1]
    fig = go.Figure(go.Bar(
        x=scores, y=names, orientation="h", marker_color=COLORS["complete"],
        text=[f"{s:.3f}" for s in scores], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.4f}<extra></extra>",
    ))
    height = 120 + 34 * len(names)
    _style(fig, height, xaxis=dict(title="importance", range=[0, max(scores) * 1.15 or 1]),
           yaxis=dict(automargin=True))
    return Chart("importance", title, caption, fig, height=height)


def parallel_chart(trials: Sequence[FrozenTrial], names: Sequence[str], minimize: bool) -> Chart:
    """Parallel coordinates of the searched parameters and the value, completed trials."""
    title = "Parallel coordinates"
    caption = ("One line per completed trial through its parameter values to its value; the "
               "darkest lines are the best. Drag along an axis to select a range.")
    done = completed(trials)
    names = [n for n in names if all(n in t.params for t in done)]
    if not done or not names:
        return Chart("parallel", title, caption,
                     note="No completed trial yet." if not done
                     else "No searched parameter was set in every completed trial.")
    values = [t.value for t in done]
    dims = []
    for name in names:
        column = [t.params[name] for t in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column):
            positive = all(v > 0 for v in column)
            spread = max(column) / min(column) if positive and min(column) > 0 else 1
            if spread >= 100:  # learning rates and the like: log10 axis
                dims.append(dict(label=f"log10 {_short(name)}",
                                 values=[math.log10(v) for v in column]))
            else:
                dims.append(dict(label=_short(name), values=column))
        else:
            levels = sorted({str(v) for v in column})
            index = {level: i for i, level in enumerate(levels)}
            dims.append(dict(label=_short(name), values=[index[str(v)] for v in column],
                             tickvals=list(range(len(levels))), ticktext=levels))
    dims.append(dict(label="value", values=values))
    fig = go.Figure(go.Parcoords(
        line=dict(color=values, colorscale="Viridis", reversescale=not minimize, showscale=True,
                  colorbar=dict(title="value", thickness=14)),
        dimensions=dims, labelangle=-12, labelside="top",
        labelfont=dict(size=12), tickfont=dict(size=11),
    ))
    _style(fig, 460)
    fig.update_layout(margin=dict(l=60, r=60, t=90, b=35))
    return Chart("parallel", title, caption, fig, height=460)


def _short(name: str) -> str:
    """``training.learning_rate`` -> ``learning_rate`` (the axis labels are narrow)."""
    return name.split(".", 1)[-1]


def curves_chart(trials: Sequence[FrozenTrial]) -> Chart:
    """Intermediate values per epoch; pruned trials end in a cross where they stopped."""
    title = "Learning curves"
    caption = ("The value each trial reported after each epoch. Pruned trials end in a cross "
               "at the epoch the pruner (or a memory or numeric failure) stopped them.")
    shown = [t for t in trials if t.intermediate_values]
    if not shown:
        return Chart("curves", title, caption,
                     note="No trial reported intermediate (per-epoch) values.")
    fig = go.Figure()
    seen: set[str] = set()
    groups = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
              TrialState.RUNNING: "running", TrialState.FAIL: "fail"}
    order = {TrialState.PRUNED: 0, TrialState.FAIL: 1, TrialState.RUNNING: 2,
             TrialState.COMPLETE: 3}
    for t in sorted(shown, key=lambda t: (order.get(t.state, 4), t.number)):
        group = groups.get(t.state, "waiting")
        steps = sorted(t.intermediate_values)
        ys = [t.intermediate_values[s] for s in steps]
        fig.add_scatter(
            x=steps, y=ys, mode="lines+markers" if len(steps) == 1 else "lines",
            name=group if group != "fail" else "failed", legendgroup=group,
            showlegend=group not in seen, opacity=0.55 if group == "pruned" else 0.8,
            line=dict(color=COLORS[group], width=1.6,
                      dash="dot" if group in ("running", "fail") else "solid"),
            marker=dict(size=5), hovertemplate=f"trial {t.number}<br>epoch %{{x}}: "
            "%{y:.4g}<extra></extra>",
        )
        seen.add(group)
    ends = [t for t in shown if t.state == TrialState.PRUNED]
    if ends:
        fig.add_scatter(
            x=[max(t.intermediate_values) for t in ends],
            y=[t.intermediate_values[max(t.intermediate_values)] for t in ends],
            mode="markers", name="pruned here", legendgroup="pruned",
            marker=dict(symbol="x-thin", size=10, line=dict(width=2.2, color=COLORS["fail"])),
            customdata=[[t.number, reason_of(t)[1]] for t in ends],
            hovertemplate="trial %{customdata[0]} pruned at epoch %{x}<br>%{customdata[1]}"
            "<extra></extra>",
        )
    last = max(max(t.intermediate_values) for t in shown)
    ticks = dict(dtick=1) if last <= 20 else dict(tickformat="d")
    _style(fig, 440, xaxis=dict(title="epoch", **ticks), yaxis_title="value")
    return Chart("curves", title, caption, fig, height=440)


def memory_chart(trials: Sequence[FrozenTrial], mem_limit: int | None) -> Chart:
    """Memory admitted (estimated before training) and measured, against the value."""
    title = "Memory: admitted and measured against value"
    caption = ("Top: each completed trial's value against the memory admission estimated "
               "before training (open circle) and the peak measured while it trained (filled), "
               "joined by a line. Bottom: trials that ended without a value, at their memory. "
               "Dashed: the study's memory limit.")
    known = [t for t in trials if ADMISSION_BYTES in t.user_attrs or PEAK_BYTES in t.user_attrs]
    if not known:
        return Chart("memory", title, caption,
                     note="No trial recorded an admission estimate or a measured peak.")
    top = max([float(t.user_attrs.get(k, 0)) for t in known
               for k in (ADMISSION_BYTES, PEAK_BYTES)] + [float(mem_limit or 0)])
    unit, scale = ("GiB", 2.0 ** 30) if top >= 4 * 2.0 ** 30 else ("MiB", 2.0 ** 20)

    def size(t, key):
        v = t.user_attrs.get(key)
        return None if v is None else float(v) / scale

    valued = [t for t in completed(known)]
    rest = [t for t in known if t not in valued and t.state != TrialState.RUNNING]
    rows = 2 if rest else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True,
                        row_heights=[0.75, 0.25] if rest else [1.0], vertical_spacing=0.06)
    links_x, links_y = [], []
    for t in valued:
        a, p = size(t, ADMISSION_BYTES), size(t, PEAK_BYTES)
        if a is not None and p is not None and t.user_attrs.get(PEAK_METHOD) == \
                "measured during training":
            links_x += [a, p, None]
            links_y += [t.value, t.value, None]
    if links_x:
        fig.add_scatter(x=links_x, y=links_y, mode="lines", line=dict(color="#9ca3af", width=1),
                        showlegend=False, hoverinfo="skip", row=1, col=1)
    admitted = [t for t in valued if ADMISSION_BYTES in t.user_attrs]
    measured = [t for t in valued if PEAK_BYTES in t.user_attrs
                and t.user_attrs.get(PEAK_METHOD) == "measured during training"]
    if admitted:
        fig.add_scatter(
            x=[size(t, ADMISSION_BYTES) for t in admitted], y=[t.value for t in admitted],
            mode="markers", name="admitted (estimate)",
            marker=dict(symbol="circle-open", size=9, line=dict(width=2),
                        color=COLORS["complete"]),
            customdata=[t.number for t in admitted],
            hovertemplate=f"trial %{{customdata}}: admitted %{{x:.1f}} {unit}<br>value "
            "%{y:.4g}<extra></extra>", row=1, col=1)
    if measured:
        fig.add_scatter(
            x=[size(t, PEAK_BYTES) for t in measured], y=[t.value for t in measured],
            mode="markers", name="measured peak", marker=dict(size=8, color=COLORS["complete"]),
            customdata=[t.number for t in measured],
            hovertemplate=f"trial %{{customdata}}: peak %{{x:.1f}} {unit}<br>value "
            "%{y:.4g}<extra></extra>", row=1, col=1)
    by_kind: dict[str, list[FrozenTrial]] = defaultdict(list)
    for t in rest:
        state = "pruned" if t.state == TrialState.PRUNED else "failed"
        by_kind[f"{state}: {reason_of(t)[0]}"].append(t)
    for label, group in sorted(by_kind.items()):
        fig.add_scatter(
            x=[size(t, PEAK_BYTES) or size(t, ADMISSION_BYTES) for t in group],
            y=[label] * len(group), mode="markers", showlegend=False,
            marker=dict(symbol="x-thin", size=10,
                        line=dict(width=2, color=COLORS["fail" if "memory" in label
                                                         or "oom" in label else "pruned"])),
            customdata=[[t.number, reason_of(t)[1]] for t in group],
            hovertemplate=f"trial %{{customdata[0]}} at %{{x:.1f}} {unit}<br>"
            "%{customdata[1]}<extra></extra>", row=2, col=1)
    if mem_limit:
        fig.add_vline(x=mem_limit / scale, line=dict(color=COLORS["fail"], dash="dash"))
        fig.add_annotation(x=mem_limit / scale, y=1, xref="x", yref="paper", showarrow=False,
                           text=f"limit {mem_limit / scale:.3g} {unit}", xanchor="right",
                           yanchor="bottom", font=dict(color=COLORS["fail"]))
    height = 480 if rest else 400
    _style(fig, height)
    fig.update_yaxes(title_text="value", row=1, col=1)
    if rest:
        fig.update_yaxes(type="category", automargin=True, row=2, col=1)
    fig.update_xaxes(title_text=f"memory ({unit})", row=rows, col=1)
    if not valued:
        fig.add_annotation(text="no completed trial", x=0.5, y=0.8, xref="paper", yref="paper",
                           showarrow=False, font=dict(color="#6b7280"))
    return Chart("memory", title, caption, fig, height=height)


def reasons_chart(trials: Sequence[FrozenTrial]) -> Chart:
    """How many trials were pruned or failed, by kind (memory, oom, pruner, dead, ...)."""
    title = "Why trials were pruned or failed"
    caption = ("Pruned and failed trials by kind; hover for the recorded reasons. The table "
               "below lists every reason.")
    ended = [t for t in trials if t.state in (TrialState.PRUNED, TrialState.FAIL)]
    if not ended:
        return Chart("reasons", title, caption, note="No trial was pruned or failed.")
    counts: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], list[str]] = defaultdict(list)
    for t in ended:
        state = "pruned" if t.state == TrialState.PRUNED else "failed"
        kind, reason = reason_of(t)
        counts[(state, kind)] += 1
        if reason not in examples[(state, kind)] and len(examples[(state, kind)]) < 3:
            examples[(state, kind)].append(_clip(reason, 90))
    keys = sorted(counts, key=lambda k: (counts[k], k))
    fig = go.Figure(go.Bar(
        x=[counts[k] for k in keys], y=[f"{s}: {k}" for s, k in keys], orientation="h",
        marker_color=[COLORS["pruned" if s == "pruned" else "fail"] for s, _ in keys],
        text=[counts[k] for k in keys], textposition="outside", cliponaxis=False,
        customdata=["<br>".join(examples[k]) for k in keys],
        hovertemplate="%{y}: %{x}<br>%{customdata}<extra></extra>",
    ))
    height = 130 + 36 * len(keys)
    _style(fig, height, xaxis=dict(title="trials", range=[0, max(counts.values()) * 1.15],
                                   tickformat="d"), yaxis=dict(automargin=True))
    return Chart("reasons", title, caption, fig, height=height)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def timeline_chart(trials: Sequence[FrozenTrial], now: datetime | None = None) -> Chart:
    """One row per worker (host, pid, device), one bar per trial it ran, coloured by state."""
    title = "Timeline per worker"
    caption = ("When each trial ran and on which worker (host, process, device); colour is the "
               "trial's state. Running trials extend to now.")
    started = [t for t in trials if t.datetime_start is not None]
    if not started:
        return Chart("timeline", title, caption, note="No trial has started yet.")
    now = now or datetime.now()
    fig = go.Figure()
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
             TrialState.RUNNING: "running", TrialState.FAIL: "fail"}
    labels = sorted({worker_label(t) for t in started})
    for state, group in names.items():
        chosen = [t for t in started if t.state == state]
        if not chosen:
            continue
        ends = [t.datetime_complete or now for t in chosen]
        fig.add_bar(
            base=[t.datetime_start.isoformat() for t in chosen],
            x=[max(1.0, (e - t.datetime_start).total_seconds() * 1000) for t, e in
               zip(chosen, ends, strict=True)],
            y=[worker_label(t) for t in chosen], orientation="h",
            name="failed" if group == "fail" else group, marker_color=COLORS[group],
            marker_line=dict(color="white", width=0.5),
            customdata=[[t.number, (e - t.datetime_start).total_seconds()]
                        for t, e in zip(chosen, ends, strict=True)],
            hovertemplate="trial %{customdata[0]}: %{customdata[1]:.1f} s<extra></extra>",
        )
    height = min(900, 170 + 42 * len(labels))
    _style(fig, height, barmode="overlay", xaxis=dict(type="date", title="time"),
           yaxis=dict(categoryorder="array", categoryarray=labels[::-1], automargin=True))
    return Chart("timeline", title, caption, fig, height=height)


def stages_chart(stages: Sequence[tuple[str, Sequence[FrozenTrial], bool]]) -> Chart:
    """Completed values of several studies side by side, best of each marked."""
    title = "Stages compared"
    caption = ("Completed trials' values in each study of this report, in the order given; "
               "the star is each study's best.")
    fig = go.Figure()
    bests_x, bests_y = [], []
    for name, trials, minimize in stages:
        done = completed(trials)
        if not done:
            continue
        fig.add_box(
            y=[t.value for t in done], x=[name] * len(done), name=name, boxpoints="all",
            jitter=0.4, pointpos=0, marker=dict(size=6, color=COLORS["complete"], opacity=0.7),
            line=dict(color="#94a3b8"), fillcolor="rgba(0,0,0,0)", showlegend=False,
            customdata=[t.number for t in done],
            hovertemplate="trial %{customdata}: %{y:.4g}<extra></extra>",
        )
        best = (min if minimize else max)(t.value for t in done)
        bests_x.append(name)
        bests_y.append(best)
    if not bests_x:
        return Chart("stages", title, caption, note="No study has a completed trial yet.")
    fig.add_scatter(x=bests_x, y=bests_y, mode="lines+markers", name="best",
                    marker=dict(symbol="star", size=15, color=COLORS["best"]),
                    line=dict(color=COLORS["best"], dash="dot"),
                    hovertemplate="%{x}: best %{y:.4g}<extra></extra>")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _style(fig, 420, yaxis_title="value", xaxis=dict(type="category", automargin=True))
    return Chart("stages", title, caption, fig)
