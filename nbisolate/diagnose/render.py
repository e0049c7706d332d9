"""Reports as text for a terminal and as HTML for a notebook.

Pure functions of the result types: no checking happens here. Sizes are
printed by :func:`nbisolate.units.format_bytes`, like everywhere else in
nbisolate, so the same object has the same size in the panel and in a report.
"""

from __future__ import annotations

import html

from ..units import format_bytes
from .categories import _CATEGORIES
from .report import NamespaceReport, Problem, Report
from .serializers import _SERIALIZERS


def _fmt_size(n: int | None) -> str:
    """A size as the rest of nbisolate prints it (:func:`nbisolate.units.format_bytes`); ``-`` if unknown."""
    return "-" if n is None else format_bytes(n)


def _fmt_time(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


_MARK = {"ok": "ok", "fails": "FAILS", "spawn": "FAILS under spawn", "unknown": "unknown"}


def _headline(report: Report) -> str:
    if report.ok:
        return f"{report.name} ({report.type_name}): crosses a process boundary with every serializer checked"
    works = [r.label for r in report.results.values() if r.ok]
    fails = [r.label for r in report.results.values() if r.ok is False]
    text = f"{report.name} ({report.type_name}): fails with {', '.join(fails) or 'none'}"
    if works:
        text += f"; works with {', '.join(works)}"
    return text


def _report_text(report: Report) -> str:
    lines = [_headline(report)]
    width = max((len(r.label) for r in report.results.values()), default=10)
    for r in report.results.values():
        extra = f"  {r.error}" if r.error and not r.ok else f"  {r.note}" if r.note else ""
        lines.append(
            f"  {r.label:<{width}}  {_MARK[r.verdict]:<17} {_fmt_size(r.size):>9}  "
            f"{_fmt_time(r.seconds):>9}{extra}"
        )
    if report.problems:
        n = len(report.problems) + report.omitted
        lines.append(f"{n} problem{'s' if n != 1 else ''}:")
        lines.extend(_problems_text(report.problems))
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _groups(problems: list[Problem]) -> list[list[Problem]]:
    """Runs of problems with the same kind and verdict: explained once, listed together."""
    out: list[list[Problem]] = []
    for p in problems:
        if out and (out[-1][0].category, out[-1][0].fails_with, out[-1][0].severity) == (
            p.category, p.fails_with, p.severity,
        ) and p.category != "large":
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _problems_text(problems: list[Problem]) -> list[str]:
    lines: list[str] = []
    for group in _groups(problems):
        if len(group) == 1:
            lines.extend(_problem_text(group[0]))
            continue
        p0 = group[0]
        fails = f"fails with {', '.join(p0.fails_with)}" if p0.fails_with else p0.severity
        lines.append(f"  {len(group)} x {p0.title}; {fails}:")
        width = max(len(p.path) for p in group)
        for p in group:
            what = f"  {p.what}" if p.what and p.what != p.type_name else ""
            lines.append(f"    {p.path:<{width}}  [{p.type_name}]{what}")
            if p.also_at:
                lines.append(f"    {'':<{width}}  also reachable as: {', '.join(p.also_at)}")
        why = _CATEGORIES[p0.category].why or p0.reason
        lines.append(f"      why:  {why}")
        lines.append(f"      fix:  {p0.fix}")
    return lines


def _problem_text(p: Problem) -> list[str]:
    fails = f"fails with {', '.join(p.fails_with)}" if p.fails_with else p.severity
    out = [f"  {p.path}  [{p.type_name}]  {p.title}; {fails}"]
    if p.what and p.what != p.type_name:
        out.append(f"      what: {p.what}")
    out.append(f"      why:  {p.reason}")
    out.append(f"      fix:  {p.fix}")
    if p.also_at:
        out.append(f"      also reachable as: {', '.join(p.also_at)}")
    return out


# Inline styles: notebook front ends restyle tables (right-aligned cells) and
# may strip <style> blocks from outputs, but keep simple style attributes.
_CELL = "text-align:left;vertical-align:top;padding:2px 8px"
_COLOR = {"ok": "color:#1a7f37", "bad": "color:#cf222e;font-weight:bold", "warn": "color:#9a6700"}


def _td(content: str, kind: str | None = None, attrs: str = "") -> str:
    style = _CELL + (";" + _COLOR[kind] if kind else "")
    return f"<td style='{style}'{attrs}>{content}</td>"


def _th_row(*names: str) -> str:
    cells = "".join(f"<th style='{_CELL}'>{html.escape(n)}</th>" for n in names)
    return f"<thead><tr>{cells}</tr></thead>"


def _cell_class(verdict: str) -> str:
    return {"ok": "ok", "fails": "bad", "spawn": "bad"}.get(verdict, "warn")


def _problems_html(problems: list[Problem]) -> str:
    esc = html.escape
    rows = []
    for group in _groups(problems):
        n = len(group)
        for i, p in enumerate(group):
            fails = ", ".join(p.fails_with) or p.severity
            kind = "bad" if p.severity == "error" else "warn"
            also = f"<br><small>also: {esc(', '.join(p.also_at))}</small>" if p.also_at else ""
            cells = _td(f"<code>{esc(p.path)}</code>{also}") + _td(
                f"<code>{esc(p.type_name)}</code><br><small>{esc(p.what)}</small>"
            )
            if i == 0:
                why = p.reason if n == 1 else (_CATEGORIES[p.category].why or p.reason)
                span = f" rowspan='{n}'" if n > 1 else ""
                cells += (
                    _td(f"{esc(p.title)}<br><small>{esc(fails)}</small>", kind, span)
                    + _td(esc(why), None, span)
                    + _td(esc(p.fix), None, span)
                )
            rows.append(f"<tr>{cells}</tr>")
    return (
        "<table>" + _th_row("member", "type", "problem", "why", "fix")
        + "<tbody>" + "".join(rows) + "</tbody></table>"
    )


def _report_html(report: Report) -> str:
    esc = html.escape
    rows = []
    for r in report.results.values():
        detail = esc(r.error) if r.error and not r.ok else esc(r.note or "")
        rows.append(
            "<tr>"
            + _td(f"{esc(r.label)}<br><small>{esc(r.used_by)}</small>")
            + _td(esc(_MARK[r.verdict]), _cell_class(r.verdict))
            + _td(_fmt_size(r.size)) + _td(_fmt_time(r.seconds)) + _td(detail)
            + "</tr>"
        )
    parts = [
        "<div class='nbisolate-pickle-check'>",
        f"<p><b>{esc(_headline(report))}</b></p>",
        "<table>", _th_row("serializer", "result", "size", "time", "detail"),
        "<tbody>", "".join(rows), "</tbody></table>",
    ]
    if report.problems:
        parts.append(_problems_html(report.problems))
    for note in report.notes:
        parts.append(f"<p><small>note: {esc(note)}</small></p>")
    parts.append("</div>")
    return "".join(parts)


def _namespace_text(ns: NamespaceReport) -> str:
    single = _single(ns)
    if single is not None:
        return _report_text(single)
    bad = [n for n, r in ns.reports.items() if r.problems or not r.ok]
    lines = [
        f"pickle_check: {_plural(len(ns.reports), 'variable')} checked in "
        f"{_fmt_time(ns.seconds)}; {len(bad)} with problems"
    ]
    sers = list(next(iter(ns.reports.values())).results) if ns.reports else []
    if ns.reports:
        width = max(4, *(len(n) for n in ns.reports))
        tw = max(4, min(max(len(r.type_name) for r in ns.reports.values()), 30))
        labels = [_SERIALIZERS[s].label if s in _SERIALIZERS else s for s in sers]
        cw = max(*(len(m) for m in _MARK.values()), *(len(lb) for lb in labels))
        head = f"  {'name':<{width}}  {'type':<{tw}}  " + "  ".join(
            f"{lb:<{cw}}" for lb in labels
        )
        lines.append(head + "       size")
        for n, r in ns.reports.items():
            cols = "  ".join(
                f"{_MARK[r.results[s].verdict]:<{cw}}" if s in r.results else " " * cw
                for s in sers
            )
            lines.append(f"  {n:<{width}}  {r.type_name[:tw]:<{tw}}  {cols}  {_fmt_size(r.size):>9}")
    if ns.modules:
        lines.append(
            "modules (fine with %%isolate: re-imported by name, not pickled): "
            + ", ".join(ns.modules)
        )
    for n in bad:
        r = ns.reports[n]
        if r.problems:
            lines.append(f"{n}:")
            lines.extend(_problems_text(r.problems))
        for note in r.notes:
            lines.append(f"  note: {note}")
    for note in ns.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _single(ns: NamespaceReport) -> Report | None:
    """The one report of ``%pickle_check x``: shown in full rather than as a table row."""
    if len(ns.reports) == 1 and not ns.modules and not ns.notes:
        return next(iter(ns.reports.values()))
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _namespace_html(ns: NamespaceReport) -> str:
    single = _single(ns)
    if single is not None:
        return _report_html(single)
    esc = html.escape
    sers = list(next(iter(ns.reports.values())).results) if ns.reports else []
    labels = [_SERIALIZERS[s].label if s in _SERIALIZERS else s for s in sers]
    bad = [n for n, r in ns.reports.items() if r.problems or not r.ok]
    parts = [
        "<div class='nbisolate-pickle-check'>",
        f"<p><b>pickle_check: {_plural(len(ns.reports), 'variable')} checked in "
        f"{_fmt_time(ns.seconds)}; {len(bad)} with problems</b></p>",
    ]
    if ns.reports:
        rows = []
        for n, r in ns.reports.items():
            cells = "".join(
                _td(esc(_MARK[r.results[s].verdict]), _cell_class(r.results[s].verdict))
                if s in r.results else _td("")
                for s in sers
            )
            rows.append(
                "<tr>" + _td(f"<code>{esc(n)}</code>") + _td(f"<code>{esc(r.type_name)}</code>")
                + cells + _td(_fmt_size(r.size)) + _td(str(len(r.problems))) + "</tr>"
            )
        parts.append(
            "<table>" + _th_row("name", "type", *labels, "size", "problems")
            + "<tbody>" + "".join(rows) + "</tbody></table>"
        )
    if ns.modules:
        parts.append(
            "<p>modules (fine with %%isolate: re-imported by name, not pickled): "
            + ", ".join(f"<code>{esc(m)}</code>" for m in ns.modules) + "</p>"
        )
    problems = [p for n in bad for p in ns.reports[n].problems]
    if problems:
        parts.append(_problems_html(problems))
    notes = [f"{n}: {note}" for n in bad for note in ns.reports[n].notes] + ns.notes
    for note in notes:
        parts.append(f"<p><small>note: {esc(note)}</small></p>")
    parts.append("</div>")
    return "".join(parts)
