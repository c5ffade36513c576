"""Training of the easy-VQA reference models shipped in ``tokenreduce/reference/models/``:
``tools/reference/TRAINING.md``."""
