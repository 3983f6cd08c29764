"""A seeded mutational fuzzer over the files llama_fast reads: GGUF headers (model and tokenizer), safetensors
headers, config.json and tokenizer.model.

    python tests/fuzz/fuzz_formats.py --cases 300 --seed 0 [--out counts.json] [--keep DIR]

Each case mutates one valid seed file (bit flips, interesting integers written over fields, truncation,
inserted or deleted bytes, and for JSON, values replaced by NaN / huge / negative numbers / wrong types /
deep nesting) and loads it in a forked child process under resource limits (address space and CPU time)
and a wall-clock timeout. Every outcome must be one of:
    equal    loads, and everything it produced equals what the original file gives
    variant  loads a different but valid description (a metadata or config *value* changed; the tensors, which
             mutations of a header must never change silently, are equal)
    error    a ValueError (the family every format / config error belongs to), raised within the limits
Anything else is a failure: a tensor that differs from the original (a silent wrong answer), another exception
type, a crash (signal), a hang (timeout) or running out of the memory limit.

The parent imports torch and llama_fast once and forks per case (a fresh `python` per case would spend seconds
importing torch); it runs no torch op before forking, so no thread pool is inherited.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))            # tests/ (gguf_util)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository root

import torch  # noqa: E402

torch.set_num_threads(1)

CASE_TIMEOUT_S = 60          # a tiny model loads in well under a second; a minute means a hang even when loaded
MEMORY_LIMIT_BYTES = 1 << 30  # address space a case may add over what the parent has mapped
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 2 ** 15, 2 ** 16 - 1, 2 ** 31 - 1, 2 ** 31,
                    2 ** 32 - 1, 2 ** 32, 2 ** 40, 2 ** 53, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
INTERESTING_JSON = [float("nan"), float("inf"), -float("inf"), -1, 0, 1, 2 ** 31, 2 ** 63, 10 ** 9, 1e308, 0.5,
                    True, None, "", "x" * 1000, [], {}, [1, 2], {"a": 1}, "..", "/etc/passwd"]


# ---- the seed files -----------------------------------------------------------------------------------

def tiny_llama_config() -> dict:
    return dict(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def write_seeds(directory: str) -> dict[str, str]:
    """The valid seed files: {kind: path}."""
    import gguf

    from llama_fast import LlamaConfig, LlamaForCausalLM

    import gguf_util as G

    config = tiny_llama_config()
    weights = G.random_state_dict(config)
    gguf_path = os.path.join(directory, "seed.gguf")
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["ab", "abc", "Ġ", "Ġa"]
    tokens += [f"t{i}" for i in range(config["vocab_size"] - len(tokens))]
    extra = {"tokenizer.ggml.model": ("gpt2", gguf.GGUFValueType.STRING),
             "tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY),
             "tokenizer.ggml.token_type": ([3, 3, 3] + [1] * (len(tokens) - 3), gguf.GGUFValueType.ARRAY),
             "tokenizer.ggml.merges": (["a b", "ab c", "Ġ a"], gguf.GGUFValueType.ARRAY)}
    types = {"model.layers.0.mlp.up_proj.weight": G.Q.Q8_0, "model.layers.0.mlp.down_proj.weight": G.Q.Q4_1,
             "model.layers.0.self_attn.v_proj.weight": G.Q.Q4_0}
    G.write_llama_gguf(gguf_path, config, weights, types, extra_kv=extra)

    hf_dir = os.path.join(directory, "seed_hf")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(hf_dir)

    sp_path = os.path.join(directory, "tokenizer.model")
    with open(sp_path, "wb") as f:
        f.write(sentencepiece_model_bytes())
    return {"gguf": gguf_path, "hf": hf_dir, "spm": sp_path}


def sentencepiece_model_bytes() -> bytes:
    """A small BPE sentencepiece ModelProto: <unk>, <s>, </s>, bytes-free pieces with scores."""
    from sentencepiece_util import model_bytes

    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(t, -float(i), 1) for i, t in enumerate(["▁", "a", "b", "c", "ab", "▁a", "abc", "▁ab"])]
    return model_bytes(pieces, model_type=2, unk_id=0)


# ---- what is loaded, and its digest ---------------------------------------------------------------------

def _digest_tensor(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _model_digest(model) -> dict:
    tensors = {name: _digest_tensor(t) for name, t in list(model.state_dict().items())}
    config = model.config.to_dict()
    return {"tensors": tensors, "config": json.dumps(config, sort_keys=True, default=str)}


def load_model(path: str) -> dict:
    from llama_fast import LlamaForCausalLM
    return _model_digest(LlamaForCausalLM.from_pretrained(path))


def load_gguf_tokenizer(path: str) -> dict:
    from llama_fast.tokenization.gguf import tokenizer_from_gguf
    tokenizer, config = tokenizer_from_gguf(path)
    ids = tokenizer.encode("abc ab a", add_special_tokens=False).ids
    return {"tensors": {}, "config": json.dumps([tokenizer.get_vocab_size(), ids, config], sort_keys=True,
                                                 default=str)}


def load_sentencepiece(path: str) -> dict:
    from llama_fast.tokenization.sentencepiece import LlamaTokenizer
    tokenizer = LlamaTokenizer(vocab_file=path)
    pieces = tokenizer._sp_model.pieces
    return {"tensors": {}, "config": json.dumps([pieces, tokenizer._sp_model.model_type,
                                                 tokenizer("abc ab")["input_ids"]], default=str)}


# ---- mutations ------------------------------------------------------------------------------------------

def mutate_bytes(rng: random.Random, data: bytes, region: tuple[int, int]) -> bytes:
    """1-4 mutations inside data[region[0]:region[1]] (the header), or a truncation anywhere."""
    data = bytearray(data)
    lo, hi = region
    for _ in range(rng.randint(1, 4)):
        hi = min(hi, len(data))
        if hi <= lo:
            break
        op = rng.random()
        at = rng.randrange(lo, hi)
        if op < 0.3:
            data[at] ^= 1 << rng.randrange(8)
        elif op < 0.45:
            data[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif op < 0.75:
            size = rng.choice([4, 8])
            if rng.random() < 0.7:
                at -= at % size               # GGUF's integers sit at no fixed alignment; try both
            value = rng.choice(INTERESTING_INTS) % (1 << (8 * size))
            data[at:at + size] = value.to_bytes(size, "little")
        elif op < 0.85:
            del data[at:at + rng.randint(1, 16)]
        elif op < 0.95:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            return bytes(data[:rng.randrange(0, len(data))])
    return bytes(data)


def _json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_paths(v, path + (i,))


def mutate_json(rng: random.Random, obj):
    """A structural mutation of a JSON value: a value replaced by an interesting one, a key deleted or
    renamed, or deep nesting."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p in _json_paths(obj) if p]
    if not paths:
        return rng.choice(INTERESTING_JSON)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        parent = obj
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            op = rng.random()
            if op < 0.7:
                parent[last] = rng.choice(INTERESTING_JSON)
            elif op < 0.8:
                parent[last] = _DEEP if rng.random() < 0.5 else [[[[[1]]]]]
            elif isinstance(parent, dict):
                value = parent.pop(last)
                if op < 0.9:
                    parent[str(last) + rng.choice(["x", "", "_"])] = value
            elif isinstance(parent, list) and parent:
                parent.pop(last if isinstance(last, int) and last < len(parent) else 0)
        except (KeyError, IndexError, TypeError):
            pass
    return obj


