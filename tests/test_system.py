"""LayerSystem: the three constructors evaluate the same f_l, in parallel, with JVPs and checks."""

import pytest
import torch
from torch import nn

import layersolve as ls
from helpers import DTYPE, random_state, residual_block, residual_blocks


class Block(nn.Module):
    """h -> h + tanh(W h + c), a residual block as a user would write it."""

    def __init__(self, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(width, width, dtype=DTYPE)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(width, width, generator=g, dtype=DTYPE) / width**0.5)
            self.lin.bias.copy_(0.1 * torch.randn(width, generator=g, dtype=DTYPE))
        self.register_buffer("scale", torch.tensor(0.5, dtype=DTYPE))

    def forward(self, h):
        return h + self.scale * torch.tanh(self.lin(h))


def blocks(n=5, width=4):
    return [Block(width, seed=i) for i in range(n)]


def test_from_modules_matches_the_modules():
    mods = blocks()
    system = ls.LayerSystem.from_modules(mods)
    h0 = random_state((3, 4), seed=0)
    expected = [h0]
    for m in mods:
        expected.append(m(expected[-1]))
    torch.testing.assert_close(system.sequential(h0), torch.stack(expected))
    inputs = random_state((5, 3, 4), seed=1)  # one state per layer, evaluated in one batched call
    torch.testing.assert_close(system.evaluate(slice(0, 5), inputs), torch.stack([m(x) for m, x in zip(mods, inputs)]))
    torch.testing.assert_close(system.evaluate(slice(2, 4), inputs[:2]), torch.stack([mods[2](inputs[0]), mods[3](inputs[1])]))
    assert system.dtype == DTYPE and system.num_layers == 5


def test_gradients_reach_the_modules():
    mods = blocks(3)
    h0 = random_state((4,), seed=2)
    ls.solve(ls.LayerSystem.from_modules(mods), h0, iters=2).trace[-1].sum().backward()
    assert all(m.lin.weight.grad is not None and m.lin.weight.grad.abs().sum() > 0 for m in mods)


def test_from_function_and_user_evaluate_agree():
    params = residual_blocks(4, 3, seed=5)
    by_function = ls.LayerSystem.from_function(residual_block, params)

    def evaluate(layers, inputs):  # a hand-batched evaluate, as a fused model would write it
        p = {k: v[layers] for k, v in params.items()}
        return p["a"][:, None] * inputs + p["gain"][:, None] * torch.tanh(
            torch.einsum("lij,lj->li", p["w"], inputs) + p["c"])

    by_hand = ls.LayerSystem(evaluate, 4)
    h0 = random_state((3,), seed=5)
    torch.testing.assert_close(by_hand.sequential(h0), by_function.sequential(h0))
    tangent = random_state((4, 3), seed=6)
    inputs = random_state((4, 3), seed=7)
    torch.testing.assert_close(by_hand.jvp(slice(0, 4), inputs, tangent)[1], by_function.jvp(slice(0, 4), inputs, tangent)[1])


def test_jvp_matches_finite_differences():
    system = ls.LayerSystem.from_function(residual_block, residual_blocks(3, 4, seed=1))
    x, v = random_state((3, 4), seed=2), random_state((3, 4), seed=3)
    eps = 1e-6
    fd = (system.evaluate(slice(0, 3), x + eps * v) - system.evaluate(slice(0, 3), x - eps * v)) / (2 * eps)
    torch.testing.assert_close(system.jvp(slice(0, 3), x, v)[1], fd, rtol=1e-7, atol=1e-8)


def test_mismatched_modules_are_refused():
    mods = blocks(2, 4) + blocks(1, 3)
    with pytest.raises(ValueError, match=r"blocks\[2\] does not have the structure of blocks\[0\]"):
        ls.LayerSystem.from_modules(mods)
    with pytest.raises(ValueError, match="blocks is empty"):
        ls.LayerSystem.from_modules([])


def test_bad_construction():
    with pytest.raises(ValueError, match="same leading"):
        ls.LayerSystem.from_function(residual_block, {"w": torch.zeros(3, 2, 2), "c": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        ls.LayerSystem(lambda layers, x: x, 0)
    with pytest.raises(ValueError, match="without stream_dim"):
        ls.LayerSystem(lambda layers, x: x, 2, mixing=torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match=r"scales must have shape \(2,\)"):
        ls.LayerSystem(lambda layers, x: x, 2, scales=torch.ones(3))


def test_evaluate_must_keep_the_state_shape():
    system = ls.LayerSystem(lambda layers, x: x[..., :1], 2)
    with pytest.raises(ValueError, match="every layer must map a state to a state of the same shape"):
        ls.solve(system, torch.ones(3, dtype=DTYPE))


def test_check_state():
    system = ls.LayerSystem(lambda layers, x: x, 2, state_shape=(None, 4), dtype=torch.float32)
    system.check_state(torch.ones(7, 4))
    with pytest.raises(TypeError, match="h0 must have a floating dtype"):
        system.check_state(torch.ones(7, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        system.check_state([1.0, 2.0])
