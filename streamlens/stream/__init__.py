"""Running the model and listening to the stream: inputs and batching, the capture engine, traces and statistics."""
