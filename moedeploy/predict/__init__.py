"""Expert predictors: which experts will an upcoming layer use? Trace-history based (history.py):
fitted on routing traces, scored causally at decode time, saved as a small .npz file."""

from .history import HistoryPredictor, PredictorError, ScoreConfig, fit, scores

__all__ = ["HistoryPredictor", "PredictorError", "ScoreConfig", "fit", "scores"]
