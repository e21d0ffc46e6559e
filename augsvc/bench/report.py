"""The bench's output: one `Figure` per measurement, the ratios, the printed table, the chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = ["RATIOS", "ROWS", "Figure", "Ratio", "format_table", "plot", "plot_rows", "ratios",
           "row", "target_marks"]


@dataclass
class Figure:
    """One measured line of the table."""

    key: str
    label: str
    img_s: float | None = None
    mb_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    img_cpu_s: float | None = None  # images per CPU-second of every process involved
    note: str = ""
    extra: dict = field(default_factory=dict)


class Ratio(NamedTuple):
    """`num`/`den` in img/s (or MB/s), with its target (None: informative) and meaning."""

    num: str
    den: str
    unit: str
    target: float | None
    text: str

    @property
    def name(self) -> str:
        return f"{self.num}/{self.den}"


RATIOS = (
    Ratio("a", "a0", "img_s", 0.92, "the colour kernel's cost (issue 13: >= 0.92 on this "
          "CPU, >= 0.95 on an H100)"),
    Ratio("b", "a", "img_s", 0.9, "the service end to end against its own engine"),
    Ratio("b", "c", "mb_s", None, "(MB/s) end to end against the transport ceiling"),
    Ratio("b'", "c", "mb_s", 0.8, "(MB/s) through the loader incl. its copy into batches"),
    Ratio("b''", "c", "mb_s", 0.8, "(MB/s) the wire protocol alone"),
    Ratio("a", "d", "img_s", 2.5, "the engine against torchvision's DataLoader"),
    Ratio("b", "e", "img_s", 1.5, "end to end against tf.data service end to end"),
    Ratio("a", "e0", "img_s", None, "the engine against tf.data in-process"),
)

# every row the bench can produce, in order: key -> (name, real workload or upper bound)
ROWS = {
    "a": ("(a) engine, in-process", "workload"),
    "a0": ("(a0) engine, decode + crop + flip only", "workload"),
    "b": ("(b) service, end to end", "workload"),
    "b'": ("(b') loader, cached batches", "upper bound"),
    "b''": ("(b'') wire, cached frames, no assembly", "upper bound"),
    "c": ("(c) bare gRPC chunk stream", "upper bound"),
    "d": ("(d) torchvision DataLoader", "workload"),
    "e0": ("(e0) tf.data, in-process", "workload"),
    "e": ("(e) tf.data service, end to end", "workload"),
}
STEP_ROWS = {"a": ("a", "a0"), "b": ("b", "b'", "b''"), "c": ("c",), "d": ("d",),
             "e": ("e0", "e")}  # what each `--skip` key leaves out


def ratios(figures: dict[str, Figure]) -> dict[str, float | None]:
    """Every `RATIOS` entry whose two figures were measured (else None)."""
    out: dict[str, float | None] = {}
    for r in RATIOS:
        num, den = figures.get(r.num), figures.get(r.den)
        a = getattr(num, r.unit) if num else None
        b = getattr(den, r.unit) if den else None
        out[r.name] = a / b if a and b else None
    return out


def row(f: Figure) -> str:
    """One table line."""

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    return (f"{f.label:<40} {num(f.img_s, '>10.1f'):>10} {num(f.mb_s, '>9.1f'):>9} "
            f"{num(f.p50_ms, '>8.1f'):>8} {num(f.p99_ms, '>8.1f'):>8} "
            f"{num(f.img_cpu_s, '>9.1f'):>9}  {f.note}")


def format_table(result: dict) -> str:
    """The human table: one line per figure, then the ratios and their targets."""
    head = (f"{'measurement':<40} {'img/s':>10} {'MB/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'img/CPU-s':>9}")
    lines = [head, "-" * len(head)]
    lines += [row(Figure(**f)) for f in result["figures"].values()]
    if result["config"].get("servers"):  # (b) alone: no ratio has both its figures
        return "\n".join(lines)
    lines.append("")
    for r in RATIOS:
        value = result["ratios"].get(r.name)
        shown = f"{value:.2f}" if value is not None else "-"
        goal = f"target >= {r.target:g}" if r.target is not None else "no target"
        verdict = "" if value is None or r.target is None else (
            "  met" if value >= r.target else "  NOT MET")
        lines.append(f"ratio {r.name:<6} {shown:>6}   {goal}{verdict}: {r.text}")
    return "\n".join(lines)


class PlotRow(NamedTuple):
    """One bar of the chart: measured (`img_s`), or not, with the reason in `text`."""

    key: str
    kind: str
    img_s: float | None
    text: str
    label: str


def plot_rows(result: dict) -> list[PlotRow]:
    """Every row the bench can produce, measured or not (then `text` says why)."""
    figures = result["figures"]
    skipped = {k for step in result["config"].get("skip", ()) for k in STEP_ROWS.get(step, ())}
    rows = []
    for key, (name, kind) in ROWS.items():
        f = figures.get(key)
        if f is not None and f["img_s"]:
            text = f"{f['img_s']:,.0f} img/s ({f['mb_s']:,.0f} MB/s)"
            rows.append(PlotRow(key, kind, f["img_s"], text, f["label"]))
        elif f is not None:
            rows.append(PlotRow(key, kind, None, f["note"] or "not measured", f["label"]))
        else:
            why = f"not measured: skipped (--skip {_step(key)})" if key in skipped else \
                "not measured: --server runs (b) alone" if result["config"].get("servers") \
                else "not measured in this run"
            rows.append(PlotRow(key, kind, None, why, name))
    return rows


def _step(key: str) -> str:
    return next(step for step, keys in STEP_ROWS.items() if key in keys)


class TargetMark(NamedTuple):
    """Where a target puts the numerator's bar: `value` img/s on row `key`."""

    key: str
    value: float
    text: str
    met: bool


