"""Constants shared by the data pipeline, the model's loss and the HF classes."""

IGNORE_INDEX = -100  # label value excluded from the loss (HF / PyTorch cross-entropy default)
DEFAULT_SEED = 1234  # model init, dropout and data order of a run unless ``seed`` is given
