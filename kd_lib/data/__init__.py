"""Data: image trees on disk, fastai DataLoaders with split metadata, the paper's augmentation, resident tensors."""
