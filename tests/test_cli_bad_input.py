"""Bad input, round two (issue 26): each test is one row of the issue's tables, and failed on the code before it
(656d83f). A bad flag or file gets one line naming it and exit status 2, before any work; a flag that does nothing
is refused; a closed pipe ends the command quietly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.inference.decode import distribution
from models.tools import cli, suite

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--depth", "2", "--width", "64", "--seq-len", "32", "--vocab-size", "512", "--batch-size", "4",
         "--eval-tokens", "512", "--eval-every", "0"]
EVAL = ["--iters", "1", "--max-tokens", "256", "--batch-size", "4", "--repeats", "1", "--ar-prompts", "0"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "CACHE", tmp_path_factory.mktemp("cache"))
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(["train", "--steps", "4", "--out", str(out), *SMALL]) == 0
    return out


def refused(argv, capsys) -> str:
    """The one-line error of a command refused by argparse (SystemExit 2) or by the command (status 2)."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_row_1_a_cuda_device_on_a_machine_without_one(capsys):
    assert "argument --device: 'cuda': no CUDA device here" in refused(["bench", "--preset", "tiny", "--device",
                                                                       "cuda"], capsys)


def test_row_2_an_unknown_device(capsys):
    err = refused(["bench", "--preset", "tiny", "--device", "banana"], capsys)
    assert "argument --device: must be cpu, cuda or cuda:N, got 'banana'" in err


def test_row_6_a_huge_temperature_samples_uniformly(run, capsys):
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    probabilities = distribution(logits, 1e308, top_k=2)
    torch.testing.assert_close(probabilities, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))  # the top 2, alike
    assert cli.main(["generate", str(run), "--temperature", "1e308", "--max-new", "4"]) == 0


@pytest.mark.parametrize("command", [["study", "RUN"], ["eval", "RUN"], ["plan", "RUN"], ["bench", "--preset", "tiny"],
                                     ["demo", "--quick"]])
def test_row_7_an_unwritable_out_is_refused_before_any_work(run, command, capsys, monkeypatch):
    def work(*_, **__):
        raise AssertionError("the command started its work before checking --out")

    monkeypatch.setattr(cli, "_load_run", work)
    monkeypatch.setattr(suite, "run", work)
    monkeypatch.setattr(cli, "train_config", work)
    argv = [str(run) if word == "RUN" else word for word in command] + ["--out", "/dev/null/x"]
    assert "--out /dev/null/x: /dev/null is a file, not a directory" in refused(argv, capsys)


def test_row_8_a_closed_pipe_ends_quietly(run):
    env = {**os.environ, "SNLP_CACHE": str(cli.CACHE), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "models.tools.cli", "eval", str(run), *EVAL, "--out",
                                str(run.parent / "eval.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env)
    process.stdout.close()  # the reader is gone before the command prints (`| head -0`)
    err = process.stderr.read().decode()
    assert process.wait(timeout=600) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_row_9_resuming_a_run_already_past_its_steps(run, tmp_path, capsys):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    err = refused(["train", "--resume", "--steps", "3", "--out", str(copy)], capsys)
    assert f"--resume: {copy} is already at step 4 >= --steps 3" in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "RUN", "--strategy", "hcn", "--max-new", "2"], "--strategy does nothing without --n-par, --speculative or --stages"),
    (["generate", "RUN", "--iters", "2", "--max-new", "2"], "--iters does nothing without --n-par, --speculative or --stages"),
    (["generate", "RUN", "--n-par", "1", "--draft-len", "2", "--max-new", "2"], "--draft-len does nothing without --speculative"),
    (["train", "--reg-lambda", "2", "--steps", "1", "--out", "OUT", *SMALL], "--reg-lambda does nothing without --reg"),
    (["train", "--sft-iters", "3", "--steps", "1", "--out", "OUT", *SMALL],
     "--sft-iters does nothing without --sft-n-par"),
    (["bench", "--preset", "tiny", "--tokens", "5"], "--tokens does nothing without --hf"),
    (["bench", "--preset", "tiny", "--repeats", "3"], "--repeats does nothing without --hf or --train"),
])
def test_row_10_a_flag_without_its_partner_is_refused(run, tmp_path, argv, message, capsys):
    argv = [str(run) if w == "RUN" else str(tmp_path / "out") if w == "OUT" else w for w in argv]
    assert message in refused(argv, capsys)


