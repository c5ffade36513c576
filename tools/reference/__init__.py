"""Training of the reference models shipped in ``tokenreduce/reference/models/`` (easy-VQA) and of
the scenes reference model (``--task scenes``): ``tools/reference/TRAINING.md``."""
