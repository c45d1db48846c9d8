"""The model and what was measured on it: loading, the architecture probe, layouts, norms, affine maps, hook points."""
