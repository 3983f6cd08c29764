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
