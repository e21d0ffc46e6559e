"""`augsvc bench`: every throughput figure measured side by side, in one run, on the same images.

`runner` measures (engine, service, wire, bare gRPC, torchvision); `report` prints the
table and draws the chart; `bare` is the bare gRPC transport ceiling; `baseline` is the
torchvision DataLoader script run by another interpreter.
"""

from augsvc.bench.report import Figure, format_table, plot
from augsvc.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "Figure", "format_table", "plot", "run_bench"]