_DEEP = "__nested 5000 deep__"     # replaced in the JSON text (json itself cannot build or write it)


def _dumps(obj) -> bytes:
    return json.dumps(obj).replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000).encode()


def gguf_header_end(path: str) -> int:
    from llama_fast.formats.gguf_reader import GGUFReader
    return GGUFReader(path).data_start


# ---- cases ----------------------------------------------------------------------------------------------

def make_case(rng: random.Random, seeds: dict, work: str) -> tuple[str, str, callable]:
    """(kind, path to load, loader) of one mutated file."""
    kind = rng.choice(["gguf", "gguf_tokenizer", "safetensors", "config", "spm"])
    if kind.startswith("gguf"):
        with open(seeds["gguf"], "rb") as f:
            data = f.read()
        path = os.path.join(work, "case.gguf")
        with open(path, "wb") as f:
            f.write(mutate_bytes(rng, data, (0, seeds["gguf_header_end"])))
        return kind, path, load_gguf_tokenizer if kind == "gguf_tokenizer" else load_model
    if kind == "spm":
        with open(seeds["spm"], "rb") as f:
            data = f.read()
        path = os.path.join(work, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(mutate_bytes(rng, data, (0, len(data))))
        return kind, path, load_sentencepiece
    directory = os.path.join(work, "model")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(seeds["hf"]):
        with open(os.path.join(seeds["hf"], name), "rb") as src, open(os.path.join(directory, name), "wb") as dst:
            dst.write(src.read())
    if kind == "config":
        file = os.path.join(directory, "config.json")
        with open(file, "rb") as f:
            text = f.read()
        if rng.random() < 0.6:
            text = _dumps(mutate_json(rng, json.loads(text)))
        else:
            text = mutate_bytes(rng, text, (0, len(text)))
        with open(file, "wb") as f:
            f.write(text)
    else:
        file = os.path.join(directory, "model.safetensors")
        with open(file, "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header, body = data[8:8 + n], data[8 + n:]
        if rng.random() < 0.6:
            header = _dumps(mutate_json(rng, json.loads(header)))
            if rng.random() < 0.9:                   # usually a consistent length, so the JSON is what is tested
                data = struct.pack("<Q", len(header)) + header + body
            else:
                data = data[:8] + header + body
        else:
            data = mutate_bytes(rng, data, (0, 8 + n))
        with open(file, "wb") as f:
            f.write(data)
    return kind, directory, load_model


def _run_child(loader, path: str, write_fd: int) -> None:
    """In the forked child: limits, load, report (error class or digest) as JSON on write_fd."""
    try:
        soft = _mapped_bytes() + MEMORY_LIMIT_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
        resource.setrlimit(resource.RLIMIT_CPU, (CASE_TIMEOUT_S, CASE_TIMEOUT_S + 5))
        try:
            result = {"loaded": loader(path)}
        except ValueError as e:
            result = {"error": type(e).__name__, "message": str(e)[:300]}
        except MemoryError:
            result = {"bad": "MemoryError", "message": "out of the memory limit"}
        except BaseException as e:  # noqa: BLE001 - every other outcome is a finding
            result = {"bad": type(e).__name__, "message": str(e)[:300], "trace": traceback.format_exc()[-2000:]}
        os.write(write_fd, json.dumps(result).encode())
    finally:
        os._exit(0)


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def run_case(loader, path: str) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_child(loader, path, write_fd)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + CASE_TIMEOUT_S
    os.set_blocking(read_fd, False)
    status = None
    while True:
        try:
            chunk = os.read(read_fd, 1 << 16)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return {"bad": "hang", "message": f"no result after {CASE_TIMEOUT_S} s"}
        time.sleep(0.005)
    while True:
        try:
            chunk = os.read(read_fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        what = "memory" if sig in (signal.SIGKILL,) else "crash"
        return {"bad": what, "message": f"killed by signal {sig}"}
    try:
        return json.loads(b"".join(chunks))
    except json.JSONDecodeError:
        return {"bad": "crash", "message": "the child exited without a result"}


def classify(result: dict, original: dict) -> str:
    if "bad" in result:
        return "fail:" + result["bad"]
    if "error" in result:
        return "error"
    got = result["loaded"]
    if got == original:
        return "equal"
    if got["tensors"] != original["tensors"]:
        return "fail:tensors-differ"
    return "variant"


def fuzz(cases: int, seed: int, keep: str | None = None, log=print, verbose: bool = False) -> dict:
    rng = random.Random(seed)
    counts: dict[str, dict[str, int]] = {}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        seeds = write_seeds(tmp)
        seeds["gguf_header_end"] = gguf_header_end(seeds["gguf"])
        originals = {}
        for kind, path, loader in (("gguf", seeds["gguf"], load_model),
                                   ("gguf_tokenizer", seeds["gguf"], load_gguf_tokenizer),
                                   ("safetensors", seeds["hf"], load_model), ("config", seeds["hf"], load_model),
                                   ("spm", seeds["spm"], load_sentencepiece)):
            result = run_case(loader, path)
            if "loaded" not in result:
                raise RuntimeError(f"the {kind} seed does not load: {result}")
            originals[kind] = result["loaded"]
        work = os.path.join(tmp, "work")
        for i in range(cases):
            if os.path.exists(work):
                import shutil
                shutil.rmtree(work)
            os.makedirs(work)
            kind, path, loader = make_case(rng, seeds, work)
            result = run_case(loader, path)
            outcome = classify(result, originals[kind])
            counts.setdefault(kind, {}).setdefault(outcome, 0)
            counts[kind][outcome] += 1
            if verbose:
                log(f"case {i} ({kind}): {outcome}: {result.get('error', '')} {result.get('message', '')[:160]}")
            if outcome.startswith("fail"):
                failures.append({"case": i, "kind": kind, "outcome": outcome, **{k: v for k, v in result.items()
                                                                                  if k != "loaded"}})
                if keep:
                    import shutil
                    target = os.path.join(keep, f"case{i}-{kind}")
                    (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, target)
                log(f"case {i} ({kind}): {outcome}: {result.get('message')}")
    return {"seed": seed, "cases": cases, "counts": counts, "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the counts and failures as JSON here")
    p.add_argument("--keep", help="copy failing files into this directory")
    p.add_argument("--verbose", action="store_true", help="print every case's outcome")
    args = p.parse_args()
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    report = fuzz(args.cases, args.seed, args.keep, log=lambda m: print(m, file=sys.stderr), verbose=args.verbose)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps(report["counts"]))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
