"""Data stage: reading sources, the synthetic set, validation, the dataset store, EDA, embeddings."""
