"""Strings that trip tokenizers up: whitespace runs, unicode, emoji, digits, code, special tokens in text."""

TRICKY_STRINGS = [
    "",
    "Hello world",
    " Hello",
    "  two leading spaces",
    "trailing spaces   ",
    "   runs\t\t\n\n  of   whitespace  \n",
    "\n\nnewlines first",
    "Banana",
    "café naïve résumé",
    "東京 пример 😀🚀 👩‍👩‍👧 emoji",
    "ÿ\x00\x7f control bytes",
    "\u00a0nbsp\u200bzero-width",
    "12345678901234 3.14159 1,000,000 2026-11-23",
    "def foo(x):\n    return x**2  # comment\n\tif x: pass",
    "I'm don't we've they'll",
    "a" * 40,
    "▁already▁metaspace",
]


def with_special_tokens(tokens):
    """Strings with the tokenizer's special tokens inside the text."""
    a, b = tokens[0], tokens[-1]
    return [f"{a}", f"{a}Hello", f"x{b}y", f"x {b} y", f"{a} hi {b}{a}", f"{b}\n{a}user\nhi{b}", f"<{a}>"]


TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. 1234567890 numbers 3.14159
def foo(x):\n    return x * 2  # code\n\tTabs and  double  spaces.
Unicode: café naïve résumé 東京 пример 😀 🚀 emoji.
Hello world! Hello again, world. Banana banana BANANA.
"""


def train_sentencepiece(directory):
    """A byte-fallback BPE tokenizer.model like LLaMA's (identity normalization, spaces kept), trained in
    ~0.1 s into `directory`."""
    import os

    import sentencepiece as spm

    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(TRAIN_TEXT * 40)
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(directory, "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    for extra in ("corpus.txt", "tokenizer.vocab"):
        os.remove(os.path.join(directory, extra))
    return os.path.join(directory, "tokenizer.model")
