"""forward's other outputs against transformers: loss, hidden_states, attentions, and the output forms."""
import pytest
import torch

from llama_fast import LlamaForCausalLM, LlamaModel

from conftest import load_hf, make_hf_model, max_rel_diff

CONFIG = dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("outputs")
    make_hf_model(directory, CONFIG)
    return load_hf(directory), LlamaForCausalLM.from_pretrained(directory, backend="torch"), directory


def _ids(batch=2, t=9, seed=3):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


def test_loss_matches_transformers_with_ignored_labels(models):
    ref_model, ours, _ = models
    ids = _ids()
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 6] = -100
    with torch.no_grad():
        ref = ref_model(ids, labels=labels).loss
        got = ours(ids, labels=labels).loss
    assert got.dtype == torch.float32
    assert abs(float(got) - float(ref)) <= 1e-5 * float(ref)
    # labels are shifted: the first label of a row is never predicted
    labels2 = labels.clone()
    labels2[:, 0] = 5
    with torch.no_grad():
        assert torch.equal(ours(ids, labels=labels2).loss, got)


def test_hidden_states_match_transformers(models):
    ref_model, ours, _ = models
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids, output_hidden_states=True).hidden_states
        got = ours(ids, output_hidden_states=True).hidden_states
    assert len(got) == ours.config.num_hidden_layers + 1 == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert max_rel_diff(g, r) <= 1e-5, f"hidden_states[{i}]"


def test_attentions_match_transformers_eager(models):
    ref_model, ours, _ = models
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids, output_attentions=True).attentions
        out = ours(ids, output_attentions=True)
    assert len(out.attentions) == ours.config.num_hidden_layers
    for g, r in zip(out.attentions, ref):
        assert g.shape == r.shape == (2, 8, 9, 9)
        assert float((g - r).abs().max()) <= 1e-5
    # Exact by construction: returning the probabilities adds a computation beside the same attention kernel
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, out.logits)


def test_output_access_like_transformers(models):
    _, ours, _ = models
    ids = _ids()
    labels = ids.clone()
    with torch.no_grad():
        out = ours(ids, labels=labels, use_cache=False)
        tup = ours(ids, labels=labels, use_cache=False, return_dict=False)
    assert out.past_key_values is None
    assert list(out.keys()) == ["loss", "logits"]
    assert out[0] is out.loss and out["logits"] is out.logits and out[1] is out.logits
    assert isinstance(tup, tuple) and len(tup) == 2
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)
    loss, logits = out.to_tuple()
    assert torch.equal(logits, out.logits)
    with pytest.raises(KeyError):
        out["hidden_states"]
    with torch.no_grad():
        cached = ours(ids)               # use_cache defaults to config.use_cache (True), as transformers
    assert cached.past_key_values is not None and cached[0] is cached.logits


def test_logits_to_keep(models):
    _, ours, _ = models
    ids = _ids()
    close = dict(rtol=1e-6, atol=1e-6)   # a matmul over fewer rows may round differently
    with torch.no_grad():
        full = ours(ids).logits
        torch.testing.assert_close(ours(ids, logits_to_keep=1).logits, full[:, -1:], **close)
        torch.testing.assert_close(ours(ids, num_logits_to_keep=3).logits, full[:, -3:], **close)
        torch.testing.assert_close(ours(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]], **close)


def test_inputs_embeds_equal_input_ids(models):
    _, ours, _ = models
    ids = _ids()
    with torch.no_grad():
        embeds = ours.model.embed_tokens.weight[ids]
        assert torch.equal(ours(inputs_embeds=embeds).logits, ours(ids).logits)  # the lookup is a copy: exact


def test_llama_model_last_hidden_state(models):
    ref_model, _, directory = models
    base = LlamaModel.from_pretrained(directory)
    ids = _ids()
    with torch.no_grad():
        ref = ref_model.model(ids).last_hidden_state
        out = base(ids)
    assert max_rel_diff(out.last_hidden_state, ref) <= 1e-5
    assert out[0] is out.last_hidden_state
