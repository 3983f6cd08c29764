"""The `llama-fast` command (also `python -m llama_fast`).

    llama-fast generate --chat "What is the capital of France?"      # the embedded demo model
    llama-fast generate --model DIR_OR_GGUF --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8
    llama-fast convert model.gguf out_dir [--keep-quantized]         # GGUF -> HF directory (safetensors)
    llama-fast bench --quick                                         # the generate benchmark (tools/bench.py)
    llama-fast serve [--model DIR_OR_GGUF] [--port 8000]             # OpenAI-compatible server (llama_fast.serve)
    llama-fast generate --tp 2 --model DIR --prompt "Hi"             # tensor parallel: 2 ranks (torchrun, gloo on CPU)
    torchrun --nproc-per-node 2 -m llama_fast generate --model DIR --prompt "Hi"     # the same, started by hand

User errors (a missing file, a bad option, a malformed model) print one line to stderr and exit 2, never a
traceback; `--debug` (anywhere on the line) or LLAMA_FAST_DEBUG=1 shows the traceback instead. Anything else
(a bug) prints one line too, exits 1 and asks for --debug.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

from llama_fast.serve.cli import add_parser as add_serve_parser
from llama_fast.serve.cli import run as run_serve

# torch, the model and the tokenizers are imported by the commands that use them, so that `--help` and a
# usage error answer at once instead of after loading torch.

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
# What a bad input raises: our format and config errors are ValueErrors; OSError for files; TypeError for a
# value of the wrong type; RuntimeError from torch on what it cannot do (e.g. out of memory).
USER_ERRORS = (OSError, ValueError, TypeError, ImportError, RuntimeError, MemoryError)
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "cpu", "triton", "cuda")


class UserError(Exception):
    """An error the user can fix (bad path, bad option); printed as one line."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(low: float, high: float = math.inf, low_inclusive: bool = True):
    """An argparse type: a float in [low, high] (or (low, high]); nan and inf are refused."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
            bounds = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a finite number in {bounds}, got {text!r}")
        return value
    return parse


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llama-fast", description="Fast, faithful LLaMA inference.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,convert,bench,serve}",
                                     parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate text, streamed, with prefill/decode tokens/s")
    gen.add_argument("--model", help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="plain text to continue")
    what.add_argument("--chat", help="a user message, formatted with the model's chat template")
    gen.add_argument("--system", help="a system message for --chat")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--backend", choices=BACKENDS, default=None, help="ops backend (default: best for the device)")
    gen.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantization at load")
    gen.add_argument("--temperature", type=_finite_float(0.0, 1e6), default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_non_negative_int, default=50)
    gen.add_argument("--top-p", type=_finite_float(0.0, 1.0, low_inclusive=False), default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads (torch.set_num_threads); per rank with --tp")
    gen.add_argument("--tp", type=_positive_int, default=None,
                     help="tensor parallel over N ranks on this machine (started with torchrun; rank 0 prints)")

    conv = commands.add_parser("convert", help="convert a GGUF file into an HF directory")
    conv.add_argument("gguf", help="the .gguf file")
    conv.add_argument("out_dir", help="the directory to write")
    conv.add_argument("--dtype", choices=DTYPES, default="float32")
    conv.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    conv.add_argument("--keep-quantized", action="store_true",
                      help="keep Q8_0/Q4_0/Q4_1 weights quantized (llama_fast's format; not readable by transformers)")

    # `bench` hands all its arguments to the harness's own parser (see main).
    commands.add_parser("bench", help="end-to-end prefill/decode benchmark (llama-fast bench --help)")

    add_serve_parser(commands, _positive_int, DTYPES, BACKENDS)
    return parser


# ---- generate ------------------------------------------------------------------------------------------

def _resolve_model(path):
    if path is None:
        from llama_fast.tools.demo import demo_model_dir

        print("llama-fast: using the embedded SmolLM2-135M-Instruct", file=sys.stderr)
        return demo_model_dir()
    if not os.path.exists(path):
        raise UserError(f"no such model: {path}")
    return path


def _tensor_parallel_world(args) -> int:
    """The ranks of a tensor-parallel run: torchrun's WORLD_SIZE inside one (which --tp, if given, must
    match), else 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp is not None and "WORLD_SIZE" in os.environ and args.tp != world:
        raise UserError(f"--tp {args.tp} but torchrun started {world} ranks")
    return world


def _launch_tensor_parallel(args) -> int:
    """`--tp N` outside torchrun: resolve the model once (the demo model is converted once, not per rank),
    check that its layout splits over N ranks (one line, before any process starts), and run this same command
    on N ranks under torchrun. The ranks' output passes through; torchrun's own report of a failed rank (a
    traceback) does not: the ranks have said what failed, one line each."""
    import subprocess

    from llama_fast.loading import read_config
    from llama_fast.parallel.launch import torchrun_command
    from llama_fast.parallel.layout import TensorParallelLayout

    argv = list(args.argv) + (["--debug"] if args.debug else [])
    path = _resolve_model(args.model)
    if args.model is None:
        argv += ["--model", path]
    TensorParallelLayout(read_config(path), args.tp, 0)      # raises TensorParallelError naming the problem
    command, env = torchrun_command(args.tp, ["llama_fast", *argv], args.threads)
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    user_error = False
    for line in proc.stderr:
        if not args.debug and _TORCHRUN_REPORT.match(line):
            continue
        user_error |= line.startswith("llama-fast generate (rank") and ": error: " in line
        sys.stderr.write(line)
    code = proc.wait()
    return EXIT_USER_ERROR if code != 0 and user_error else code


