"""`llama-fast serve`: its options (registered by llama_fast.tools.cli) and the command.

The HTTP server starts at once and answers /health with 503 while the model loads in a thread; requests are
served once it is ready. fastapi and uvicorn are imported only when the command runs (`pip install
llama_fast[serve]`), so the rest of the CLI works without them.
"""
from __future__ import annotations

import sys


def add_parser(commands, positive_int, dtypes, backends) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    serve.add_argument("--model", help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients pass (default: the model directory's name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together (KV cache rows)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting for a row before new ones get HTTP 429")
    serve.add_argument("--max-seq-len", type=positive_int, default=2048,
                       help="tokens per request, prompt + completion (capped by the model's context)")
    serve.add_argument("--prefill-chunk", type=positive_int, default=None,
                       help="prompt tokens prefilled per step while other requests decode, in their decode "
                            "forward on the CPU (default: 16 on the CPU, 512 elsewhere, pads included): bounds "
                            "how long new requests delay the running ones")
    serve.add_argument("--step-tokens", type=positive_int, default=None,
                       help="on the CPU, a step's tokens (running requests' + prompt chunks) stay within the "
                            "smallest multiple of this that holds the running ones plus one prompt token "
                            "(default: 16, the AMX GEMM's tile height): joining prompts never make a step spill "
                            "into one more tile")
    serve.add_argument("--decode-rows", type=positive_int, default=None,
                       help="at most this many tokens per decode forward, prompt chunks included (default: 64 on "
                            "the CPU, the fused decode stack's limit; the whole batch elsewhere)")
    serve.add_argument("--dtype", choices=dtypes, default="float32")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    serve.add_argument("--backend", choices=backends, default=None)
    serve.add_argument("--quantize", choices=("int8", "int4"), default=None)
    serve.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def build_scheduler(path: str, args):
    """Loads model and tokenizer and starts the scheduler (runs in the loader thread)."""
    import torch

    from llama_fast.modeling import LlamaForCausalLM
    from llama_fast.serve.scheduler import Scheduler
    from llama_fast.tokenization import AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=args.dtype, device=device, backend=args.backend,
                                             quantize=args.quantize).eval()
    return Scheduler(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
                     decode_rows=args.decode_rows, step_tokens=args.step_tokens).start()


def run(args, resolve_model) -> int:
    """`resolve_model(path_or_None)` -> a model path (llama_fast.tools.cli's: the demo model by default)."""
    import os

    try:
        import uvicorn

        from llama_fast.serve.app import create_app
    except ImportError as e:
        raise ImportError(f"llama-fast serve needs the serve extra: pip install 'llama_fast[serve]' ({e})") from None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    path = resolve_model(args.model)
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    app = create_app(loader=lambda: build_scheduler(path, args), model_name=name)
    print(f"llama-fast serve: {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
