"""`augsvc bench`: every throughput figure measured side by side, in one run, on the same images.

`runner` measures (engine, service, wire, bare gRPC, the peers); `report` computes the
ratios, prints the table and draws the chart; `bare` is the bare gRPC transport ceiling;
`baseline` (torchvision DataLoader) and `tfdata` (tf.data, tf.data service) are the peers'
scripts, run by other interpreters; `photos` makes the default images.
"""

from augsvc.bench.report import Figure, format_table, plot
from augsvc.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "Figure", "format_table", "plot", "run_bench"]
