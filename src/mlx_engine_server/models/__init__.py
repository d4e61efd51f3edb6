"""Model loading: a model directory, a GGUF file, or a vision-language model."""
