"""Checkpoints in nanochat's format: round trips, nanochat-written files, older files, and bad files."""

import json

import pytest
import torch

from helpers import random_model, tiny_config, tokens
from models import nanochat
from models.nanochat import checkpoint
from models.nanochat.gpt import GPT


def write_nanochat_style(directory, model, step=5, config=None, state=None):
    """A checkpoint as nanochat's base_train writes it: bf16 embeddings, torch.compile's prefix, the fork's config
    fields all present, and meta fields besides model_config."""
    state = state if state is not None else {
        "_orig_mod." + k: (v.to(torch.bfloat16) if "wte" in k or "value_embeds" in k else v.float())
        for k, v in model.state_dict().items()}
    torch.save(state, directory / f"model_{step:06d}.pt")
    import dataclasses
    meta = {"step": step, "val_bpb": 1.5, "model_config": config or dataclasses.asdict(model.config),
            "user_config": {}, "device_batch_size": 4, "max_seq_len": 256}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))


def test_round_trip(tmp_path):
    model = random_model(tiny_config(use_mhc=True, mhc_num_streams=2), seed=1, dtype=torch.float32)
    nanochat.save(model, tmp_path, 7, meta={"val_bpb": 1.0})
    nanochat.save(model, tmp_path, 12)
    assert nanochat.steps(tmp_path) == [7, 12]
    loaded = nanochat.load(tmp_path)
    idx = tokens(1, 20)
    assert torch.equal(loaded(idx), model(idx))
    meta = json.loads((tmp_path / "meta_000007.json").read_text())
    assert meta["step"] == 7 and meta["val_bpb"] == 1.0 and meta["model_config"]["use_mhc"] is True


def test_plain_models_write_an_upstream_config(tmp_path):
    nanochat.save(random_model(tiny_config(), dtype=torch.float32), tmp_path, 1)
    config = json.loads((tmp_path / "meta_000001.json").read_text())["model_config"]
    assert set(config) == set(checkpoint.UPSTREAM_FIELDS)  # upstream nanochat's GPTConfig(**config) accepts it


def test_loads_what_nanochat_writes(tmp_path):
    model = random_model(tiny_config(), seed=2, dtype=torch.float32)
    write_nanochat_style(tmp_path, model)
    loaded = nanochat.load(tmp_path, step=5)
    expected = {k: (v.to(torch.bfloat16).float() if "wte" in k or "value_embeds" in k else v)
                for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_older_checkpoints_load_with_neutral_defaults(tmp_path):
    cfg = tiny_config()
    model = random_model(cfg, seed=3, dtype=torch.float32)
    newer = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")
    state = {k: v for k, v in model.state_dict().items() if k not in newer and "value_embeds" not in k
             and "ve_gate" not in k}
    config = {k: getattr(cfg, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")}
    write_nanochat_style(tmp_path, model, config=config, state=state)
    loaded = nanochat.load(tmp_path)
    assert loaded.config.window_pattern == "L"
    assert torch.equal(loaded.resid_lambdas, torch.ones(6)) and loaded.backout_lambda.item() == 0.0
    assert loaded.value_embeds["1"].weight.abs().sum() == 0


class TestBadCheckpoints:
    def save(self, tmp_path):
        model = random_model(tiny_config(), seed=4, dtype=torch.float32)
        nanochat.save(model, tmp_path, 3)
        return model

    def set_config_field(self, tmp_path, key, value):
        meta = tmp_path / "meta_000003.json"
        data = json.loads(meta.read_text())
        data["model_config"][key] = value
        meta.write_text(json.dumps(data))
        return meta

    def test_corrupt_model_file(self, tmp_path):
        self.save(tmp_path)
        path = tmp_path / "model_000003.pt"
        path.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(nanochat.CheckpointError, match=r"model_000003.pt: corrupt or not a model checkpoint"):
            nanochat.load(tmp_path)

    def test_meta_and_state_mismatch(self, tmp_path):
        self.save(tmp_path)
        self.set_config_field(tmp_path, "n_embd", 64)
        with pytest.raises(nanochat.CheckpointError,
                           match=r"does not match the model_config of meta_000003.json.*transformer.h.0.attn.c_q.weight: "
                                 r"file \(32, 32\) vs config \(64, 64\)"):
            nanochat.load(tmp_path)

    def test_missing_and_unexpected_keys(self, tmp_path):
        model = self.save(tmp_path)
        state = dict(model.state_dict())
        del state["transformer.h.2.mlp.c_fc.weight"]
        state["transformer.h.9.mlp.c_fc.weight"] = torch.zeros(1)
        torch.save(state, tmp_path / "model_000003.pt")
        with pytest.raises(nanochat.CheckpointError, match=r"missing keys \['transformer.h.2.mlp.c_fc.weight'\]; "
                                                           r"unexpected keys \['transformer.h.9.mlp.c_fc.weight'\]"):
            nanochat.load(tmp_path)

    def test_unknown_config_field_and_missing_meta(self, tmp_path):
        self.save(tmp_path)
        meta = self.set_config_field(tmp_path, "n_experts", 8)
        with pytest.raises(nanochat.CheckpointError, match=r"unknown model_config field\(s\) \['n_experts'\]"):
            nanochat.load(tmp_path)
        meta.unlink()
        with pytest.raises(nanochat.CheckpointError, match="meta_000003.json: missing"):
            nanochat.load(tmp_path)

    def test_missing_directory_and_step(self, tmp_path):
        with pytest.raises(nanochat.CheckpointError, match="no model_<step>.pt checkpoint"):
            nanochat.load(tmp_path)
        self.save(tmp_path)
        with pytest.raises(nanochat.CheckpointError, match=r"no checkpoint for step 4; steps: \[3\]"):
            nanochat.load(tmp_path, step=4)

    def test_interrupted_save_keeps_the_old_checkpoint(self, tmp_path, monkeypatch):
        model = self.save(tmp_path)
        before = (tmp_path / "model_000003.pt").read_bytes()

        def interrupted(obj, f):
            f.write(b"partial")
            raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            nanochat.save(model, tmp_path, 3)
        assert (tmp_path / "model_000003.pt").read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000003.json", "model_000003.pt"]
        monkeypatch.undo()
        assert isinstance(nanochat.load(tmp_path), GPT)
