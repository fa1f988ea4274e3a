"""Pictures: attention heatmaps (PNG, and an HTML page that needs no package) and training curves.

matplotlib is an optional extra (`pip install 'nmt[plot]'`), imported only when a
PNG is drawn; figures are built with the object-oriented API, never pyplot, so
drawing changes no global backend or state. The HTML page is self-contained: one
file of tables coloured with inline CSS, no script and no external asset.
"""

from __future__ import annotations

import html
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from nmt.attention import AttentionMap
from nmt.checkpoint import is_checkpoint_file
from nmt.errors import NmtError
from nmt.io import OutputFolder, atomic_dir, atomic_path, read_lines
from nmt.progress import SILENT, Reporter

ATTENTION_FOLDER = OutputFolder("nmt attention", "index.html",
                                lambda name: name == "index.html" or re.fullmatch(r"line_\d+\.png", name) is not None)
CELL_INCHES = 0.26  # side of one heatmap cell in a PNG
CURVES = (  # (metric kind, key, panel title) of `nmt plot`
    ("train", "loss", "training loss"),
    ("valid", "loss", "validation loss"),
    ("valid", "bleu", "validation BLEU"),
    ("train", "lr", "learning rate"),
)


def figure_class() -> Any:
    """matplotlib's Figure, or a one-line error naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise NmtError("matplotlib is not installed: pip install 'nmt[plot]'") from None
    return Figure


def _save(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def printable(text: str) -> str:
    """Control characters (an untrained model's byte pieces decode to them) spelled as \\xNN."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _panels(amap: AttentionMap) -> list[list[tuple[str, Tensor]]]:
    """One row per decoder layer: the head average, then each head if kept."""
    layers = amap.weights.size(0)
    rows = []
    for layer in range(layers):
        if amap.heads is None:
            rows.append([(f"layer {layer + 1}" if layers > 1 else "attention", amap.weights[layer])])
        else:
            rows.append([(f"layer {layer + 1}, heads averaged", amap.weights[layer])]
                        + [(f"layer {layer + 1}, head {h + 1}", amap.heads[layer, h])
                           for h in range(amap.heads.size(1))])
    return rows


def attention_png(amap: AttentionMap, path: Path) -> None:
    """One heatmap per layer (and per head if kept): source pieces across, output pieces down."""
    rows = _panels(amap)
    source, target = len(amap.source), len(amap.target)
    label = 0.075  # inches per character of a tick label at font size 8
    width = len(rows[0]) * (source * CELL_INCHES + 0.7 + label * max(map(len, amap.target))) + 1.2  # + colour bar
    height = len(rows) * (target * CELL_INCHES + 0.9 + label * max(map(len, amap.source))) + 0.8  # + title
    figure = figure_class()(figsize=(max(width, 4.0), max(height, 3.0)), layout="constrained")
    axes = figure.subplots(len(rows), len(rows[0]), squeeze=False)
    for row, row_axes in zip(rows, axes, strict=True):
        for (title, matrix), ax in zip(row, row_axes, strict=True):
            image = ax.imshow(matrix.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks(range(source), amap.source, rotation=90, fontsize=8)
            ax.set_yticks(range(target), amap.target, fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("source", fontsize=8)
            ax.set_ylabel("output", fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    wrap = max(40, int(width * 12))
    figure.suptitle(textwrap.fill(f"line {amap.line}: {printable(amap.text)}", wrap) + "\n"
                    + textwrap.fill(f"→ {printable(amap.translation)}", wrap), fontsize=9)
    _save(figure, path)


def _table(title: str, matrix: Tensor, source: list[str], target: list[str]) -> str:
    """A heatmap as an HTML table: cell opacity is the weight, the tooltip gives the number."""
    head = "".join(f"<th class=c><span>{html.escape(p)}</span></th>" for p in source)
    body = []
    for piece, weights in zip(target, matrix.tolist(), strict=True):
        cells = "".join(
            f'<td style="background:rgba(8,69,148,{w:.3f})" '
            f'title="{html.escape(piece)} ← {html.escape(s)}: {w:.3f}"></td>'
            for s, w in zip(source, weights, strict=True)
        )
        body.append(f"<tr><th class=r>{html.escape(piece)}</th>{cells}</tr>")
    return (f"<figure><figcaption>{html.escape(title)}</figcaption><table>"
            f"<tr><th></th>{head}</tr>{''.join(body)}</table></figure>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{border-top:1px solid #ccc;padding-top:.5em;margin-top:1.5em}
.text{margin:.2em 0}.text b{display:inline-block;width:7em;color:#555}
.maps{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start;margin-top:1em}
figure{margin:0}figcaption{font-size:.85em;color:#555;margin-bottom:.3em}
table{border-collapse:collapse;font-size:12px}
td{width:18px;height:18px;min-width:18px;border:1px solid #eee;padding:0}
th{font-weight:normal;padding:1px 4px}th.r{text-align:right;white-space:nowrap}
th.c{vertical-align:bottom;padding:4px 0}th.c span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap}
.legend{display:inline-block;width:12em;height:.9em;vertical-align:middle;
background:linear-gradient(to right,rgba(8,69,148,0),rgba(8,69,148,1));border:1px solid #ccc}
"""


def attention_html(maps: Sequence[AttentionMap], path: Path, title: str = "Cross-attention") -> None:
    """Every sentence's heatmaps on one self-contained page (no script, no external file)."""
    sections = []
    for amap in maps:
        layers = "".join(  # one line of maps per layer
            "<div class=maps>"
            + "".join(_table(name, matrix, amap.source, amap.target) for name, matrix in row)
            + "</div>"
            for row in _panels(amap)
        )
        sections.append(
            f'<section id="line-{amap.line}"><h2>Line {amap.line}</h2>'
            f'<p class=text><b>source</b>{html.escape(printable(amap.text))}</p>'
            f'<p class=text><b>translation</b>{html.escape(printable(amap.translation))}</p>'
            f'{layers}</section>'
        )
    index = " ".join(f'<a href="#line-{m.line}">{m.line}</a>' for m in maps)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(maps)} sentences; rows are output pieces, columns source pieces; each row sums to 1. "
        f'0 <span class=legend></span> 1 (hover a cell for its weight)</p><p>Lines: {index}</p>'
        f"{''.join(sections)}</body></html>\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def write_attention(maps: Sequence[AttentionMap], directory: Path, png: bool = True, overwrite: bool = False,
                    reporter: Reporter = SILENT) -> list[Path]:
    """DIRECTORY/index.html with every sentence and, if `png`, DIRECTORY/line_N.png per sentence.

    The directory appears complete or not at all; --overwrite replaces only an earlier one of these.
    """
    if png:
        figure_class()  # fail before any work
    width = max(4, len(str(max((m.line for m in maps), default=0))))
    names = ["index.html"] + ([f"line_{m.line:0{width}d}.png" for m in maps] if png else [])
    with atomic_dir(directory, overwrite, kind=ATTENTION_FOLDER) as tmp:
        attention_html(maps, tmp / names[0])
        if png:
            advance = reporter.task("drawing", len(maps), "sentences")
            for amap, name in zip(maps, names[1:], strict=True):
                attention_png(amap, tmp / name)
                advance(1)
    return [directory / name for name in names]


@dataclass
class RunMetrics:
    """One training run's curves: per (kind, key), the updates and the values logged there."""

    path: Path
    series: dict[tuple[str, str], tuple[list[int], list[float]]]

    @property
    def last_update(self) -> int:
        return max((updates[-1] for updates, _ in self.series.values() if updates), default=0)


def read_metrics(run: Path) -> RunMetrics:
    """Read RUN/metrics.jsonl (or a metrics file itself); for an update logged twice, as after
    resuming from an earlier checkpoint, the later record wins. A partial last line (no newline
    after it: the writer was killed mid-line) is left out; a bad line anywhere else is an error."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if run.is_dir() and not path.exists():
        raise NmtError(f"{run}: no metrics.jsonl (not a training run directory?)")
    if is_checkpoint_file(path):
        raise NmtError(f"{path}: a checkpoint, not a metrics file: plot its run directory ({path.parent}) "
                       "or the metrics.jsonl there")
    by_update: dict[tuple[str, str], dict[int, float]] = {(kind, key): {} for kind, key, _ in CURVES}
    bad: NmtError | None = None
    for number, line in enumerate(read_lines(path), start=1):
        if bad is not None:
            raise bad
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind, update = record["kind"], int(record["update"])
        except (ValueError, KeyError, TypeError):
            bad = NmtError(f"{path}: line {number} is not a metrics record")
            continue
        for (want, key), values in by_update.items():
            if kind == want and isinstance(record.get(key), (int, float)):
                values[update] = float(record[key])
    if bad is not None and _ends_with_newline(path):
        raise bad
    series = {name: (sorted(values), [values[u] for u in sorted(values)]) for name, values in by_update.items()}
    return RunMetrics(path.parent, series)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def run_labels(runs: Sequence[RunMetrics]) -> list[str]:
    """Directory names, or whole paths when two runs share a name."""
    names = [run.path.name or str(run.path) for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def training_curves(runs: Sequence[RunMetrics], path: Path) -> None:
    """Training and validation loss, validation BLEU and learning rate against updates, one colour per run."""
    figure = figure_class()(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2).flatten()
    labels = run_labels(runs)
    for ax, (kind, key, title) in zip(axes, CURVES, strict=True):
        drawn = False
        for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
            updates, values = run.series[(kind, key)]
            if updates:
                ax.plot(updates, values, color=f"C{index % 10}", label=label,
                        marker="o" if kind == "valid" else None, markersize=3, linewidth=1.2)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"no {title} logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[0].legend(fontsize=8)
    _save(figure, path)
