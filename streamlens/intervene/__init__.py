"""Changing the stream: the unit grammar, removal modes and mean writes."""
