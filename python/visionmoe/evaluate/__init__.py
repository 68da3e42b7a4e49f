"""Evaluation: :func:`evaluate` (accuracy and per-MoE-layer routing statistics, with the expert-specialisation
table), :func:`write_plots`, and the ``visionmoe-eval`` command line (:func:`visionmoe.evaluate.cli.main`)."""

from .plots import write_plots
from .report import EvalReport, LayerReport, evaluate

__all__ = ["EvalReport", "LayerReport", "evaluate", "write_plots"]
