"""Sequence-labelling models: the BiLSTM-CNN-CRF family (Ma & Hovy 2016)."""
from fastner.models.char_cnn import CharCNN
from fastner.models.tagger import ENCODERS, HEADS, ModelConfig, SequenceTagger

__all__ = ["CharCNN", "ENCODERS", "HEADS", "ModelConfig", "SequenceTagger"]
