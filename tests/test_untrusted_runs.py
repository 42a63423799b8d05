"""A run folder someone sent is safe to open: no file of it is unpickled unless the user asks for it. Each test
plants a pickle whose loading would create a marker file (what an attacker's payload would run) in one of the
run's files, opens the run through the command line, and checks that the marker does not appear."""

import os
import pickle
import subprocess
from pathlib import Path

import pytest

from models import nanochat
from models.tools import cli
from models.training import tokenizer as tk

SMALL = ["--depth", "2", "--width", "64", "--seq-len", "32", "--vocab-size", "512", "--batch-size", "4",
         "--eval-tokens", "512", "--eval-every", "0"]


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # any callable: a shell command would do as well


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sent"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "CACHE", tmp_path_factory.mktemp("cache"))
        assert cli.main(["train", "--steps", "4", "--out", str(out), *SMALL]) == 0
    return out


def copy(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(run), str(to)], check=True)
    return to


def test_a_pickled_tokenizer_is_not_read_unless_converted(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    sent, marker = copy(run, tmp_path / "sent"), tmp_path / "pwned"
    (sent / "tokenizer" / "tokenizer.json").unlink()  # as nanochat writes it: the pickle alone
    (sent / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    assert cli.main(["eval", str(sent), "--iters", "1", "--max-tokens", "256", "--ar-prompts", "0"]) == 2
    err = capsys.readouterr().err
    assert "can run any code it holds, so it is not read" in err and "python -m models.training.tokenizer" in err
    assert not marker.exists()


def test_a_crafted_optimizer_state_is_not_executed(run, tmp_path, capsys):
    sent, marker = copy(run, tmp_path / "sent"), tmp_path / "pwned"
    (sent / "optim_000004_rank0.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    assert cli.main(["train", "--resume", "--steps", "5", "--out", str(sent)]) == 2
    assert "optim_000004_rank0.pt: corrupt or not an optimizer checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_crafted_weights_are_not_executed(run, tmp_path, capsys):
    sent, marker = copy(run, tmp_path / "sent"), tmp_path / "pwned"
    nanochat.paths(sent, 4)[0].write_bytes(pickle.dumps(Payload(marker), protocol=2))
    assert cli.main(["generate", str(sent), "--max-new", "2"]) == 2
    assert "corrupt or not a model checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_converted_nanochat_tokenizer_directory_opens(run, tmp_path):
    sent = copy(run, tmp_path / "sent")
    directory = sent / "tokenizer"
    (directory / "tokenizer.json").unlink()
    assert tk.main([str(directory)]) == 0  # the user trusts it: one conversion
    assert cli.main(["generate", str(sent), "--max-new", "2", "--temperature", "0"]) == 0
