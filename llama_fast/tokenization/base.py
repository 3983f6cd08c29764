"""What every llama_fast tokenizer shares: special tokens, `__call__` with padding / truncation / tensors,
decode, chat templates, saving. Subclasses supply the text <-> id mapping through a `tokenizers.Tokenizer`
(`self._tokenizer`), the same engine transformers 5 runs, so ids and decoded text match it exactly.

The behaviour mirrors transformers' PreTrainedTokenizer API (see the seeds' LlamaTokenizer section):
no pad token unless the files name one (padding then raises, as in transformers: set
`tokenizer.pad_token = tokenizer.eos_token`), batches padded on the left by default (what generation
needs), `add_bos_token` / `add_eos_token` deciding the special tokens around each sequence.
"""
from __future__ import annotations

import json
import os

from llama_fast.tokenization.chat_template import render_chat_template

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class BatchEncoding(dict):
    """A dict of `input_ids` / `attention_mask` that also reads as attributes, like transformers'."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _token_content(value):
    """A special token from a config file: a plain string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_tokenizer_config(directory: str) -> dict:
    """tokenizer_config.json, completed by special_tokens_map.json and chat_template.jinja when present."""
    config = {}
    path = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(path):
        config = _read_json(path)
    special_map_path = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
    if os.path.isfile(special_map_path):
        for name, value in _read_json(special_map_path).items():
            config.setdefault(name, value)
    template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if "chat_template" not in config and os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    return config


def tokenizer_arguments(directory: str, overrides: dict) -> dict:
    """The constructor arguments of a tokenizer saved in `directory` (read_tokenizer_config without the
    class name), updated with `overrides` (from_pretrained's keyword arguments)."""
    config = read_tokenizer_config(directory)
    config.pop("tokenizer_class", None)
    config.update(overrides)
    return config


