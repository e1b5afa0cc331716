"""The report's four plots as SVG written here: no plotting library.

matplotlib cost the report 3 to 4 s on an idle machine whatever the store's
size (about 11 s on the busy shared one): its import (a second and a half,
most of it building the docstrings of every Artist class), loading its fonts,
and drawing each figure twice for `bbox_inches="tight"`. These plots are
bars, lines, error bars and histogram outlines over a few dozen numbers;
written as SVG they cost milliseconds, and the browser draws the text.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape

FAMILY = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
FONT = f"{FAMILY} font-size='11'"
# Margins of a panel: room for the y tick labels and axis label, the title, the x labels.
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 26, 44
# matplotlib's default colour cycle, for series without a colour of their own.
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (about `count` of them)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= high + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


class Panel:
    """One set of axes at (x0, y0) of size (width, height) in the figure, with data ranges."""

    def __init__(self, x0: float, y0: float, width: float, height: float,
                 xrange: tuple[float, float], yrange: tuple[float, float]):
        self.left, self.top = x0 + LEFT, y0 + TOP
        self.width, self.height = width - LEFT - RIGHT, height - TOP - BOTTOM
        self.xrange, self.yrange = _widen(xrange), _widen(yrange)
        self.parts: list[str] = []

    def x(self, value: float) -> float:
        low, high = self.xrange
        return self.left + (value - low) / (high - low) * self.width

    def y(self, value: float) -> float:
        low, high = self.yrange
        return self.top + self.height - (value - low) / (high - low) * self.height

    def axes(self, title: str = "", xlabel: str = "", ylabel: str = "", yticks: bool = True,
             xticks: Sequence[tuple[float, str]] = ()) -> None:
        bottom = self.top + self.height
        parts = self.parts
        parts.append(f"<rect x='{self.left:.1f}' y='{self.top:.1f}' width='{self.width:.1f}' "
                     f"height='{self.height:.1f}' fill='none' stroke='#000' stroke-width='0.8'/>")
        for tick in nice_ticks(*self.yrange):
            if not self.yrange[0] <= tick <= self.yrange[1]:
                continue
            y = self.y(tick)
            parts.append(f"<line x1='{self.left - 4:.1f}' y1='{y:.1f}' x2='{self.left:.1f}' y2='{y:.1f}' stroke='#000'/>")
            if yticks:
                parts.append(f"<text x='{self.left - 6:.1f}' y='{y + 4:.1f}' text-anchor='end' {FONT}>{_label(tick)}</text>")
        for value, text in xticks:
            x = self.x(value)
            parts.append(f"<line x1='{x:.1f}' y1='{bottom:.1f}' x2='{x:.1f}' y2='{bottom + 4:.1f}' stroke='#000'/>")
            parts.append(f"<text x='{x:.1f}' y='{bottom + 16:.1f}' text-anchor='middle' {FONT}>{escape(text)}</text>")
        if title:
            parts.append(f"<text x='{self.left + self.width / 2:.1f}' y='{self.top - 8:.1f}' text-anchor='middle' "
                         f"{FAMILY} font-size='13'>{escape(title)}</text>")
        if xlabel:
            parts.append(f"<text x='{self.left + self.width / 2:.1f}' y='{bottom + 34:.1f}' text-anchor='middle' "
                         f"{FONT}>{escape(xlabel)}</text>")
        if ylabel:
            parts.append(f"<text transform='translate({self.left - 44:.1f} {self.top + self.height / 2:.1f}) "
                         f"rotate(-90)' text-anchor='middle' {FONT}>{escape(ylabel)}</text>")

    def rect(self, x0: float, x1: float, y0: float, y1: float, colour: str, opacity: float = 1.0) -> None:
        left, right = sorted((self.x(x0), self.x(x1)))
        top, bottom = sorted((self.y(y0), self.y(y1)))
        self.parts.append(f"<rect x='{left:.1f}' y='{top:.1f}' width='{right - left:.1f}' height='{bottom - top:.1f}' "
                          f"fill='{colour}' fill-opacity='{opacity}'/>")

    def stairs(self, counts: Sequence[float], edges: Sequence[float], colour: str, opacity: float = 0.6) -> None:
        """A histogram as one filled outline."""
        points = [(edges[0], 0.0)]
        for count, low, high in zip(counts, edges, edges[1:], strict=False):
            points += [(low, count), (high, count)]
        points.append((edges[-1], 0.0))
        path = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        self.parts.append(f"<polygon points='{path}' fill='{colour}' fill-opacity='{opacity}'/>")

    def line(self, points: Sequence[tuple[float, float]], colour: str) -> None:
        path = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        self.parts.append(f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='1.5'/>")
        for a, b in points:
            self.parts.append(f"<circle cx='{self.x(a):.1f}' cy='{self.y(b):.1f}' r='3.5' fill='{colour}'/>")

    def error_bar(self, x: float, low: float, high: float, colour: str) -> None:
        px, top, bottom = self.x(x), self.y(high), self.y(low)
        self.parts.append(f"<path d='M{px:.1f},{top:.1f}V{bottom:.1f}M{px - 3:.1f},{top:.1f}H{px + 3:.1f}"
                          f"M{px - 3:.1f},{bottom:.1f}H{px + 3:.1f}' stroke='{colour}' fill='none'/>")

    def legend(self, entries: Sequence[tuple[str, str]], opacity: float = 1.0) -> None:
        """Labelled colour boxes in the top right corner."""
        width = 18 + 6.5 * max((len(label) for label, _ in entries), default=0)
        x = self.left + self.width - width - 6
        self.parts.append(f"<rect x='{x:.1f}' y='{self.top + 5:.1f}' width='{width + 2:.1f}' "
                          f"height='{16 * len(entries) + 4}' fill='#fff' fill-opacity='0.8' stroke='#ccc'/>")
        for k, (label, colour) in enumerate(entries):
            y = self.top + 9 + 16 * k
            self.parts.append(f"<rect x='{x + 4:.1f}' y='{y:.1f}' width='10' height='10' fill='{colour}' "
                              f"fill-opacity='{opacity}'/>")
            self.parts.append(f"<text x='{x + 18:.1f}' y='{y + 9:.1f}' {FONT}>{escape(label)}</text>")


def _widen(span: tuple[float, float]) -> tuple[float, float]:
    low, high = span
    if not (math.isfinite(low) and math.isfinite(high)):
        return (0.0, 1.0)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def span(values: Sequence[float], *, zero: bool = False, pad: float = 0.05) -> tuple[float, float]:
    """The range of `values` with a margin (and 0 inside it with `zero`, as for bars)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    low, high = min(finite), max(finite)
    if zero:
        low, high = min(low, 0.0), max(high, 0.0)
    margin = (high - low) * pad or 0.5
    return (low if zero and low == 0 else low - margin, high if zero and high == 0 else high + margin)


def figure(width: float, height: float, panels: Sequence[Panel]) -> str:
    body = "".join(part for panel in panels for part in panel.parts)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}'><rect width='100%' height='100%' fill='#fff'/>{body}</svg>")
