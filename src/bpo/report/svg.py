"""Plots as inline SVG, drawn here: no plotting dependency, and the numbers stay readable in the
markup. Every piece of text goes through `html.escape`.

- `strip_plot`: per category a bar at the mean, a whisker of ± sd, and a point per run;
- `line_plot`: a polyline per series over a numeric x axis;
- `grouped_bars`: per group a bar per series, with a point per value.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high - low < 1e-12:  # one value: a range that starts at 0 when the value is 0
        pad = abs(high) * 0.1 or 1.0
        low, high = (low, low + pad) if low == 0 else (low - pad, high + pad)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


@dataclass
class Frame:
    """A plot's data ranges and its place on the SVG canvas."""

    x_low: float
    x_high: float
    y_low: float
    y_high: float
    width: int = 540
    height: int = 300
    left: int = 58
    right: int = 130  # room for the legend
    top: int = 28
    bottom: int = 44

    def x(self, value: float) -> float:
        span = (self.x_high - self.x_low) or 1.0
        return self.left + (value - self.x_low) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = (self.y_high - self.y_low) or 1.0
        return (
            self.height
            - self.bottom
            - (value - self.y_low) / span * (self.height - self.top - self.bottom)
        )


def _text(
    x: float, y: float, text: str, anchor: str = "middle", size: int = 11, extra: str = ""
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" {extra}>'
        f"{html.escape(text)}</text>"
    )


def _axes(frame: Frame, y_ticks: list[float], title: str, y_label: str) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{frame.width}" height="{frame.height}" '
        f'viewBox="0 0 {frame.width} {frame.height}" font-family="sans-serif" role="img">',
        f"<title>{html.escape(title)}</title>",
        _text(frame.width / 2 - frame.right / 2 + frame.left / 2, 16, title, size=13),
    ]
    for tick in y_ticks:
        y = frame.y(tick)
        parts.append(
            f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#e5e5e5"/>'
        )
        parts.append(_text(frame.left - 6, y + 4, f"{tick:.4g}", anchor="end", size=10))
    bottom = frame.height - frame.bottom
    parts.append(
        f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{bottom}" y2="{bottom}" '
        'stroke="#333"/>'
    )
    parts.append(
        f'<line x1="{frame.left}" x2="{frame.left}" y1="{frame.top}" y2="{bottom}" stroke="#333"/>'
    )
    mid = (frame.top + bottom) / 2
    parts.append(_text(14, mid, y_label, extra=f'transform="rotate(-90 14 {mid:.1f})"'))
    return parts


def _legend(frame: Frame, items: Sequence[tuple[str, str]]) -> list[str]:
    parts = []
    x = frame.width - frame.right + 12
    for k, (label, colour) in enumerate(items):
        y = frame.top + 8 + 16 * k
        parts.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(_text(x + 15, y + 1, label, anchor="start"))
    return parts


def strip_plot(
    title: str,
    y_label: str,
    groups: dict[str, tuple[float, float | None, list[tuple[str, float]]]],
    colours: dict[str, str],
) -> str:
    """Per category: a bar at the mean, a whisker of ± sd, and a point per run (labelled)."""
    values = [v for mean, sd, pts in groups.values() for v in [mean, *(p for _, p in pts)]]
    values += [mean + (sd or 0) for mean, sd, _ in groups.values()]
    ticks = nice_ticks(min(0.0, *values), max(values) if values else 1.0)
    names = list(groups)
    # Many arms (a noise-step sweep): a wider plot, names slanted so they do not overlap.
    slant = len(names) > 5
    width = max(540, 78 + 64 * len(names))
    frame = Frame(
        -0.5,
        len(names) - 0.5,
        ticks[0],
        ticks[-1],
        width,
        330 if slant else 300,
        right=20,
        bottom=90 if slant else 44,
    )
    parts = _axes(frame, ticks, title, y_label)
    for k, name in enumerate(names):
        mean, sd, points = groups[name]
        colour = colours[name]
        x = frame.x(k)
        half = 0.3 * (frame.x(1) - frame.x(0))
        parts.append(
            f'<rect class="mean" x="{x - half:.1f}" y="{frame.y(max(mean, 0)):.1f}" '
            f'width="{2 * half:.1f}" height="{abs(frame.y(0) - frame.y(mean)):.1f}" '
            f'fill="{colour}" fill-opacity="0.25" stroke="{colour}">'
            f"<title>{html.escape(f'{name}: mean {mean:.4f}')}</title></rect>"
        )
        if sd:
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y(mean - sd):.1f}" '
                f'y2="{frame.y(mean + sd):.1f}" stroke="{colour}" stroke-width="2"/>'
            )
        for j, (label, value) in enumerate(points):
            offset = (j - (len(points) - 1) / 2) * min(2 * half / max(len(points), 1), 10)
            parts.append(
                f'<circle class="run" cx="{x + offset:.1f}" cy="{frame.y(value):.1f}" r="4" '
                f'fill="{colour}" stroke="white"><title>{html.escape(f"{name}, {label}: {value:.4f}")}'
                "</title></circle>"
            )
        y = frame.height - frame.bottom + 16
        if slant:
            extra = f'transform="rotate(-35 {x:.1f} {y:.1f})"'
            parts.append(_text(x + 4, y, name, anchor="end", extra=extra))
        else:
            parts.append(_text(x, y, name))
    parts.append("</svg>")
    return "".join(parts)


