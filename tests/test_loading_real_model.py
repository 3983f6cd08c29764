"""The real demo model (SmolLM2-135M-Instruct) converted to an HF directory by transformers: llama_fast
loads the directory and its logits on a 64-token text match transformers' model loaded from the GGUF."""
import pytest
import torch

from llama_fast import LlamaForCausalLM

from conftest import assert_top1_agrees, max_rel_diff


@pytest.mark.slow
def test_real_model_from_converted_hf_directory(demo_reference):
    directory, ids, ref = demo_reference
    ours = LlamaForCausalLM.from_pretrained(directory)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        got = ours(ids).logits
    assert max_rel_diff(got, ref) <= 1e-4
    assert_top1_agrees(got, ref, rel_tol=1e-4)  # a different summation order: ties may flip


@pytest.mark.slow
def test_real_model_decode_matches_prefill(demo_reference):
    directory, ids, ref = demo_reference
    ours = LlamaForCausalLM.from_pretrained(directory, dtype="bfloat16")
    with torch.no_grad():
        out = ours(ids[:, :60])
        steps = [out.logits]
        for t in range(60, 64):
            out = ours(ids[:, t:t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    got = torch.cat(steps, 1).float()
    # bf16 against the fp32 transformers model: the top token agrees where fp32's margin is clear
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.5
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert max_rel_diff(got, ref) < 0.05


_PEAK_SCRIPT = """
import json, resource, sys
from llama_fast import LlamaForCausalLM
m = LlamaForCausalLM.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))
tensors = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "tensors": tensors}))
"""


def _peak(directory, **kwargs):
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(directory), json.dumps(kwargs)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_never_holds_two_copies_of_the_weights(demo_reference, tmp_path):
    """Peak memory of from_pretrained (a fresh process each) minus that of loading a tiny model: the model
    itself plus at most one checkpoint tensor being converted (the fp32 embedding, 113 MB) and 48 MB of
    slack for allocator noise. Holding the file mapped next to the model, or a second copy, would be ~540 MB
    more."""
    from conftest import make_hf_model
    directory = demo_reference[0]
    make_hf_model(tmp_path)
    baseline = _peak(tmp_path)["peak"]
    largest = 49152 * 576 * 4
    for kwargs in ({}, {"dtype": "bfloat16"}, {"quantize": "int4"}):
        got = _peak(directory, **kwargs)
        extra = got["peak"] - baseline - got["tensors"]
        assert extra <= largest + 48 * 2 ** 20, f"{kwargs}: {extra / 2 ** 20:.0f} MB beyond the model"
