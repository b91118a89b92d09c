"""Width pruning: unit importance metrics (one module each, registered) and plans of a target shape."""

from tasks.width import activation, magnitude, taylor  # noqa: F401  (register the metrics)
from tasks.width.importance import WIDTH_METRICS, UnitScores, WidthMetric, WidthMetricError, register_width_metric
from tasks.width.plan import (WIDTH_STRATEGIES, PerLayerSettings, WidthShape, per_layer_plan,
                              register_width_strategy, resolve_shape, uniform_plan)
from tasks.width import osscar, sheared  # noqa: F401,E402  (register the osscar and sheared strategies)

__all__ = ["WIDTH_METRICS", "WIDTH_STRATEGIES", "PerLayerSettings", "UnitScores", "WidthMetric", "WidthMetricError",
           "WidthShape", "per_layer_plan", "register_width_metric", "register_width_strategy", "resolve_shape",
           "uniform_plan"]