def target_marks(result: dict) -> list[TargetMark]:
    """One mark per target whose denominator was measured, on the numerator's row."""
    figures, marks = result["figures"], []
    for r in RATIOS:
        num, den = figures.get(r.num), figures.get(r.den)
        if r.target is None or not (den and den["img_s"] and den["mb_s"]):
            continue
        measured = num if num and num["img_s"] and num["mb_s"] else den
        per_image = measured["mb_s"] / measured["img_s"]  # MB per image, the same on both rows
        value = r.target * (den["img_s"] if r.unit == "img_s" else den["mb_s"] / per_image)
        got = num["img_s"] if num and num["img_s"] else None
        met = got is not None and got >= value * (1 - 1e-9)
        marks.append(TargetMark(r.num, value, f"{r.num}/{r.den} >= {r.target:g}", met))
    return marks


def plot(result: dict, path: Path) -> None:
    """A log-scale bar chart of img/s: real workloads solid, upper bounds hatched, each
    target a tick on its bar, unmeasured rows with the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = plot_rows(result)
    measured = [r.img_s for r in rows if r.img_s]
    marks = target_marks(result)
    top = max(measured + [m.value for m in marks] + [1.0])
    bottom = min(measured + [m.value for m in marks] + [top]) / 4
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 2.2))
    ys = range(len(rows))
    colours = {"workload": "#4c72b0", "upper bound": "#c7c7c7"}
    for y, r in zip(ys, rows, strict=True):
        if r.img_s:
            ax.barh(y, r.img_s - bottom, left=bottom, color=colours[r.kind],
                    hatch="///" if r.kind == "upper bound" else None, edgecolor="#777777",
                    linewidth=0.5)
        x = (r.img_s or bottom) * 1.08
        ax.text(x, y, r.text[:110], va="center", fontsize=8,
                color="black" if r.img_s else "#b03030")
    where = {r.key: y for y, r in zip(ys, rows, strict=True)}
    on_row: dict[str, int] = {}
    for m in marks:
        y, colour = where[m.key], "#2ca02c" if m.met else "#d62728"
        nth = on_row[m.key] = on_row.get(m.key, -1) + 1  # a second mark labels below the bar
        ax.plot([m.value, m.value], [y - 0.4, y + 0.4], color=colour, linewidth=2)
        ax.text(m.value, y + (0.42 if nth else -0.42), m.text, fontsize=7, ha="center",
                va="top" if nth else "bottom", color=colour)
    ax.set_yticks(list(ys), [r.label for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(bottom, top * 6)
    ax.set_xlabel("images per second (log scale)")
    ax.legend(handles=[Patch(color=colours["workload"], label="real workload"),
                       Patch(facecolor=colours["upper bound"], hatch="///", edgecolor="#777777",
                             label="upper bound (no augmentation, or cached)"),
                       Patch(color="#2ca02c", label="target met"),
                       Patch(color="#d62728", label="target not met")],
              loc="lower right", fontsize=8)
    cfg, machine = result["config"], result["machine"]
    ax.set_title(f"augsvc bench: {cfg['device']}, batch {cfg['batch_size']}, "
                 f"{cfg['spec']['size'][0]}px, {machine['cpus']} CPUs"
                 f"{', ' + machine['gpu'] if machine['gpu'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
