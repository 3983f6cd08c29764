"""`llama-fast serve`: an OpenAI-compatible HTTP server with continuous batching (`pip install llama_fast[serve]`).

    llama-fast serve --model DIR_OR_GGUF --port 8000 --max-batch 8
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

One file per job:
- protocol.py: the request models (validation, OpenAI-style error bodies) and the response bodies;
- sampling.py: each row's own sampling settings (penalties, warpers, seed) applied to its logits;
- detokenize.py: incremental text with stop strings matched across token boundaries;
- scheduler.py: the thread that owns the model and runs the continuous batch;
- app.py: the FastAPI application (endpoints, streaming, disconnects);
- cli.py: the `serve` subcommand.
"""
