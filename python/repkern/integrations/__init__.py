"""Adapters to the tools users already run. Each is an optional import with its own extra:

- :mod:`repkern.integrations.torchmetrics`: ``torchmetrics.Metric`` classes (Lightning's ``self.log``,
  DDP sync) on repkern's accumulators; ``pip install "repkern[torchmetrics]"``.
"""
