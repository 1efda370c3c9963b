"""``report.html``: one self-contained page a reviewer can attach to an audit.

The page holds the verdicts, every warning, the figures (PNG embedded as
``data:`` URIs), the full table with its confidence-interval columns, the
settings and versions from ``run.json`` and the images used and skipped. It
loads nothing from the network and runs no script: a static document that
renders the same in any browser, offline, years later.

:func:`summary_html` is the same page body without the figures; it is what
``AlignmentReport._repr_html_`` shows in a notebook.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

# Figures in reading order; any other stem (sweeps) follows.
FIGURE_ORDER = ("alignment_heatmap", "alignment_by_depth", "prediction", "placement", "placement_kl",
                "alignment_by_depth_fitted")
FIGURE_CAPTIONS = {
    "alignment_heatmap": "aligned_error after the inverse warp, transform × layer (1 = chance)",
    "alignment_by_depth": "per transform: aligned error with its 95% CI band, unaligned and floor as reference lines",
    "alignment_by_depth_fitted": "searched warps and channel maps against the inverse warp (held-out images)",
    "prediction": "the model's output: top-1 agreement between x and g x (95% Wilson CI) and mean KL(p(x) || p(g x)) "
                  "in nats (95% CI), with chance (an unrelated image) and, for interpolated g, the floor",
    "placement": "an exact STN at each place (input, then the layers by depth): top-1 agreement with f(x), 95% Wilson "
                 "band; dashed: no STN, dotted: chance",
    "placement_kl": "the same placements: mean KL(p(x) || p_placed) in nats, 95% band; dashed: no STN, dotted: chance",
}
PREDICTION_TABLE = ("model", "transform", "n_images", "prediction_agreement", "prediction_agreement_ci_low",
                    "prediction_agreement_ci_high", "prediction_agreement_chance", "prediction_agreement_floor",
                    "prediction_kl", "prediction_kl_ci_low", "prediction_kl_ci_high", "prediction_kl_chance",
                    "prediction_kl_floor")
# Lists in run.json shown in their own sections, not in the settings table.
LISTED_KEYS = ("images_used", "images_skipped", "layers_skipped", "verdicts", "warnings", "versions", "machine")

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #555; margin-top: 0; }
.alert { background: #b00020; color: #fff; padding: .5em .8em; font-weight: 600; border-radius: 4px; }
ul.warnings li { color: #8a4b00; } ul.verdicts li { margin: .25em 0; }
figure { margin: 1em 0; overflow-x: auto; } figure img { max-width: 100%; max-height: 80vh; width: auto; height: auto;
  border: 1px solid #eee; cursor: zoom-in; }
input.zoom { display: none; } input.zoom:checked + label img { max-width: none; max-height: none; cursor: zoom-out; }
figcaption { color: #555; font-size: .9em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12px; } th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f4f6; position: sticky; top: 0; } td.text, th.text { text-align: left; }
code { font-size: .95em; }
table.grid { font-size: 14px; margin: .5em 0; } table.grid td { min-width: 4.5em; }
td.grid-aligned { background: #e3f4e6; } td.grid-partly { background: #fff4d6; }
td.grid-not-aligned { background: #fbe1e1; } td.grid-missing { color: #999; }
"""


