"""Self-contained HTML pages: the test report (``report/index.html``) and the comparison of runs.

One file each, with its styles, its script and its images inline (images as data URIs), so it can
be mailed, archived or opened on a machine without a network; its Content-Security-Policy lets it
load nothing from anywhere else. Every name in it is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from caltech_cli.images import UNREADABLE
from caltech_cli.report.pictures import thumbnail
from caltech_cli.report.stats import Estimate

# Nothing but the page itself: no script, style, font or image from elsewhere, no request at all.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
THUMBNAIL = 112

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .25em .6em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; } th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
.metrics td.n { font-size: 1.2em; } .small { color: #666; font-size: .9em; }
.gallery { display: flex; flex-wrap: wrap; gap: .6em; } figure { margin: 0; width: 132px; font-size: .8em; }
figure img { width: 112px; height: 112px; object-fit: contain; background: #fafafa; border: 2px solid #ccc; }
figure.wrong img { border-color: #c62828; } img.plot { max-width: 100%; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((header, column) => {
  header.addEventListener("click", () => {
    const table = header.closest("table"), body = table.tBodies[0];
    const ascending = header.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(other => other.removeAttribute("aria-sort"));
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = row => {
      const cell = row.cells[column], text = cell.dataset.value ?? cell.textContent, number = parseFloat(text);
      return isNaN(number) ? text.toLowerCase() : number;
    };
    [...body.rows]
      .sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); })
      .forEach(row => body.appendChild(row));
  });
});
"""

METRIC_NAMES = {
    "acc": "top-1 accuracy",
    "acc_top5": "top-5 accuracy",
    "acc_macro": "mean per-class accuracy",
    "f1_macro": "macro-F1",
    "ece": "expected calibration error",
}


