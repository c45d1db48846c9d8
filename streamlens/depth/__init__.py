"""Residual dynamics through depth: the gradient split and the classic claims."""
