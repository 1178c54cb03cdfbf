"""STAIR training: sparse + dense contrastive learning with FLOPS regularisation in three stages."""

from stair_search.train.trainer import STAGES, TrainConfig, TrainResult, load_pairs, train

__all__ = ["STAGES", "TrainConfig", "TrainResult", "load_pairs", "train"]