class TokenizerBase:
    """Shared front end. Subclasses set `self._tokenizer` (a tokenizers.Tokenizer) before calling
    `_init_common`."""

    padding_side = "left"
    truncation_side = "right"

    def _init_common(self, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                     additional_special_tokens=None, extra_special_tokens=None, add_bos_token=None,
                     add_eos_token=None, chat_template=None, padding_side=None, truncation_side=None,
                     model_max_length=None, clean_up_tokenization_spaces=False, **unused):
        from tokenizers import AddedToken

        self.bos_token = _token_content(bos_token)
        self.eos_token = _token_content(eos_token)
        self.unk_token = _token_content(unk_token)
        self.pad_token = _token_content(pad_token)
        extra = additional_special_tokens if additional_special_tokens is not None else extra_special_tokens
        if isinstance(extra, dict):  # transformers 5 may store named extra tokens
            extra = list(extra.values())
        self.additional_special_tokens = [_token_content(t) for t in (extra or [])]
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        if padding_side is not None:
            self.padding_side = padding_side
        if truncation_side is not None:
            self.truncation_side = truncation_side
        self.model_max_length = int(model_max_length) if model_max_length is not None else int(1e30)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        # Named special tokens must be matched whole in the text, as transformers does.
        named = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token,
                             *self.additional_special_tokens) if t]
        missing = [t for t in named if self._tokenizer.token_to_id(t) is None]
        if missing:
            self._tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
        known_special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        self._tokenizer.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in named if t not in known_special])

    # ---- special tokens -------------------------------------------------------------------------------

    def _id_of(self, token):
        return None if token is None else self._tokenizer.token_to_id(token)

    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))

    @property
    def all_special_tokens(self):
        """The named special tokens and additional_special_tokens (as transformers counts them; decode's
        skip_special_tokens also skips every token the vocabulary marks special)."""
        tokens = []
        for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token, *self.additional_special_tokens):
            if t and t not in tokens:
                tokens.append(t)
        return tokens

    @property
    def all_special_ids(self):
        return [self._tokenizer.token_to_id(t) for t in self.all_special_tokens]

    @property
    def special_tokens_map(self):
        out = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name)}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    def add_special_tokens(self, special_tokens: dict) -> int:
        """Set named special tokens (adding them to the vocabulary if new). Returns how many were added."""
        from tokenizers import AddedToken

        before = len(self)
        for name, value in special_tokens.items():
            if name == "additional_special_tokens":
                values = [_token_content(v) for v in value]
                self.additional_special_tokens += [v for v in values if v not in self.additional_special_tokens]
            elif name in SPECIAL_TOKEN_NAMES:
                values = [_token_content(value)]
                setattr(self, name, values[0])
            else:
                raise ValueError(f"unknown special token name {name!r}; use one of {SPECIAL_TOKEN_NAMES} "
                                 "or additional_special_tokens")
            self._tokenizer.add_special_tokens([AddedToken(v, normalized=False, special=True) for v in values])
        return len(self) - before

    def add_tokens(self, tokens) -> int:
        from tokenizers import AddedToken

        tokens = [tokens] if isinstance(tokens, str) else tokens
        return self._tokenizer.add_tokens([t if isinstance(t, AddedToken) else AddedToken(t) for t in tokens])

    # ---- vocabulary -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self):
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tokenizer.id_to_token(i) for i in _as_id_list(ids) if i not in special]

    def convert_tokens_to_string(self, tokens) -> str:
        return self._tokenizer.decoder.decode(tokens) if self._tokenizer.decoder else "".join(tokens)

    def tokenize(self, text: str, add_special_tokens=False) -> list:
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=add_special_tokens))

    # ---- encoding -------------------------------------------------------------------------------------

    def _encode_text(self, text: str) -> list:
        """Ids of `text` alone, special tokens in it matched whole, none added around it."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_one(self, text, pair, add_special_tokens) -> list:
        ids = self._encode_text(text)
        pair_ids = self._encode_text(pair) if pair is not None else None
        if add_special_tokens:
            return self.build_inputs_with_special_tokens(ids, pair_ids)
        return list(ids) + (list(pair_ids) if pair_ids is not None else [])

    def build_inputs_with_special_tokens(self, ids, ids_pair=None):
        """[bos] ids [eos] as add_bos_token / add_eos_token say (the seeds' LlamaTokenizer contract)."""
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + list(ids) + eos
        if ids_pair is not None:
            out += bos + list(ids_pair) + eos
        return out

    def encode(self, text, text_pair=None, add_special_tokens=True, truncation=None, max_length=None,
               return_tensors=None, **kwargs):
        encoded = self(text, text_pair=text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                       max_length=max_length, return_tensors=return_tensors)
        return encoded["input_ids"]

    def __call__(self, text=None, text_pair=None, add_special_tokens=True, padding=False, truncation=None,
                 max_length=None, return_tensors=None, return_attention_mask=None, padding_side=None,
                 pad_to_multiple_of=None, **kwargs):
        _reject_unsupported(kwargs)
        if text is None:
            raise ValueError("the tokenizer needs text: a string or a list of strings")
        is_batch = isinstance(text, (list, tuple))
        texts = list(text) if is_batch else [text]
        pairs = (list(text_pair) if is_batch else [text_pair]) if text_pair is not None else [None] * len(texts)
        if len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} text pairs")
        for t in texts + [p for p in pairs if p is not None]:
            if not isinstance(t, str):
                raise TypeError(f"the tokenizer takes str or a list of str, got {type(t).__name__}")

        if truncation in (True, "longest_first", "only_first", "only_second") and max_length is None:
            max_length = self.model_max_length
        rows = []
        for t, p in zip(texts, pairs):
            ids = self._encode_one(t, p, add_special_tokens)
            if truncation not in (None, False, "do_not_truncate") and max_length is not None and len(ids) > max_length:
                ids = ids[:max_length] if self.truncation_side == "right" else ids[len(ids) - max_length:]
            rows.append(ids)

        encoded = BatchEncoding(input_ids=rows, attention_mask=[[1] * len(r) for r in rows])
        if padding not in (False, None, "do_not_pad"):
            encoded = self.pad(encoded, padding=padding, max_length=max_length, padding_side=padding_side,
                               pad_to_multiple_of=pad_to_multiple_of)
        if return_attention_mask is False:
            encoded.pop("attention_mask")
        if not is_batch:
            encoded = BatchEncoding({k: v[0] for k, v in encoded.items()})
        return _convert_tensors(encoded, return_tensors, is_batch)

    def pad(self, encoded, padding=True, max_length=None, padding_side=None, pad_to_multiple_of=None,
            return_tensors=None, return_attention_mask=None):
        """Pad a batch (a dict of lists, or a list of dicts) to one length with pad_token_id."""
        if isinstance(encoded, (list, tuple)):
            encoded = {k: [e[k] for e in encoded] for k in encoded[0]}
        rows = [list(_as_id_list(r)) for r in encoded["input_ids"]]
        masks = [list(_as_id_list(m)) for m in encoded.get("attention_mask", [[1] * len(r) for r in rows])]
        if self.pad_token_id is None:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token. Set one, e.g. "
                             "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
                             "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`.")
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (True, "longest"):
            target = max((len(r) for r in rows), default=0)
        else:
            raise ValueError(f"unknown padding strategy {padding!r}; use True/'longest', 'max_length' or False")
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        out_rows, out_masks = [], []
        for r, m in zip(rows, masks):
            n = max(target - len(r), 0)
            if side == "left":
                out_rows.append([self.pad_token_id] * n + r)
                out_masks.append([0] * n + m)
            else:
                out_rows.append(r + [self.pad_token_id] * n)
                out_masks.append(m + [0] * n)
        result = BatchEncoding(input_ids=out_rows, attention_mask=out_masks)
        if return_attention_mask is False:
            result.pop("attention_mask")
        return _convert_tensors(result, return_tensors, True)

    # ---- decoding -------------------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        ids = _as_id_list(token_ids)
        vocab_size = len(self)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs) -> list:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # ---- chat -----------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt=False, continue_final_message=False, tokenize=True,
                            padding=False, truncation=False, max_length=None, return_tensors=None,
                            return_dict=None, **template_kwargs):
        """Render the chat template; with tokenize=True return ids (a BatchEncoding when return_dict,
        the transformers 5 default; pass return_dict=False for the bare ids of transformers 4)."""
        template = chat_template or self.chat_template
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        if not template:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or the GGUF); "
                             "pass chat_template=...")
        is_batch = (isinstance(conversation, (list, tuple)) and conversation
                    and isinstance(conversation[0], (list, tuple)))
        conversations = conversation if is_batch else [conversation]
        variables = dict(self.special_tokens_map, **template_kwargs)
        if tools is not None:
            variables["tools"] = tools
        if documents is not None:
            variables["documents"] = documents
        rendered = []
        for messages in conversations:
            text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)
            if continue_final_message:
                text = _cut_after_final_message(text, messages)
            rendered.append(text)
        if not tokenize:
            return rendered if is_batch else rendered[0]
        encoded = self(rendered if is_batch else rendered[0], add_special_tokens=False, padding=padding,
                       truncation=truncation, max_length=max_length, return_tensors=return_tensors)
        if return_dict is None:
            return_dict = True
        return encoded if return_dict else encoded["input_ids"]

    # ---- saving ---------------------------------------------------------------------------------------

    def _config_for_saving(self) -> dict:
        config = {
            "tokenizer_class": type(self).__name__,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
        }
        config.update({name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name)})
        if self.additional_special_tokens:
            config["additional_special_tokens"] = list(self.additional_special_tokens)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return {k: v for k, v in config.items() if v is not None}

    def save_pretrained(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        files = self._save_vocabulary(save_directory)
        config_path = os.path.join(save_directory, CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(self._config_for_saving(), f, indent=2, ensure_ascii=False)
        map_path = os.path.join(save_directory, SPECIAL_TOKENS_MAP_FILE)
        with open(map_path, "w", encoding="utf-8") as f:
            json.dump(self.special_tokens_map, f, indent=2, ensure_ascii=False)
        return (config_path, map_path, *files)

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, added={len(self) - self.vocab_size}, "
                f"special={self.special_tokens_map}, padding_side={self.padding_side!r})")


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: drop the space before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _cut_after_final_message(text: str, messages) -> str:
    """continue_final_message: end the prompt right after the last message's content, so the model
    continues it instead of starting a new turn."""
    final = messages[-1]["content"] if messages else ""
    if not isinstance(final, str) or not final.strip():
        raise ValueError("continue_final_message needs a final message with text content")
    at = text.rfind(final.strip())
    if at < 0:
        raise ValueError("continue_final_message: the final message's content is not in the rendered template")
    return text[: at + len(final.strip())]


# transformers options accepted when they ask for nothing beyond what __call__ returns.
_NEUTRAL_OPTIONS = {"verbose": None, "return_token_type_ids": (None, False), "is_split_into_words": (False,),
                    "return_overflowing_tokens": (False,), "return_special_tokens_mask": (False,),
                    "return_offsets_mapping": (False,), "return_length": (False,), "stride": (0,)}


def _reject_unsupported(kwargs):
    for name, value in kwargs.items():
        if name not in _NEUTRAL_OPTIONS:
            raise TypeError(f"the tokenizer got an unexpected argument {name!r}")
        allowed = _NEUTRAL_OPTIONS[name]
        if allowed is not None and value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported by llama_fast's tokenizers")


def _as_id_list(token_ids) -> list:
    """ints from an int, a list, a 0-d/1-d tensor or numpy array."""
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(i) for i in token_ids]


def _convert_tensors(encoded: BatchEncoding, return_tensors, is_batch) -> BatchEncoding:
    if return_tensors is None:
        return encoded
    if return_tensors != "pt":
        if return_tensors == "np":
            import numpy as np

            return BatchEncoding({k: np.asarray(v if is_batch else [v], dtype=np.int64) for k, v in encoded.items()})
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or 'np'")
    import torch

    rows = encoded["input_ids"] if is_batch else [encoded["input_ids"]]
    if len({len(r) for r in rows}) > 1:
        raise ValueError("the sequences have different lengths; pass padding=True to make a tensor of them")
    return BatchEncoding({k: torch.tensor(v if is_batch else [v], dtype=torch.long) for k, v in encoded.items()})