def figure_png(fig, dpi: int = 130) -> bytes:
    """A matplotlib figure as PNG bytes (the figure stays open)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _list(items: list[str], css: str, empty: str) -> str:
    if not items:
        return f"<p>{_esc(empty)}</p>"
    return f'<ul class="{css}">' + "".join(f"<li>{_esc(item)}</li>" for item in items) + "</ul>"


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def _table_html(table: pd.DataFrame) -> str:
    """Every column of ``table``, numbers to 4 significant digits, text left-aligned."""
    text = {c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c])}
    head = "".join(f'<th class="{"text" if c in text else "num"}">{_esc(c)}</th>' for c in table.columns)
    rows = []
    for record in table.itertuples(index=False):
        cells = "".join(f'<td class="{"text" if c in text else "num"}">{_esc(_format_cell(v))}</td>'
                        for c, v in zip(table.columns, record))
        rows.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _settings_html(meta: Mapping[str, Any]) -> str:
    rows = []
    for key, value in meta.items():
        if key in LISTED_KEYS:
            continue
        shown = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, default=str)
        rows.append(f'<tr><th class="text">{_esc(key)}</th><td class="text"><code>{_esc(shown)}</code></td></tr>')
    for section in ("versions", "machine"):
        for key, value in (meta.get(section) or {}).items():
            rows.append(f'<tr><th class="text">{_esc(section)}.{_esc(key)}</th><td class="text"><code>{_esc(value)}</code></td></tr>')
    return f'<div class="scroll"><table>{"".join(rows)}</table></div>'


def _images_html(meta: Mapping[str, Any]) -> str:
    used = [str(p) for p in meta.get("images_used") or []]
    skipped = meta.get("images_skipped") or []
    parts = [f"<p>{len(used)} image(s) used, {len(skipped)} skipped.</p>"]
    if used:
        parts.append("<ol>" + "".join(f"<li><code>{_esc(p)}</code></li>" for p in used) + "</ol>")
    if skipped:
        parts.append("<p>Skipped:</p><ul>" + "".join(
            f"<li><code>{_esc(s.get('path') if isinstance(s, dict) else s)}</code>: "
            f"{_esc(s.get('reason', '') if isinstance(s, dict) else '')}</li>" for s in skipped) + "</ul>")
    return "".join(parts)


def _figures_html(figures: Mapping[str, bytes]) -> str:
    stems = [s for s in FIGURE_ORDER if s in figures] + [s for s in figures if s not in FIGURE_ORDER]
    parts = []
    for stem in stems:
        data = base64.b64encode(figures[stem]).decode("ascii")
        caption = FIGURE_CAPTIONS.get(stem, "sweep: errors against the swept value, one line per layer" if stem.startswith("sweep_") else "")
        key = f"zoom-{len(parts)}"  # a checkbox per figure: clicking the image shows it at full size (no script)
        parts.append(f'<figure><input type="checkbox" class="zoom" id="{key}"><label for="{key}">'
                     f'<img alt="{_esc(stem)}" src="data:image/png;base64,{data}"></label>'
                     f"<figcaption><code>{_esc(stem)}.png</code> — {_esc(caption)} (click to enlarge)</figcaption></figure>")
    return "".join(parts)


def _prediction_html(table: pd.DataFrame, meta: Mapping[str, Any]) -> str:
    """The output rows (the model's prediction under each transform), or why there are none."""
    from .output_rows import output_rows

    rows = output_rows(table)
    head = meta.get("output") or {}
    if rows.empty:
        reason = head.get("reason") or "this table has no output rows"
        return f"<p>No prediction rows: {_esc(reason)}.</p>"
    note = (f"<p>{_esc(head.get('evidence', ''))}. Agreement: share of images whose top-1 class is the same for x and "
            "g x (95% Wilson interval); KL: mean KL(p(x) || p(g x)) of the softmax outputs in nats (95% Student-t "
            "interval); <code>_chance</code>: x against an unrelated image; <code>_floor</code>: x against the image "
            "round trip g<sup>-1</sup>(g x).</p>")
    return note + _table_html(rows[[c for c in PREDICTION_TABLE if c in rows.columns]])



def _placement_html(table: pd.DataFrame) -> list[str]:
    """The placement grid, one line per transform and the costliest modules (nothing without placement rows)."""
    from .output_rows import placement_rows
    from .placement import PlacementGrid, costliest_modules, placement_verdicts

    if placement_rows(table).empty:
        return []
    grid = PlacementGrid.from_table(table)
    parts = ["<h2>Where could an STN go?</h2>", grid.html(), _list(placement_verdicts(table), "verdicts", "no rows")]
    costly = costliest_modules(table)
    if len(costly):
        parts += ["<p>Largest drops in agreement between one place and the next (the modules between them lose that "
                  "share of the predictions):</p>", _table_html(costly)]
    return parts


def _layer_count(table) -> int:
    """Layers measured (the output row, the model's prediction, is not a layer)."""
    from .output_rows import layer_rows

    return int(layer_rows(table)["layer"].nunique()) if len(table) else 0

def summary_html(table: pd.DataFrame, meta: Mapping[str, Any], verdicts: list[str], warnings: list[str],
                 figures: Mapping[str, bytes] | None = None) -> str:
    """The report as an HTML fragment: header, verdicts, warnings, figures (if given), table, settings, images."""
    model = meta.get("model") or (table["model"].iloc[0] if len(table) else "?")
    random = any("RANDOM WEIGHTS" in w for w in warnings)
    images = len(meta.get("images_used") or []) or (int(table["n_images"].max()) if len(table) else 0)
    parts = [
        f"<h1>alignscope report — {_esc(model)}</h1>",
        f'<p class="sub">weights: {_esc(meta.get("weights", "?"))} · {images} images · '
        f'{_layer_count(table)} layers · {table["transform"].nunique() if len(table) else 0} transforms · '
        f'alignscope {_esc(meta.get("alignscope_version", "?"))}</p>',
    ]
    if random:
        parts.append('<p class="alert">RANDOM WEIGHTS (not pretrained): these numbers describe an untrained network.</p>')
    from .grid import SummaryGrid, short_verdicts

    grid = SummaryGrid.from_table(table)
    if grid.transforms:
        parts += ["<h2>Summary</h2>", grid.html(), _list(short_verdicts(table), "verdicts", "no rows")]
    parts += _placement_html(table)
    from .lie import lie_table

    wide = lie_table(table)
    if not wide.empty:
        parts += ["<h2>Lie derivatives</h2>", "<p>lie_error = ‖M L F‖ / chance distance per unit t of each generator "
                  "(0: equivariant to it); the output column is the mean |d p<sub>k</sub>/dt| over classes (Gruver et "
                  "al. 2023). See docs/measures.md.</p>", _table_html(wide.reset_index())]
    parts += [f"<h2>Warnings ({len(warnings)})</h2>", _list(warnings, "warnings", "No warnings.")]
    if figures is not None:
        parts += ["<h2>Figures</h2>", _figures_html(figures) if figures else "<p>No figures were drawn (--no-plots).</p>"]
    parts += [f"<details{'' if grid.transforms else ' open'}><summary><h2 style=\"display:inline\">Verdicts in full "
              f"({len(verdicts)})</h2></summary>", _list(verdicts, "verdicts", "no rows"), "</details>"]
    parts += ["<h2>Prediction (the model's output)</h2>", _prediction_html(table, meta),
              f"<details><summary><h2 style=\"display:inline\">Table ({len(table)} rows, every column of "
              "alignment.csv)</h2></summary>", _table_html(table), "</details>",
              "<h2>Settings and versions (run.json)</h2>", _settings_html(meta),
              "<h2>Images</h2>", _images_html(meta)]
    return "\n".join(parts)


def report_page(table: pd.DataFrame, meta: Mapping[str, Any], verdicts: list[str], warnings: list[str],
                figures: Mapping[str, bytes]) -> str:
    """The whole ``report.html`` document (UTF-8, no script, no external resource)."""
    title = f"alignscope report — {meta.get('model', '')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            f"{summary_html(table, meta, verdicts, warnings, figures)}\n</body></html>\n")


def write_report_page(folder: Path, table: pd.DataFrame, meta: Mapping[str, Any], verdicts: list[str],
                      warnings: list[str], figures: Mapping[str, bytes]) -> Path:
    """Write ``folder/report.html``."""
    path = Path(folder) / "report.html"
    path.write_text(report_page(table, meta, verdicts, warnings, figures), encoding="utf-8")
    return path
