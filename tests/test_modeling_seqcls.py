"""LlamaForSequenceClassification against transformers': the last non-pad token is pooled."""
import pytest
import torch

from llama_fast import LlamaForSequenceClassification

from conftest import load_hf, make_hf_model, max_rel_diff

PAD = 0
CONFIG = dict(pad_token_id=PAD, num_labels=3, num_key_value_heads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seqcls")
    make_hf_model(directory, CONFIG, kind="classification")
    return load_hf(directory, kind="classification"), LlamaForSequenceClassification.from_pretrained(directory)


def _batch(pads, t=10, right=False):
    ids = torch.randint(1, 128, (len(pads), t), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        if p:
            cols = slice(t - p, t) if right else slice(0, p)
            ids[b, cols] = PAD
            mask[b, cols] = 0
    return ids, mask


@torch.no_grad()
def test_left_padded_matches_transformers(models):
    ref_model, ours = models
    ids, mask = _batch((0, 2, 5))
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = ref_model(ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, attention_mask=mask).logits
    assert got.shape == (3, 3)
    assert max_rel_diff(got, ref) <= 1e-4


@torch.no_grad()
def test_right_padded_matches_transformers(models):
    # Right padding: our causal model never lets the pooled token see the pads, so the mask is dropped.
    ref_model, ours = models
    ids, mask = _batch((0, 2, 5), right=True)
    ref = ref_model(ids, attention_mask=mask).logits
    assert max_rel_diff(ours(ids, attention_mask=mask).logits, ref) <= 1e-4
    assert max_rel_diff(ours(ids).logits, ref) <= 1e-4


@torch.no_grad()
def test_loss_matches_transformers(models):
    ref_model, ours = models
    ids, mask = _batch((0, 3))
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    labels = torch.tensor([2, 0])
    ref = ref_model(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    got = ours(ids, attention_mask=mask, labels=labels).loss
    assert abs(float(got) - float(ref)) <= 1e-5 * float(ref)
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])   # float labels: multi-label (BCE)
    ref_model.config.problem_type = None    # transformers stored the problem type of the first call
    ref = ref_model(ids, attention_mask=mask, position_ids=pos, labels=multi).loss
    got = ours(ids, attention_mask=mask, labels=multi).loss
    assert abs(float(got) - float(ref)) <= 1e-5 * float(ref)


@torch.no_grad()
def test_batch_without_pad_token_is_an_error(models):
    _, ours = models
    ours.config.pad_token_id = None
    try:
        with pytest.raises(ValueError, match="batch sizes > 1 if no padding token"):
            ours(_batch((0, 0))[0])
        assert ours(_batch((0,))[0]).logits.shape == (1, 3)     # a batch of one is fine
    finally:
        ours.config.pad_token_id = PAD
