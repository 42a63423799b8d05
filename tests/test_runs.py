"""Trained runs are reused only under the same config, data and code."""

import dataclasses

import pytest

from models.nanochat import GPTConfig
from models.training import runs
from models.training.config import TrainConfig
from models.training.loop import Data

CFG = TrainConfig(model=GPTConfig(sequence_len=16, vocab_size=512, n_layer=2, n_head=1, n_kv_head=1, n_embd=32),
                  steps=2, batch_size=2, warmup_steps=1, eval_every=0, eval_tokens=256)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return Data.prepare(None, 512, tmp_path_factory.mktemp("cache"))


def test_a_run_is_reused_until_its_config_or_code_changes(data, tmp_path, monkeypatch):
    first, metrics, reused = runs.cached_run(CFG, data, tmp_path, "m", show_progress=False)
    assert not reused and (first / "metrics.json").exists() and (first / "tokenizer").is_dir()
    again, metrics_again, reused = runs.cached_run(CFG, data, tmp_path, "m", show_progress=False)
    assert reused and again == first and metrics_again == metrics
    other, _, reused = runs.cached_run(dataclasses.replace(CFG, seed=1), data, tmp_path, "m", show_progress=False)
    assert not reused and other != first
    monkeypatch.setattr(runs, "code_version", lambda: "another version")
    changed, _, reused = runs.cached_run(CFG, data, tmp_path, "m", show_progress=False)
    assert not reused and changed != first
    assert not list((tmp_path / "runs").glob(".*")), "no temporary run directory is left behind"


def test_an_interrupted_run_is_not_reused(data, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.cached_run(CFG, data, tmp_path, "m", show_progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_code_version_follows_the_source(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "a.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(runs, "SOURCES", (tmp_path / "pkg",))
    runs.code_version.cache_clear()
    before = runs.code_version()
    source.write_text("x = 2\n")
    runs.code_version.cache_clear()
    assert runs.code_version() != before
    runs.code_version.cache_clear()


def test_row_24_one_cache_whatever_folder_a_command_or_notebook_runs_from(tmp_path, monkeypatch):
    """Issue 26, row 24: the default cache is an absolute place ($SNLP_CACHE, else $XDG_CACHE_HOME/snlp), so a
    notebook started from notebooks/ reuses the runs the command line trained from the repository's root."""
    from pathlib import Path

    from models.training.runs import default_cache

    monkeypatch.delenv("SNLP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    places = set()
    for folder in (tmp_path, tmp_path / "notebooks"):
        folder.mkdir(exist_ok=True)
        monkeypatch.chdir(folder)
        places.add(default_cache())
    assert places == {tmp_path / "xdg" / "snlp"}
    monkeypatch.setenv("SNLP_CACHE", "relative/cache")
    assert default_cache() == tmp_path / "notebooks" / "relative" / "cache"  # made absolute where it was given
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    assert not [p.name for p in notebooks.glob("*.py") if "snlp-out/cache" in p.read_text()]
