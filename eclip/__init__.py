"""eCLIP training core: data preparation, tokenizer, model, trainer and retrieval evaluation."""

__version__ = "0.1.0"
