"""Expert predictors: which experts will the coming layers and tokens use?

    Known (tokens, hidden states, routed experts) ─► Predictor.scores ─► [T, L, E] ─► metrics: recall@k, hit rate

- base.py: the `Predictor` interface, `Known`, the frequency baseline, `PredictorError`
- sida.py: SiDA's predictor, token embeddings -> LSTM -> causal attention -> every layer's experts
- lookahead.py: the next router on the current hidden state (runtime prefetch; `LookaheadPredictor` for eval)
- history.py: the co-occurrence table of the simulator's prefetcher (.npz)
- routenet.py: a trace-history predictor (routing neighbours + co-occurrence + recency, a learned ranker)
- record.py: a model's routing over text; files.py: the predictor file; metrics.py; cli.py: `moedeploy predict`
"""

from .base import FrequencyPredictor, Known, Predictor, PredictorError
from .history import HistoryPredictor, ScoreConfig, fit, scores

__all__ = ["FrequencyPredictor", "HistoryPredictor", "Known", "Predictor", "PredictorError", "ScoreConfig", "fit",
           "scores"]