def escaped(value: object) -> str:
    return html.escape(str(value), quote=True)


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def thumbnail_uri(path: Path) -> str | None:
    """A small JPEG of the image as a data URI; None when it cannot be read."""
    try:
        image = thumbnail(path, THUMBNAIL)
    except UNREADABLE:
        return None
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def page(title: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{escaped(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + f"\n<script>{SORT_SCRIPT}</script></body></html>\n"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], css: str = "sortable", attrs: str = "") -> str:
    """A table; a float cell is right-aligned with 4 decimals and sorts by its value; None is empty."""

    def cell(value: object) -> str:
        if value is None:  # a figure with nothing to compute it on (a class without test images)
            return "<td class=n></td>"
        if isinstance(value, float):
            return f'<td class=n data-value="{value!r}">{value:.4f}</td>'
        if isinstance(value, int):
            return f'<td class=n data-value="{value}">{value}</td>'
        return f"<td>{escaped(value)}</td>"

    head = f"<thead><tr>{''.join(f'<th>{escaped(h)}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table class={css} {attrs}>{head}<tbody>\n{body}\n</tbody></table>"


def gallery(items: Sequence[tuple[Path, str, bool]]) -> str:
    """Thumbnails with captions; a wrong prediction framed in red."""
    figures = []
    for path, caption, wrong in items:
        uri = thumbnail_uri(path)
        image = f'<img alt="{escaped(path.name)}" src="{uri}">' if uri else "<div>(cannot be read)</div>"
        lines = "<br>".join(escaped(line) for line in caption.splitlines())
        figures.append(
            f'<figure class="{"wrong" if wrong else "right"}">{image}<figcaption>{lines}</figcaption></figure>'
        )
    return "<div class=gallery>" + "".join(figures) + "</div>"


def metrics_table(estimates: dict[str, Estimate]) -> str:
    rows = [(METRIC_NAMES.get(name, name), e.value, f"{e.low:.4f} - {e.high:.4f}") for name, e in estimates.items()]
    return table(["metric", "value", "95% interval (bootstrap)"], rows, css="metrics")


def test_report_page(
    provenance: dict[str, str],
    estimates: dict[str, Estimate],
    rows: Sequence[dict],
    pairs: Sequence[tuple[str, str, int, int, list[tuple[Path, str, bool]]]],
    worst: Sequence[tuple[Path, str, bool]],
    doubts: Sequence[tuple[Path, str, bool]],
    pictures: dict[str, Path],
) -> str:
    """The test report: where the numbers come from, the headline metrics with their intervals,
    the sortable per-class table, the mistakes in view and the curves.

    ``rows``: per-class dicts (``class, support, precision, recall, f1, average_precision,
    confused_with``); ``pairs``: (true, predicted, count, support of true, example thumbnails);
    ``worst``, ``doubts``: thumbnails (file, caption, wrong); ``pictures``: title -> PNG.
    """
    sections = [
        "<h1>Test report</h1>",
        "<h2>Where the numbers come from</h2>" + table([], list(provenance.items()), css="provenance"),
        "<h2>Metrics</h2>"
        + metrics_table(estimates)
        + "<p class=small>Intervals: 2.5th and 97.5th percentiles of 1,000 bootstrap resamples of the test images.</p>",
        "<h2>Per class</h2><p class=small>Click a column to sort.</p>"
        + table(
            ["class", "support", "precision", "recall", "F1", "average precision", "most confused with"],
            [
                (
                    r["class"],
                    r["support"],
                    r["precision"],
                    r["recall"],
                    r["f1"],
                    r["average_precision"],
                    r["confused_with"],
                )
                for r in rows
            ],
            attrs='id="per-class"',
        ),
        "<h2>Most confused pairs</h2>"
        + (
            "".join(
                f"<h3>{escaped(true)} &rarr; {escaped(predicted)}: {count} of {support}</h3>" + gallery(examples)
                for true, predicted, count, support, examples in pairs
            )
            or "<p>No mistakes on the test set.</p>"
        ),
        "<h2>The test images with the highest loss</h2>" + gallery(worst),
        "<h2>Labels the model doubts</h2><p class=small>Test images whose label the model contradicts with "
        "confidence (confident learning: another class's probability reaches that class's mean on its own "
        "images), most contradicted first: candidates for a wrong label, to look at.</p>"
        + (gallery(doubts) if doubts else "<p>None.</p>"),
        *(
            f"<h2>{escaped(title)}</h2><img class=plot alt='{escaped(title)}' src='{png_uri(path)}'>"
            for title, path in pictures.items()
        ),
    ]
    return page("Test report", sections)


def comparison_page(
    runs: Sequence[str],
    metrics: Sequence[Sequence[object]],
    header: Sequence[str],
    per_class: dict[str, list],
    curves: Path,
    notes: Sequence[str] = (),
) -> str:
    """Several runs side by side: their curves, their metrics (with ``notes`` under them), and
    each class's test accuracy in each run with the difference between the last run and the first."""
    sections = [
        f"<h1>Runs compared</h1><p class=small>{escaped(' vs '.join(runs))}</p>",
        "<h2>Metrics</h2>"
        + table(header, metrics, attrs='id="metrics"')
        + "".join(f"<p class=small>{escaped(note)}</p>" for note in notes),
        f"<h2>Validation curves</h2><img class=plot alt=curves src='{png_uri(curves)}'>",
    ]
    if per_class:
        columns = ["class", *runs, f"{runs[-1]} - {runs[0]}" if len(runs) > 1 else "difference"]
        rows = []
        for name, accuracies in per_class.items():
            known = [a for a in (accuracies[0], accuracies[-1]) if a is not None]
            difference = accuracies[-1] - accuracies[0] if len(known) == 2 else ""
            rows.append([name, *("" if a is None else a for a in accuracies), difference])
        sections.append(
            "<h2>Test accuracy per class</h2><p class=small>Click a column to sort.</p>"
            + table(columns, rows, attrs='id="per-class"')
        )
    return page("Runs compared", sections)