# A line torchrun's agent writes: its OMP_NUM_THREADS banner, its log records ("E1201 03:45:36.97 ...") and the
# ChildFailedError traceback it ends with after a rank fails.
_TORCHRUN_REPORT = re.compile(r"(\*{5,}|Setting OMP_NUM_THREADS|[EWI]\d{4} \d\d:\d\d|Traceback|  File |    |"
                              r"torch\.distributed|=+$|-+$|llama_fast FAILED|Failures:|Root Cause|\[\d+\]:|"
                              r"  (time|host|rank|exitcode|error_file|traceback)\s*:|\s*$)")


def _load(path, args, tensor_parallel: bool = False):
    import torch
    from tqdm.auto import tqdm

    from llama_fast.modeling import LlamaForCausalLM
    from llama_fast.tokenization import AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    with tqdm(total=2, desc="loading", unit="part", leave=False, file=sys.stderr, disable=None) as bar:
        tokenizer = AutoTokenizer.from_pretrained(path)
        bar.update()
        extra = {"tp_plan": "auto"} if tensor_parallel else {}
        model = LlamaForCausalLM.from_pretrained(path, dtype=args.dtype, device=device, backend=args.backend,
                                                 quantize=args.quantize, **extra)
        bar.update()
    return tokenizer, model.eval()


def _prompt_ids(tokenizer, args):
    if args.prompt is not None:
        return tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    messages.append({"role": "user", "content": args.chat if args.chat is not None else "Hello! Who are you?"})
    if not tokenizer.chat_template:
        raise UserError("this model has no chat template; use --prompt")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]


def cmd_generate(args):
    import torch

    from llama_fast.streamers import TextStreamer

    world = _tensor_parallel_world(args)
    if args.tp not in (None, 1) and world == 1:
        return _launch_tensor_parallel(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = _resolve_model(args.model)
    tokenizer, model = _load(path, args, tensor_parallel=world > 1)
    ids = _prompt_ids(tokenizer, args).to(model.device)
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if int(os.environ.get("RANK", "0")) != 0:
        # Every rank generates (each step needs all of them); rank 0 alone prints the text and the timings.
        model.generate(ids, max_new_tokens=args.max_new_tokens, **sampling)
        return 0

    class TimedStreamer(TextStreamer):
        """Prints the text and notes when the first new token arrived (prefill end) and the last one."""
        times: list = []

        def put(self, value):
            self.times.append(time.perf_counter())
            super().put(value)

    streamer = TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    end = time.perf_counter()
    new_tokens = out.shape[1] - ids.shape[1]
    first = streamer.times[1] if len(streamer.times) > 1 else end
    prefill_s, decode_s = first - start, end - first
    decode_rate = f"{(new_tokens - 1) / decode_s:.1f} tokens/s" if new_tokens > 1 and decode_s > 0 else "n/a"
    print(f"prefill: {ids.shape[1]} tokens in {prefill_s:.3f} s ({ids.shape[1] / prefill_s:.1f} tokens/s) | "
          f"decode: {new_tokens} tokens in {decode_s:.3f} s ({decode_rate}) "
          f"[{args.dtype}, {model.device.type}, backend={args.backend or 'auto'}"
          f"{f', tensor parallel over {world} ranks' if world > 1 else ''}]", file=sys.stderr)
    return 0


# ---- convert / bench -----------------------------------------------------------------------------------

def cmd_convert(args):
    from llama_fast.tools.convert import convert_gguf

    if not os.path.isfile(args.gguf):
        raise UserError(f"no such GGUF file: {args.gguf}")
    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.force,
                       keep_quantized=args.keep_quantized)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_bench(bench_args):
    from llama_fast.tools.bench import main as bench_main

    return bench_main(bench_args)


def cmd_serve(args):
    return run_serve(args, _resolve_model)


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "serve": cmd_serve}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or bool(os.environ.get("LLAMA_FAST_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"]:
        command, run = "bench", lambda: cmd_bench(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        args.argv, args.debug = argv, debug
        command, run = args.command, lambda: COMMANDS[args.command](args)
    try:
        return run() or 0
    except KeyboardInterrupt:
        print("\nllama-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            command = f"{command} (rank {os.environ.get('RANK', '?')})"
        # One write per line (print writes the newline separately): ranks sharing a terminal must not
        # interleave their messages
        if isinstance(e, (UserError,) + USER_ERRORS):
            sys.stderr.write(f"llama-fast {command}: error: {message}\n")
            return EXIT_USER_ERROR
        sys.stderr.write(f"llama-fast {command}: internal error ({type(e).__name__}: {message}); rerun with --debug "
                         "for the traceback\n")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
