"""The scoring engine on any Hugging Face causal LM: exact one-pass scores, greedy extraction,
inputs and outputs, torchrun sharding, scores across checkpoints."""

from ..integrations.loading import ModelFolderError, load_causal_lm
from ..ops.greedy import greedy_decode
from .inputs import load_sequences
from .scoring import ExtractResult, ScoreResult, ScoringInputError, extract, score_exact

__all__ = ["ExtractResult", "ModelFolderError", "ScoreResult", "ScoringInputError", "extract",
           "greedy_decode", "load_causal_lm", "load_sequences", "score_exact"]
