"""Building a tokenizer from a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF carries no tokenizer.json: the vocabulary, merges, token types and special-token ids are metadata.
We rebuild the tokenizer transformers builds from the same file, so ids match it:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (vocab + merges). The text is split by the GPT-2 regex,
  or by the split regex of the named pre-tokenizer (`tokenizer.ggml.pre`, e.g. llama-bpe) when known.
- `tokenizer.ggml.model == "llama"`: a sentencepiece BPE vocabulary (tokens + scores), see sentencepiece.py.
Tokens typed CONTROL become special tokens, USER_DEFINED ones are matched whole.
"""
from __future__ import annotations

from llama_fast.tokenization.sentencepiece_model import SentencePieceModel

CONTROL, USER_DEFINED = 3, 4

# The split regex llama.cpp uses for these pre-tokenizer names (the ones whose merges were learned on it).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {name: _LLAMA3_SPLIT
                        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}


def read_gguf_tokenizer_metadata(path: str) -> dict:
    """The tokenizer.* metadata of a GGUF file, with arrays as Python lists."""
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError / struct errors on a bad file
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith("tokenizer.") or name == "general.architecture":
            meta[name] = fld.contents()
    return meta


def _byte_to_unicode():
    """GPT-2's printable spelling of each byte (the alphabet byte-level BPE vocabularies are written in)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    spelled = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            spelled.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, spelled)}


def _byte_level_tokenizer(meta):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = set(_byte_to_unicode().values())
    spelling = _byte_to_unicode()
    tokens = meta["tokenizer.ggml.tokens"]
    # A token written outside the byte alphabet (rare) is respelled byte by byte, as transformers does.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer, alphabet


def _sentencepiece_tokenizer(meta):
    from llama_fast.tokenization.sentencepiece import build_sentencepiece_tokenizer

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    sp_model = SentencePieceModel(pieces=list(zip(tokens, scores, types)), model_type="bpe")
    add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    return build_sentencepiece_tokenizer(sp_model, legacy=False, add_prefix_space=add_prefix_space), None


def tokenizer_from_gguf(path: str):
    """(tokenizers.Tokenizer, tokenizer config dict) for the tokenizer a GGUF file describes."""
    from tokenizers import AddedToken

    meta = read_gguf_tokenizer_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path} has no tokenizer (no tokenizer.ggml.tokens metadata)")
    if kind == "gpt2":
        tokenizer, alphabet = _byte_level_tokenizer(meta)
    elif kind == "llama":
        tokenizer, alphabet = _sentencepiece_tokenizer(meta)
    else:
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level "
                         "BPE and 'llama' sentencepiece BPE)")

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    # A CONTROL token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                                  if k == CONTROL and (alphabet is None or set(t) <= alphabet)])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                          if k == USER_DEFINED])

    def token(key):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    config = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", True if kind == "llama" else None),
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token"),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tokenizer, config
