"""File-format readers (GGUF, safetensors, ...): they import no model code."""
