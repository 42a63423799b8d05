"""Initial guesses."""

import pytest
import torch

import layersolve as ls
from helpers import random_state, residual_system

system = residual_system(6, 3, seed=4)
h0 = random_state((3,), seed=4)
reference = system.sequential(h0)


def test_repeat_and_one_step():
    zero = ls.solve(system, h0, iters=0, init=ls.Repeat())
    assert torch.equal(zero.trace, h0.expand(7, 3))
    one = ls.solve(system, h0, iters=0, init=ls.OneStep(), reference=reference, final_residual=True)
    torch.testing.assert_close(one.trace[1:], system.evaluate(slice(0, 6), h0.expand(6, 3)))
    assert one.stats.error[0, 0] <= 1e-15 and one.stats.exact_prefix[0] == 1


@pytest.mark.parametrize("rows", [6, 7])
def test_given_trace(rows):
    trace = reference[7 - rows:]
    sol = ls.solve(system, h0, iters=0, init=ls.Given(trace), final_residual=True)
    torch.testing.assert_close(sol.trace, reference)
    assert sol.stats.exact_prefix[0] == 6 and sol.result is ls.Result.CONVERGED


def test_given_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"Given: trace has shape \(5, 3\), expected \(7 or 6, \*\(3,\)\)"):
        ls.solve(system, h0, init=ls.Given(reference[:5]))
    bad = reference.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="Given: trace has non-finite values"):
        ls.solve(system, h0, init=ls.Given(bad))
    with pytest.raises(TypeError, match="init must be"):
        ls.solve(system, h0, init="repeat")
