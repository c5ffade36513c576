"""Repository tools that are not part of the installed ``tokenreduce`` package (run them from the
repository root, e.g. ``python -m tools.reference.train``)."""
