"""The stream read as logits: the unembedding, targets, the exact decomposition and the logit lens."""
