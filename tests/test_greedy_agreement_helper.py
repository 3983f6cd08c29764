"""conftest.assert_greedy_agrees accepts a divergence only at a genuine near-tie of the reference's logits."""
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_greedy_agrees, assert_top1_agrees


def _reference(prompt, steps_logits):
    """A fake transformers generate output: greedy tokens from the given per-step logits [B, V]."""
    new = torch.stack([s.argmax(-1) for s in steps_logits], 1)
    return SimpleNamespace(sequences=torch.cat([prompt, new], 1), logits=tuple(steps_logits))


def test_identical_sequences_pass_and_a_clear_disagreement_fails():
    prompt = torch.tensor([[5, 6]])
    steps = [torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[3.0, 0.0, 1.0]])]
    ref = _reference(prompt, steps)
    assert_greedy_agrees(ref.sequences.clone(), ref, prompt_len=2)
    wrong = ref.sequences.clone()
    wrong[0, 3] = 2                      # margin 2.0 of scale 3.0: no tie
    with pytest.raises(AssertionError, match="is no tie"):
        assert_greedy_agrees(wrong, ref, prompt_len=2)


def test_divergence_at_a_near_tie_is_accepted_and_the_rest_of_the_row_ignored():
    prompt = torch.tensor([[5, 6], [7, 8]])
    steps = [torch.tensor([[1.0, 1.0 + 1e-6, 0.0], [0.0, 4.0, 1.0]]),
             torch.tensor([[0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])]
    ref = _reference(prompt, steps)
    got = ref.sequences.clone()
    got[0, 2], got[0, 3] = 0, 1          # row 0 took the other side of a 1e-6 tie, then went its own way
    assert_greedy_agrees(got, ref, prompt_len=2, rel_tol=1e-5)
    got[1, 3] = 1                        # row 1 has no tie
    with pytest.raises(AssertionError, match="row 1 differs at new token 1"):
        assert_greedy_agrees(got, ref, prompt_len=2, rel_tol=1e-5)


def test_top1_agreement_ignores_near_ties_only():
    ref = torch.tensor([[4.0, 1.0, 0.0], [2.0, 2.0 + 1e-7, 0.0], [0.0, 0.0, 3.0]])
    got = ref.clone()
    got[1] = torch.tensor([2.0 + 1e-7, 2.0, 0.0])     # the tie flipped: fine
    assert_top1_agrees(got, ref, rel_tol=1e-5)
    got[0] = torch.tensor([1.0, 4.0, 0.0])            # a clear position flipped: caught
    with pytest.raises(AssertionError, match=r"clear positions \[\[0\]\]"):
        assert_top1_agrees(got, ref, rel_tol=1e-5)
