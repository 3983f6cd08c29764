"""LlamaTokenizer: the sentencepiece `tokenizer.model` of LLaMA / Llama 2.

The model file is read (no protobuf needed, see sentencepiece_model.py) and run by the `tokenizers`
engine, built the way transformers 5 builds its LlamaTokenizer from the same file, so ids and text
match it: BPE with byte fallback, `▁` for spaces, and

- legacy=False (default): a prefix space `▁` only at the very start of the text; text right after a
  special token gets none ("</s>Hello" -> "</s>", "He", "llo").
- legacy=True: every piece of text between special tokens gets the prefix space ("</s>", "▁Hello").
- decode drops the one leading space the prefix added, so a sequence starting with a word ("Banana")
  decodes without a leading space (the seeds' first-token quirk): decode(["▁Hello"]) == "Hello".
"""
from __future__ import annotations

import os
import shutil

from llama_fast.tokenization.base import TokenizerBase, tokenizer_arguments
from llama_fast.tokenization.sentencepiece_model import BYTE, CONTROL, USER_DEFINED, load_sentencepiece_model

VOCAB_FILE = "tokenizer.model"


def _bpe_merges(vocab: dict) -> list:
    """Merges implied by a sentencepiece BPE vocabulary: every split of a piece into two pieces, ranked by
    the merged piece's id (sentencepiece orders BPE pieces by merge order), ties by the parts' ids."""
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:i], piece[i:], piece_id) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def build_sentencepiece_tokenizer(sp_model, legacy=False, add_prefix_space=True):
    """A tokenizers.Tokenizer equivalent to a sentencepiece model (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if sp_model.model_type == "bpe":
        vocab = {text: i for i, (text, _, _) in enumerate(sp_model.pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(vocab), fuse_unk=True, byte_fallback=True, dropout=None)
    elif sp_model.model_type == "unigram":
        model = models.Unigram([(text, score) for text, score, _ in sp_model.pieces], sp_model.unk_id,
                               byte_fallback=any(kind == BYTE for _, _, kind in sp_model.pieces))
    else:
        raise ValueError(f"sentencepiece model type {sp_model.model_type!r} is not supported (bpe or unigram)")
    tokenizer = Tokenizer(model)
    prepend = "never" if not add_prefix_space else ("always" if legacy else "first")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    # Control pieces (<s>, </s>) are special; user-defined ones are matched whole but are ordinary text.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, _, kind in sp_model.pieces if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, _, kind in sp_model.pieces if kind == USER_DEFINED])
    return tokenizer


class LlamaTokenizer(TokenizerBase):
    """The seeds' LlamaTokenizer: (vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    pad_token=None, add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
    legacy=None, ...)."""

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                 add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False, legacy=None,
                 add_prefix_space=None, added_tokens_decoder=None, **kwargs):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"sentencepiece model not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.legacy = bool(legacy)
        self.add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        self._sp_model = load_sentencepiece_model(vocab_file)
        self._tokenizer = build_sentencepiece_tokenizer(self._sp_model, self.legacy, self.add_prefix_space)
        self._add_tokens_from_config(added_tokens_decoder)
        self._init_common(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                          add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                          clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def _add_tokens_from_config(self, added_tokens_decoder):
        """Tokens a tokenizer_config.json adds past the sentencepiece vocabulary (e.g. a <pad> at 32000)."""
        from tokenizers import AddedToken

        for token_id, spec in sorted((added_tokens_decoder or {}).items(), key=lambda kv: int(kv[0])):
            content = spec["content"] if isinstance(spec, dict) else spec
            existing = self._tokenizer.token_to_id(content)
            if existing is None and int(token_id) != self._tokenizer.get_vocab_size(with_added_tokens=True):
                raise ValueError(f"added token {content!r} has id {token_id}, but the next free id is "
                                 f"{self._tokenizer.get_vocab_size(with_added_tokens=True)}")
            special = spec.get("special", True) if isinstance(spec, dict) else True
            token = AddedToken(content, normalized=False, special=special)
            (self._tokenizer.add_special_tokens if special else self._tokenizer.add_tokens)([token])

    @property
    def sp_model(self):
        """The sentencepiece processor for this file (loaded on first use), for code that wants it."""
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        return cls(vocab_file=os.path.join(directory, VOCAB_FILE), **tokenizer_arguments(directory, kwargs))

    def _config_for_saving(self):
        config = super()._config_for_saving()
        config["legacy"] = self.legacy
        # Tokens past the sentencepiece vocabulary (e.g. an added <pad>) live only in the config.
        extra = {i: t for i, t in self._tokenizer.get_added_tokens_decoder().items() if i >= len(self._sp_model.pieces)}
        if extra:
            config["added_tokens_decoder"] = {str(i): {"content": t.content, "special": t.special}
                                              for i, t in sorted(extra.items())}
        return config

    def _save_vocabulary(self, directory):
        path = os.path.join(directory, VOCAB_FILE)
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, path)
        return (path,)
