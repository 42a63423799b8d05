"""The GPT model against an independent reference forward of nanochat (tests/nanochat_reference.py)."""

import dataclasses

import pytest
import torch

import nanochat_reference as reference
from helpers import MODEL_CONFIGS, SEQ_LEN, random_model, tiny_config, tokens
from models.nanochat.config import GPTConfig, window_sizes
from models.nanochat.gpt import GPT


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_logits_equal_the_reference(name):
    cfg = tiny_config(**MODEL_CONFIGS[name])
    model = random_model(cfg, seed=1)
    idx = tokens(2, SEQ_LEN, seed=1)
    expected = reference.reference_logits(model.state_dict(), dataclasses.asdict(cfg), idx)
    torch.testing.assert_close(model(idx), expected, rtol=1e-10, atol=1e-10)


def test_windows_bind_in_the_fixture():
    """The parity configs must exercise short windows: positions past 128 see fewer keys with SSSL than with L."""
    cfg = tiny_config()
    assert window_sizes(cfg) == [128, 128, 128, 256, 128, 256] == reference.window_sizes(dataclasses.asdict(cfg))
    idx = tokens(1, SEQ_LEN, seed=2)
    windowed = random_model(cfg, seed=2)(idx)
    full = random_model(tiny_config(window_pattern="L"), seed=2)(idx)
    assert torch.allclose(windowed[:, :129], full[:, :129]) and not torch.allclose(windowed[:, 129:], full[:, 129:])


def test_float32_matches_the_float64_reference():
    cfg = tiny_config()
    model = random_model(cfg, seed=3, dtype=torch.float32)
    idx = tokens(2, 64, seed=3)
    state = {k: v.double() for k, v in model.state_dict().items()}
    torch.testing.assert_close(model(idx).double(), reference.reference_logits(state, dataclasses.asdict(cfg), idx),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [dict(), dict(no_ve=True), dict(use_mhc=True, mhc_num_streams=3),
                                       dict(num_mtp_steps=2), dict(n_layer=5, n_kv_head=2, n_head=4)])
def test_state_dict_keys_and_shapes_are_nanochats(overrides):
    cfg = tiny_config(**overrides)
    state = GPT(cfg).state_dict()
    expected = reference.expected_shapes(dataclasses.asdict(cfg))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_vocabulary_is_padded_and_cropped():
    cfg = tiny_config(vocab_size=70)
    model = random_model(cfg)
    assert model.transformer.wte.weight.shape[0] == 128 and model.lm_head.weight.shape[0] == 128
    assert model(tokens(1, 5, vocab=70)).shape == (1, 5, 70)


def test_initialization_follows_nanochat():
    model = GPT(tiny_config())
    block = model.transformer.h[0]
    assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert model.resid_lambdas[0].item() == pytest.approx(1.15) and model.x0_lambdas[-1].item() == pytest.approx(0.05)
    logits = model(tokens(1, 8))
    assert logits.abs().max() < 1.0  # lm_head ~ N(0, 0.001): near-uniform predictions at init


class TestBadInput:
    model = random_model(tiny_config())

    def test_token_ids_outside_the_vocabulary(self):
        with pytest.raises(ValueError, match=r"token ids in \[0, 100\], outside the vocabulary \[0, 100\)"):
            self.model(torch.tensor([[0, 100]]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            self.model(torch.tensor([[-1, 3]]))

    def test_sequence_longer_than_the_rotary_cache(self):
        with pytest.raises(ValueError, match="exceeds the rotary cache of 2560 tokens"):
            self.model(torch.zeros(1, 2561, dtype=torch.long))

    def test_wrong_token_tensor(self):
        with pytest.raises(ValueError, match=r"idx must be an integer tensor of shape \(B, T\)"):
            self.model(torch.zeros(4, dtype=torch.long))

    def test_bad_config(self):
        with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
            GPTConfig(n_embd=30, n_head=4)
        with pytest.raises(ValueError, match="window_pattern='SXL'"):
            GPTConfig(window_pattern="SXL")
        with pytest.raises(ValueError, match="mhc_dynamic needs use_mhc=True"):
            GPTConfig(mhc_dynamic=True)