def line_plot(
    title: str,
    y_label: str,
    series: list[tuple[str, str, list[tuple[float, float]]]],
    legend: Sequence[tuple[str, str]],
    y_include: Sequence[float] = (),
) -> str:
    """One polyline per (label, colour, points); `legend` as (label, colour); the y axis spans
    the data and `y_include`."""
    xs = [x for *_, pts in series for x, _ in pts]
    ys = [y for *_, pts in series for _, y in pts] + list(y_include)
    y_ticks = nice_ticks(min(ys), max(ys))
    x_ticks = nice_ticks(min(xs), max(xs))
    frame = Frame(x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1])
    parts = _axes(frame, y_ticks, title, y_label)
    for tick in x_ticks:
        parts.append(_text(frame.x(tick), frame.height - frame.bottom + 15, f"{tick:.4g}", size=10))
    parts.append(_text(frame.x((x_ticks[0] + x_ticks[-1]) / 2), frame.height - 6, "optimizer step"))
    for label, colour, points in series:
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline class="series" points="{path}" fill="none" stroke="{colour}" '
            f'stroke-width="1.6" stroke-opacity="0.85"><title>{html.escape(label)}</title></polyline>'
        )
    parts += _legend(frame, legend)
    parts.append("</svg>")
    return "".join(parts)


def grouped_bars(
    title: str,
    y_label: str,
    groups: list[str],
    bars: list[tuple[str, str, list[list[float]]]],
) -> str:
    """Per group a bar per (label, colour, values per group): the mean, with a point per value."""
    values = [v for *_, per_group in bars for vs in per_group for v in vs]
    ticks = nice_ticks(0.0, max(values) if values else 1.0)
    frame = Frame(-0.5, len(groups) - 0.5, ticks[0], ticks[-1], width=600, right=175)
    parts = _axes(frame, ticks, title, y_label)
    band = frame.x(1) - frame.x(0)
    width = 0.8 * band / max(len(bars), 1)
    for g, group in enumerate(groups):
        for b, (label, colour, per_group) in enumerate(bars):
            vs = per_group[g]
            if not vs:
                continue
            mean = sum(vs) / len(vs)
            x = frame.x(g) - 0.4 * band + b * width
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{frame.y(mean):.1f}" width="{width - 2:.1f}" '
                f'height="{frame.y(0) - frame.y(mean):.1f}" fill="{colour}">'
                f"<title>{html.escape(f'{group}, {label}: {mean:.3f}')}</title></rect>"
            )
            if len(vs) > 1:
                for v in vs:
                    parts.append(
                        f'<circle cx="{x + width / 2 - 1:.1f}" cy="{frame.y(v):.1f}" r="3" '
                        'fill="#222"/>'
                    )
        parts.append(_text(frame.x(g), frame.height - frame.bottom + 16, group))
    parts += _legend(frame, [(label, colour) for label, colour, _ in bars])
    parts.append("</svg>")
    return "".join(parts)
