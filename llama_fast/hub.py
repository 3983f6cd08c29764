"""Hugging Face repo ids ("org/name") -> a local snapshot directory, through huggingface_hub (the optional
`hub` extra: pip install 'llama_fast[hub]'), as transformers finds them:

    path = resolve("meta-llama/Llama-2-7b-hf", MODEL_FILES, revision="main", cache_dir=None,
                   local_files_only=False, token=None)

A path that exists locally is returned as it is. Otherwise the snapshot of `revision` (a branch or tag named
in the cache's refs/, or a commit hash) is looked up in the cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub; cache_dir= overrides), and downloaded when missing unless local_files_only or
HF_HUB_OFFLINE=1 forbid it; only the files a loader reads are fetched (`patterns`). A repo that is neither
cached nor downloadable gives one FileNotFoundError naming the repo, the revision and the cache directory.
"""
from __future__ import annotations

import os
import re

# What from_pretrained reads (config, weights, index, generation config) and what the tokenizers read.
MODEL_FILES = ["*.json", "*.safetensors"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "config.json",
                   "generation_config.json"]
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")

# huggingface_hub's rule for repo ids: an optional namespace, a name of letters, digits, "-", "_", "."
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_repo_id(path: str) -> bool:
    """Whether `path`, which does not exist locally, can only mean a Hub repo id."""
    return bool(_REPO_ID.match(path)) and ".." not in path and not path.endswith((".gguf", ".json", ".safetensors"))


def resolve(path, patterns: list[str], revision: str | None = None, cache_dir=None,
            local_files_only: bool = False, token=None) -> str:
    """The local directory (or file) `path` names: itself if it exists, else a Hub repo's snapshot."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if not is_repo_id(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ImportError(f"{path!r} is not a local path, so it would be a Hugging Face repo id; loading by repo "
                          "id needs huggingface_hub: pip install 'llama_fast[hub]'") from None
    offline = bool(local_files_only or constants.HF_HUB_OFFLINE)
    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    what = f"{path} (revision {revision or 'main'})"
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, cache_dir=cache_dir,
                                                 local_files_only=offline, allow_patterns=patterns, token=token)
    except errors.LocalEntryNotFoundError:
        why = ("offline (local_files_only=True or HF_HUB_OFFLINE=1), so nothing was downloaded" if offline
               else "the Hub could not be reached to download it")
        raise FileNotFoundError(f"{what} is not in the Hugging Face cache at {where}, and {why}") from None
    except errors.GatedRepoError:
        raise PermissionError(f"{what} is gated: accept its license on the Hub and pass token= or log in "
                              "(huggingface-cli login)") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{path}: no such repo on the Hub (or it is private: pass token=), and it is "
                                f"not in the cache at {where}") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{what}: the repo has no such revision") from None


def split_hub_kwargs(kwargs: dict) -> dict:
    """Removes and returns the Hub arguments (revision, cache_dir, local_files_only, token) of `kwargs`."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
