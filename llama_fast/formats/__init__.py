"""Checkpoint file formats: readers (and the safetensors writer) that turn a file into a config and a stream
of (transformers name, tensor) pairs. They know the files, not the model: no module here imports model code;
llama_fast.loading maps their names onto a model.

`safetensors` reads and writes safetensors files one tensor at a time; `gguf` reads llama.cpp's GGUF files
(config, dense tensors, Q8_0 / Q4_0 / Q4_1 blocks as llama_fast.quant weights).
"""
