"""``python -m fused_backprop.bench``: what the fused layers buy on this machine.

For every (device, dtype, activation, shape) case it checks each backend against the ``torch``
backend (a wrong kernel is reported, never timed), then times the backends and the baselines —
eager ``act(F.linear(x, W, b))``, its ``torch.compile`` and the bare GEMMs ("floor") — in forward,
backward and forward+backward, and reports medians, spread, GFLOP/s and the ratios as a table, CSV,
JSON and PNG plots. ``python -m fused_backprop.bench --help`` lists the options.

Modules: ``cases`` (what is run and checked), ``timing`` (the clocks), ``report`` (table, CSV,
JSON), ``plots`` (PNGs), ``cli`` (the command line and the run loop), ``latency`` (``--latency``: time
per call of one layer across batch sizes M, inference and training step).
"""

from .cli import main, run  # noqa: F401
