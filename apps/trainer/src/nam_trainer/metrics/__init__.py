"""Run metrics: the JSONL/TensorBoard log and the live progress line. The PNG report is
``nam_trainer.metrics.report.write_report``, left out here so the training path does not import
matplotlib."""

from nam_trainer.metrics.progress import Progress
from nam_trainer.metrics.records import MetricsError, read_records
from nam_trainer.metrics.runlog import RunLog

__all__ = ["MetricsError", "Progress", "RunLog", "read_records"]
