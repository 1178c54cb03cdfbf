"""Model factory, STAIR heads, checkpoints and the word-piece vocabulary."""

from stair_search.models.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from stair_search.models.config import StairConfig, builtin_configs
from stair_search.models.factory import DEFAULT_MODEL, builtin_models, create_model
from stair_search.models.stair import StairModel, TowerOutput
from stair_search.models.vocab import Vocabulary, spell, unspell

__all__ = [
    "DEFAULT_MODEL", "StairConfig", "StairModel", "TowerOutput", "Vocabulary", "builtin_configs",
    "builtin_models", "create_model", "load_checkpoint", "model_fingerprint", "save_checkpoint", "spell", "unspell",
]
