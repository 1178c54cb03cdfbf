"""Model factory, STAIR heads and checkpoints (the word-piece vocabulary they emit over is
``stair_search.vocabulary``)."""

from stair_search.models.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from stair_search.models.config import StairConfig, builtin_configs
from stair_search.models.factory import DEFAULT_MODEL, builtin_models, create_model
from stair_search.models.stair import StairModel, TowerOutput

__all__ = [
    "DEFAULT_MODEL", "StairConfig", "StairModel", "TowerOutput", "builtin_configs", "builtin_models", "create_model",
    "load_checkpoint", "model_fingerprint", "save_checkpoint",
]
