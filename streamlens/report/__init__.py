"""The per-layer report, the demo, and the one-prediction attribution page."""
