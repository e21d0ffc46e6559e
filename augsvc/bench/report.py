"""The bench's output: one `Figure` per measurement, the printed table, the bar chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Figure", "format_table", "plot", "row"]

_COLOURS = ("#4c72b0", "#6f8fc7", "#55a868", "#8172b2", "#a395cc", "#c44e52", "#937860")


@dataclass
class Figure:
    """One measured line of the table."""

    key: str
    label: str
    img_s: float | None = None
    mb_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def row(f: Figure) -> str:
    """One table line."""

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    return (f"{f.label:<40} {num(f.img_s, '>10.1f'):>10} {num(f.mb_s, '>9.1f'):>9} "
            f"{num(f.p50_ms, '>8.1f'):>8} {num(f.p99_ms, '>8.1f'):>8}  {f.note}")


def format_table(result: dict) -> str:
    """The human table: one line per figure, then the ratios."""
    head = f"{'measurement':<40} {'img/s':>10} {'MB/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    lines += [row(Figure(**f)) for f in result["figures"].values()]
    lines.append("")
    targets = {"a/a0": "target >= 0.95 on an H100 (the colour kernel's cost)",
               "b/a": "target >= 0.9",
               "b/c": "(MB/s) end to end against the transport ceiling, no target",
               "b'/c": "target >= 0.8 (MB/s), through the loader incl. its copy into batches",
               "b''/c": "target >= 0.8 (MB/s), the wire protocol alone",
               "a/d": "target >= 1.3"}
    for name, value in result["ratios"].items():
        shown = f"{value:.2f}" if value is not None else "-"
        lines.append(f"ratio {name:<5} {shown:>6}   {targets[name]}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """A bar chart of img/s per measurement, ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in result["figures"].values() if f["img_s"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.barh([f["label"] for f in figs], [f["img_s"] for f in figs],
                   color=[_COLOURS[i % len(_COLOURS)] for i in range(len(figs))])
    ax.bar_label(bars, labels=[f"{f['img_s']:,.0f} img/s  ({f['mb_s']:,.0f} MB/s)"
                               for f in figs], padding=4, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("images per second")
    ax.set_xlim(0, max(f["img_s"] for f in figs) * 1.45)
    ratios = ", ".join(f"{k} = {v:.2f}" for k, v in result["ratios"].items() if v is not None)
    cfg, machine = result["config"], result["machine"]
    ax.set_title(f"augsvc bench: {cfg['device']}, batch {cfg['batch_size']}, "
                 f"{cfg['spec']['size'][0]}px, {machine['cpus']} CPUs"
                 f"{', ' + machine['gpu'] if machine['gpu'] else ''}\n{ratios}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
