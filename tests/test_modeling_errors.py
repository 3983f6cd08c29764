"""Bad forward inputs: each gets a clear error saying what is wrong."""
import pytest
import torch

from llama_fast import LlamaForCausalLM

from conftest import make_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("errors")
    make_hf_model(directory)
    return LlamaForCausalLM.from_pretrained(directory)


IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def test_out_of_range_token_ids(model):
    with pytest.raises(ValueError, match=r"token id 128 is out of range for vocab_size 128"):
        model(torch.tensor([[1, 128, 3]]))
    with pytest.raises(ValueError, match=r"token id -1 is out of range for vocab_size 128"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))


def test_attention_mask_with_holes_or_right_padding(model):
    hole = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    for mask in (hole, right):
        with pytest.raises(ValueError, match="only left padding is supported"):
            model(IDS, attention_mask=mask)


def test_attention_mask_shapes_and_values(model):
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D .* got 4-D .*custom 4-D masks are not supported"):
        model(IDS, attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\); expected \[2, 6\]"):
        model(IDS, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must contain only 0 and 1"):
        model(IDS, attention_mask=torch.full((2, 6), 2))


def test_input_ids_and_embeds(model):
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(IDS, inputs_embeds=torch.zeros(2, 6, 64))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq_len, 64\]"):
        model(inputs_embeds=torch.zeros(2, 6, 32))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq_len\]"):
        model(IDS[0])
    with pytest.raises(ValueError, match=r"the input has no tokens"):
        model(IDS[:, :0])


def test_position_ids(model):
    with pytest.raises(ValueError, match=r"position_ids must be \[2, 6\] or \[1, 6\]"):
        model(IDS, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="position_ids must be non-negative"):
        model(IDS, position_ids=torch.arange(-1, 5)[None])


def test_labels_shape_and_unknown_arguments(model):
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\)"):
        model(IDS, labels=IDS[:, :3])
    with pytest.raises(TypeError, match="unexpected keyword arguments: attention_maks"):
        model(IDS, attention_maks=torch.ones_like(IDS))


def test_forward_accepts_transformers_only_arguments(model):
    with torch.no_grad():
        out = model(IDS, cache_position=torch.arange(6), use_cache=False, output_attentions=False)
    assert out.logits.shape == (2, 6, 128)