def test_row_12_hcn_on_a_model_without_hyper_connections(run, capsys):
    err = refused(["generate", str(run), "--strategy", "hcn", "--n-par", "2"], capsys)
    assert "--n-par 2: the HCN surrogate (ls.Mixing) needs an mHC model (use_mhc=True: trained with --mhc)" in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "RUN", "--n-par", "99", *EVAL], "--n-par 99: Plan.n_par must be an int in [1, 2]"),
    (["train", "--sft-n-par", "99", "--out", "OUT", *SMALL], "--sft-n-par 99: Plan.n_par must be an int in [1, 2]"),
])
def test_row_13_an_impossible_plan_names_its_flag(run, tmp_path, argv, message, capsys):
    argv = [str(run) if w == "RUN" else str(tmp_path / "out") if w == "OUT" else w for w in argv]
    assert message in refused(argv, capsys)


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """A tiny Llama saved with its config but without a tokenizer."""
    pytest.importorskip("transformers")
    from helpers import tiny_hf_lm

    directory = tmp_path_factory.mktemp("hf") / "llama"
    tiny_hf_lm("llama").save_pretrained(directory)
    return directory


def test_row_5_garbage_safetensors_are_named_corrupt_in_one_line(hf_directory, tmp_path, capsys):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(hf_directory), str(broken)], check=True)
    from helpers import tiny_tokenizer

    tiny_tokenizer(["ROMEO. But soft, what light through yonder window breaks"]).save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(os.urandom(1024))
    err = refused(["eval", "--hf", str(broken)], capsys)
    assert f"{broken}: corrupt weights" in err and err.count("\n") == 1, err


def test_row_14_a_missing_tokenizer_is_one_line(hf_directory, capsys):
    err = refused(["eval", "--hf", str(hf_directory)], capsys)
    assert "no tokenizer could be loaded" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("field", ["n_layer", "sequence_len", "n_kv_head"])
def test_row_11_a_meta_without_a_shape_field_is_named(run, tmp_path, field, capsys):
    import json

    sent = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(sent)], check=True)
    meta = sent / "meta_000004.json"
    data = json.loads(meta.read_text())
    del data["model_config"][field]
    meta.write_text(json.dumps(data))
    err = refused(["eval", str(sent), *EVAL], capsys)
    assert f"meta_000004.json: model_config has no {field!r}" in err and err.count("\n") == 1, err


def test_row_3_a_sequence_too_long_for_memory_is_refused_up_front(tmp_path, capsys):
    err = refused(["train", "--preset", "quick", "--steps", "5", "--seq-len", "100000000", "--out",
                   str(tmp_path / "r")], capsys)
    assert "--seq-len 100000000: the rotary tables alone (10 x sequence_len positions) would take" in err
    assert "GiB" in err and not (tmp_path / "r").exists()


def test_row_4_a_model_too_deep_for_memory_is_refused_up_front(tmp_path, capsys):
    err = refused(["train", "--preset", "quick", "--steps", "5", "--depth", "100000", "--out", str(tmp_path / "r")],
                  capsys)
    assert "--depth 100000: a model of" in err and "parameters needs about" in err and "GiB" in err


def test_the_footprint_of_the_presets_fits_a_small_machine():
    """The estimate is not so rough that it refuses what runs: the CPU presets need well under 1 GiB."""
    from models.training.config import PRESETS, footprint

    from models.nanochat import GPT

    for name in ("quick", "tiny"):
        need = footprint(PRESETS[name])
        actual = sum(p.numel() for p in GPT(PRESETS[name].model).parameters())
        assert need.total_bytes < 2**30 and abs(need.parameters / actual - 1) < 0.1, (name, need, actual)
