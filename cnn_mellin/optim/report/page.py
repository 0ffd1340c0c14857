"""The report's ``index.html``: the studies' stories as one page that works opened from disk.

The figures are plotly figures drawn by ``plotly.min.js``, which sits beside the page.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from html import escape
from importlib import resources
from string import Template
from typing import Any

import plotly.io as pio
from optuna.trial import FrozenTrial

from cnn_mellin import __version__
from cnn_mellin.optim.attrs import EPOCHS
from cnn_mellin.optim.report import figures
from cnn_mellin.optim.report.story import StudyStory, ended
from cnn_mellin.units import format_bytes, format_duration

PLOT_CONFIG = {"responsive": True, "displaylogo": False}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _trial_seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def _card(key: str, value: str, small: str = "") -> str:
    extra = f" <small>{escape(small)}</small>" if small else ""
    return f'<div class="card"><div class="k">{escape(key)}</div>' \
           f'<div class="v">{escape(value)}{extra}</div></div>'


def _progress(story: StudyStory) -> str:
    c, total = story.counts, max(1, story.settings.num_trials)
    parts = [("complete", c.complete), ("pruned", c.pruned), ("running", c.running),
             ("waiting", c.waiting)]
    spans = "".join(
        f'<span style="width:{100 * n / max(total, c.live):.2f}%;background:var(--{name})"'
        f' title="{name}: {n}"></span>' for name, n in parts if n
    )
    legend = "".join(f'<i style="background:var(--{name})"></i>{name} {n}' for name, n in parts)
    legend += f'<i style="background:var(--fail)"></i>failed {c.fail} (retried outside the budget)'
    return f'<div class="bar">{spans}</div><div class="legend">{legend}</div>'


def _cards(story: StudyStory) -> str:
    s, c = story.settings, story.counts
    best = story.best
    mem = "none" if not s.mem_limit_bytes else format_bytes(s.mem_limit_bytes)
    durations = [d for d in map(_trial_seconds, story.trials) if d is not None]
    cards = [
        _card("done", f"{c.done} / {s.num_trials}", f"{c.complete} complete, {c.pruned} pruned"),
        _card("best value", "–" if best is None else _fmt(best.value),
              "" if best is None else f"trial {best.number}"),
        _card("task", s.task.rsplit(":", 1)[-1],
              "lower is better" if story.minimize else "higher is better"),
        _card("searched", str(len(s.searched)), "parameters"),
        _card("pruner", s.pruner),
        _card("memory limit", mem),
        _card("median trial", format_duration(sorted(durations)[len(durations) // 2]
                                              if durations else None, unknown="–")),
        _card("draws", str(story.draws["draws"]),
              f"{story.draws['rejected_memory']} over the memory limit, "
              f"{story.draws['rejected_invalid']} invalid: never trials"),
        _card("idle", "–" if story.workers["idle_share"] is None
              else f"{story.workers['idle_share']:.1%}",
              f"of {story.workers['seconds']:.0f} worker-seconds"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>{_progress(story)}'


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        ) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _lineage(story: StudyStory, anchors: dict[str, str]) -> str:
    lineage = story.lineage
    if not lineage:
        return '<p class="note">No parent stage: this study was not started from another.</p>'
    parent = str(lineage.get("parent", "?"))
    link = (f'<a href="#{anchors[parent]}">{escape(parent)}</a>' if parent in anchors
            else f"<code>{escape(parent)}</code>")
    html = [f"<p>Started from study {link}.</p>"]
    kept = lineage.get("kept")
    if isinstance(kept, dict):
        kept = list(kept.items())
    if isinstance(kept, list) and kept:
        rows = []
        for item in kept:
            name, score = (item if isinstance(item, (list, tuple)) and len(item) == 2
                           else (item, None))
            rows.append([f"<code>{escape(str(name))}</code>",
                         "–" if score is None else escape(_fmt(score))])
        html.append("<p>Parameters kept as searched, with their importance in the parent:</p>")
        html.append(_table(["parameter", "importance"], rows, numeric={1}))
    carried = lineage.get("carried")
    if isinstance(carried, dict) and carried:
        rows = [[f"<code>{escape(str(k))}</code>", escape(_fmt(v))]
                for k, v in sorted(carried.items())]
        html.append(f"<details><summary>Carried configuration ({len(rows)} values)</summary>"
                    f"{_table(['parameter', 'value'], rows)}</details>")
    elif isinstance(carried, str) and carried.strip():
        html.append(f"<details><summary>Carried configuration</summary>"
                    f"<pre>{escape(carried)}</pre></details>")
    others = {k: v for k, v in lineage.items() if k not in ("parent", "kept", "carried")}
    if others:
        html.append(f"<pre>{escape(json.dumps(others, indent=2, default=str))}</pre>")
    return "".join(html)


def _best(story: StudyStory) -> str:
    best = story.best
    if best is None:
        return '<p class="note">No completed trial yet.</p>'
    worker = figures.worker_label(best)
    took = format_duration(_trial_seconds(best), unknown="–")
    facts = (f"Trial {best.number}: value <b>{escape(_fmt(best.value))}</b>, "
             f"{escape(took)} on {escape(worker)}")
    epochs = best.user_attrs.get(EPOCHS)
    if epochs is not None:
        facts += f", {escape(str(epochs))} epochs"
    rows = [[f"<code>{escape(k)}</code>", escape(_fmt(v))] for k, v in sorted(best.params.items())]
    html = [f"<p>{facts}.</p>", _table(["parameter", "value"], rows)]
    if story.best_ini:
        html.append(f'<details><summary>Full configuration (<a href="{escape(story.slug)}/'
                    f'best.ini">best.ini</a>)</summary><pre>{escape(story.best_ini)}</pre>'
                    "</details>")
    return "".join(html)


def _pattern(reason: str) -> str:
    """``reason`` with each number as N ("epoch 3 (value 0.41)" -> "epoch N (value N)")."""
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", reason)


def _reasons(story: StudyStory) -> str:
    trials = ended(story)
    if not trials:
        return ""
    groups: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
    for t in trials:
        kind, reason = figures.reason_of(t)
        state = "pruned" if t.state.name == "PRUNED" else "failed"
        groups.setdefault((state, kind, _pattern(reason)), []).append((t.number, reason))
    rows = []
    for (state, kind, pattern), members in sorted(groups.items(), key=lambda g: -len(g[1])):
        numbers = [n for n, _ in members]
        shown = ", ".join(map(str, numbers[:12])) + (" …" if len(numbers) > 12 else "")
        text = members[0][1] if len({r for _, r in members}) == 1 else pattern
        rows.append([escape(state), escape(kind), escape(text), str(len(numbers)),
                     escape(shown)])
    return ("<h3>Pruned and failed trials</h3>"
            + _table(["state", "kind", "reason (N: a number that differs)", "trials",
                      "numbers"], rows, numeric={3}))


def _figure(chart: figures.Chart, folder: str, png: bool) -> str:
    ident = f"fig-{folder}-{chart.name}"
    title = f"<h3>{escape(chart.title)}</h3>"
    if chart.figure is None:
        return f'{title}<p class="note" data-figure-note="{escape(chart.name)}">' \
               f"{escape(chart.note or '')}</p>"
    data = pio.to_json(chart.figure, validate=False).replace("</", "<\\/")
    link = f'<a href="{escape(folder)}/{escape(chart.name)}.png">PNG</a>' if png else ""
    return (
        f'{title}<figure><div class="plot" id="{escape(ident)}" '
        f'style="height:{chart.height}px"></div>'
        f"<figcaption>{escape(chart.caption)}{link}</figcaption></figure>"
        f"<script>(function(){{var f={data};"
        f"Plotly.newPlot({json.dumps(ident)},f.data,f.layout,{json.dumps(PLOT_CONFIG)});}})();"
        "</script>"
    )


def _study(story: StudyStory, anchors: dict[str, str], png: bool) -> str:
    s = story.settings
    sub = (f"{len(story.trials)} trials in the storage · budget {s.num_trials} · task "
           f"{s.task} · cnn-mellin {s.version}")
    parts = [
        f'<section class="study" id="{escape(anchors[story.name])}">',
        f"<h2>Study {escape(story.name)}</h2><p class=\"sub\">{escape(sub)}</p>",
        _cards(story),
        "<h3>Stage lineage</h3>", _lineage(story, anchors),
        "<h3>Best trial</h3>", _best(story),
    ]
    for chart in story.charts:
        parts.append(_figure(chart, story.slug, png))
        if chart.name == "reasons":
            parts.append(_reasons(story))
    parts.append("</section>")
    return "".join(parts)


def _overview(stories: list[StudyStory], anchors: dict[str, str], stages: figures.Chart,
              png: bool) -> str:
    rows = []
    for story in stories:
        c = story.counts
        parent = (story.lineage or {}).get("parent", "–")
        rows.append([
            f'<a href="#{anchors[story.name]}">{escape(story.name)}</a>',
            f"{c.done} / {story.settings.num_trials}", str(c.complete), str(c.pruned),
            str(c.fail), "–" if story.best is None else escape(_fmt(story.best.value)),
            escape(str(parent)),
        ])
    table = _table(["study", "done", "complete", "pruned", "failed", "best", "parent"], rows,
                   numeric={2, 3, 4, 5})
    return (f'<section class="overview" id="overview"><h2>{len(stories)} studies</h2>{table}'
            f"{_figure(stages, 'stages', png)}</section>")


def render(
    stories: list[StudyStory], stages: figures.Chart | None, *, storage: str, png: bool,
    now: datetime | None = None,
) -> str:
    """The whole ``index.html``."""
    anchors = {s.name: f"study-{s.slug}" for s in stories}
    now = now or datetime.now()
    names = ", ".join(s.name for s in stories)
    title = f"cnn-mellin report: {'study' if len(stories) == 1 else 'studies'} {names}"
    subtitle = f"{escape(storage)} · written {now:%Y-%m-%d %H:%M} · cnn-mellin {__version__} · " \
               '<a style="color:#cbd5e1" href="trials.csv">trials.csv</a>'
    nav = ""
    body = []
    if len(stories) > 1:
        links = "".join(f'<a href="#{anchors[s.name]}">{escape(s.name)}</a>' for s in stories)
        nav = f'<nav><a href="#overview">overview</a>{links}</nav>'
        body.append(_overview(stories, anchors, stages, png))
    body.extend(_study(s, anchors, png) for s in stories)
    template = Template(resources.files(__package__).joinpath("template.html").read_text())
    return template.substitute(
        title=escape(title), subtitle=subtitle,
        version=escape(__version__), nav=nav, body="\n".join(body),
    )
