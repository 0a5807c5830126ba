"""Data layer: readers, near-duplicate control, leak-free splits, datasets."""
