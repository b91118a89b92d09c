"""Width pruning: unit importance metrics (one module each, registered) and plans of a target shape."""

from tasks.width import activation, magnitude, taylor  # noqa: F401  (register the metrics)
from tasks.width.importance import WIDTH_METRICS, UnitScores, WidthMetric, WidthMetricError, register_width_metric
from tasks.width.plan import WidthShape, check_shape, uniform_plan

__all__ = ["WIDTH_METRICS", "UnitScores", "WidthMetric", "WidthMetricError", "WidthShape", "check_shape",
           "register_width_metric", "uniform_plan"]
