"""Data: corpus sources, the tokenized memmap store, one pipeline per task."""
