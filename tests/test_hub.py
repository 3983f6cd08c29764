"""Repo ids: from_pretrained("org/name") and AutoTokenizer.from_pretrained("org/name") find the snapshot in
a Hugging Face cache tree built here (models--org--name/refs/<branch>, snapshots/<commit>/...), as
huggingface_hub lays it out, through huggingface_hub; nothing touches the network (local_files_only or
HF_HUB_OFFLINE=1)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llama_fast import AutoTokenizer, LlamaForCausalLM

from conftest import make_hf_model

pytest.importorskip("huggingface_hub")
pytest.importorskip("transformers")

MAIN, V2 = "a" * 40, "b" * 40     # commit hashes


def _snapshot(cache, repo, commit, seed, refs=()):
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    make_hf_model(snapshot, seed=seed)
    _tokenizer(snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<unk>", "<s>", "</s>", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True}))


@pytest.fixture
def cache(tmp_path):
    cache = tmp_path / "hub"
    main = _snapshot(cache, "org/tiny", MAIN, seed=0, refs=("main",))
    v2 = _snapshot(cache, "org/tiny", V2, seed=1, refs=("v2",))
    return cache, main, v2


def logits(model):
    with torch.no_grad():
        return model(torch.arange(10)[None]).logits


def test_repo_id_revision_and_commit(cache):
    cache, main, v2 = cache
    direct_main = logits(LlamaForCausalLM.from_pretrained(main))
    direct_v2 = logits(LlamaForCausalLM.from_pretrained(v2))
    assert not torch.equal(direct_main, direct_v2)
    for revision, want in ((None, direct_main), ("main", direct_main), ("v2", direct_v2), (V2, direct_v2)):
        model = LlamaForCausalLM.from_pretrained("org/tiny", revision=revision, cache_dir=cache,
                                                 local_files_only=True)
        assert torch.equal(logits(model), want), revision
    tok = AutoTokenizer.from_pretrained("org/tiny", cache_dir=cache, local_files_only=True)
    assert tok.encode("hello world") == [1, 3, 4]


def test_not_cached_offline_names_repo_and_cache(cache):
    cache, _, _ = cache
    with pytest.raises(FileNotFoundError, match=rf"org/missing \(revision main\) is not in the Hugging Face "
                                                rf"cache at {cache}, and offline"):
        LlamaForCausalLM.from_pretrained("org/missing", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"org/tiny \(revision nope\) is not in the Hugging Face cache"):
        LlamaForCausalLM.from_pretrained("org/tiny", revision="nope", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="org/missing"):
        AutoTokenizer.from_pretrained("org/missing", cache_dir=cache, local_files_only=True)


def test_cache_from_environment(cache, tmp_path):
    """HF_HUB_CACHE, and HF_HOME (cache in $HF_HOME/hub), read by huggingface_hub at import: a fresh process."""
    cache, main, _ = cache
    script = ("import torch, llama_fast as lf; m = lf.LlamaForCausalLM.from_pretrained('org/tiny'); "
              "t = lf.AutoTokenizer.from_pretrained('org/tiny'); "
              "print(m.model.embed_tokens.weight.sum().item(), t.encode('hello'))")
    want = LlamaForCausalLM.from_pretrained(main).model.embed_tokens.weight.sum().item()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for variable, value in (("HF_HUB_CACHE", cache), ("HF_HOME", cache.parent)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update({variable: str(value), "HF_HUB_OFFLINE": "1", "PYTHONPATH": root})
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == str(want) and "[1, 3]" in out.stdout, variable


def test_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)        # import fails
    with pytest.raises(ImportError, match=r"pip install 'llama_fast\[hub\]'"):
        LlamaForCausalLM.from_pretrained("org/tiny")
    with pytest.raises(ImportError, match=r"needs huggingface_hub"):
        AutoTokenizer.from_pretrained("org/tiny")
    # local paths need no hub
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere")
