"""Bad input, round two (issue 26): each test is one row of the issue's tables, and failed on the code before it
(656d83f). A bad flag or file gets one line naming it and exit status 2, before any work; a flag that does nothing
is refused; a closed pipe ends the command quietly."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.inference.decode import distribution
from models.tools import cli, demo, staged, suite

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


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every `snlp` subcommand's parser, from the real parser: a new subcommand or flag is covered at once."""
    return cli._parser().commands


def with_run(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """The subcommand with RUN for each of its positional arguments (a run directory, the only kind it takes)."""
    return [command, *("RUN" for action in parser._actions if not action.option_strings)]


# each way of running a subcommand that has another path to its --out check: the toy and quick demos, the
# training-step bench, a Hugging Face directory for eval and plan, a resumed run, the staged bench
MODES = [["demo", "--toy"], ["demo", "--quick"], ["bench", "--preset", "tiny"], ["bench", "--train"],
         ["eval", "--hf", "RUN"], ["plan", "--hf", "RUN"], ["train", "--resume"],
         ["generate", "RUN", "--stages", "2", "--bench"]]
WITH_OUT = [with_run(name, p) for name, p in commands().items() if "--out" in p._option_string_actions]


def test_every_subcommand_with_an_out_is_checked():
    assert {argv[0] for argv in WITH_OUT} >= {"demo", "train", "eval", "study", "plan", "generate", "bench"}


@pytest.mark.parametrize("command", WITH_OUT + MODES, ids=" ".join)
def test_row_7_an_unwritable_out_is_refused_before_any_work(run, command, capsys, monkeypatch):
    """Every subcommand with an --out (found in the parser), in each of its modes: refused in one line, exit 2,
    before any of its work starts (each piece of work fails the test if it is called)."""
    def work(*_, **__):
        raise AssertionError("the command started its work before checking --out")

    for owner, name in [(cli, "_load_run"), (suite, "run"), (cli, "train_config"), (cli, "check_fits"),
                        (cli, "resumed_flags"), (cli, "_bench_train"), (demo, "run_toy"), (demo, "run_models"),
                        (staged, "run")]:
        monkeypatch.setattr(owner, name, work)
    argv = [str(run) if word == "RUN" else word for word in command] + ["--out", "/dev/null/x"]
    err = refused(argv, capsys)
    assert "--out /dev/null/x: /dev/null is a file, not a directory" in err and err.count("\n") == 1, err


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
    (["bench", "--preset", "tiny", "--tokens", "5"], "--tokens does nothing without a run or --hf"),
    (["bench", "--preset", "tiny", "--repeats", "3"], "--repeats does nothing without a run, --hf or --train"),
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


# -- acceptance: no traceback from any numeric flag ------------------------------------------------------------------

def numeric(action: argparse.Action) -> bool:
    """Whether an option takes numbers: its type turns "1" (or "0", "0.5", "3%") into an int or a float. Found by
    its type, not its name, so that a new numeric flag, even a bare `type=int`, enters the table below."""
    if not action.option_strings or action.type is None:
        return False
    for text in ("1", "0", "0.5", "3%"):
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return False


NUMERIC = [(name, action.option_strings[-1], with_run(name, p)) for name, p in commands().items()
           for action in p._actions if numeric(action)]

# What each numeric flag takes, decided flag by flag; every other numeric flag takes integers >= 1 only. A new
# numeric flag is held to that until it is named here.
ZERO = {  # 0 means something ("none", "at the end only", "greedy", block 0, a seed)
    ("demo", "--eval-every"), ("demo", "--seed"), ("demo", "--reg-lambda"),
    ("train", "--eval-every"), ("train", "--seed"), ("train", "--save-every"), ("train", "--reg-stride"),
    ("train", "--reg-lambda"), ("train", "--reg-warmup"),
    ("eval", "--step"), ("eval", "--start"), ("eval", "--iters"), ("eval", "--ar-prompts"),
    ("plan", "--step"), ("plan", "--budget"), ("plan", "--per-length"),
    ("generate", "--temperature"), ("generate", "--top-k"), ("generate", "--start"), ("generate", "--seed"),
    ("bench", "--start"),
    ("adapt", "--start"), ("adapt", "--lora-rank"), ("adapt", "--seed"), ("adapt", "--kl-parallel"),
    ("adapt", "--kl-sequential"), ("adapt", "--gap")}
FRACTIONAL = {("demo", "--reg-lambda"), ("train", "--reg-lambda"), ("train", "--reg-warmup"), ("plan", "--budget"),
              ("generate", "--temperature"), ("adapt", "--lr"), ("adapt", "--kl-parallel"), ("adapt", "--kl-sequential"),
              ("adapt", "--gap")}
AT_MOST_ONE = {("train", "--reg-warmup")}  # a fraction of the training
# refused by every numeric flag: not a number, not finite, negative, an overflow
BAD = ["abc", "", " ", "nan", "-nan", "inf", "-inf", "1e309", "-1e309", "-1", "-0.5", "1,5"]
BAD_INTEGERS = ["0.5", "1.0", "1e3", "0x10", str(2**63), "9" * 30]  # an integer flag's own
EXTRA = {("generate", "--temperature"): ["5e-324", "1e-7"]}  # 1 / T overflows (NaN probabilities), or is greedy


def bad_values(command: str, flag: str) -> list[str]:
    key = (command, flag)
    return (BAD + ([] if key in ZERO else ["0"]) + ([] if key in FRACTIONAL else BAD_INTEGERS)
            + (["1.5"] if key in AT_MOST_ONE else []) + EXTRA.get(key, []))


def good_values(command: str, flag: str) -> list[str]:
    key = (command, flag)
    return (["1"] + ([] if key in AT_MOST_ONE else ["7"]) + (["0"] if key in ZERO else [])
            + (["0.5", "1e-6"] if key in FRACTIONAL else [str(2**63 - 1)]))


def test_the_table_names_real_flags():
    found = {(command, flag) for command, flag, _ in NUMERIC}
    assert len(found) >= 50 and ZERO | FRACTIONAL | AT_MOST_ONE | set(EXTRA) <= found, sorted(
        (ZERO | FRACTIONAL | AT_MOST_ONE | set(EXTRA)) - found)


@pytest.mark.parametrize("command, flag, prefix", NUMERIC, ids=[f"{c} {f}" for c, f, _ in NUMERIC])
def test_every_numeric_flag_refuses_bad_values_at_parse_time(command, flag, prefix, capsys, monkeypatch):
    """Issue 26, acceptance: each bad value of each numeric flag of each subcommand stops argparse, with status 2
    and one error line naming the flag, before any work; never a traceback. The values the flag does take parse."""
    def work(args):
        raise AssertionError(f"snlp {command} {flag} {getattr(args, flag[2:].replace('-', '_'))!r}: parsed, and the "
                             "command started")

    monkeypatch.setattr(cli, f"_{command}", work)
    for value in bad_values(command, flag):
        try:
            cli.main([*prefix, f"{flag}={value}"])
        except SystemExit as stop:
            code = stop.code
        except AssertionError as ran:
            code = str(ran)
        else:
            code = None
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and "Traceback" not in err, f"{flag}={value!r}: {code}\n{err}"
        assert len(errors) == 1 and errors[0].startswith(f"snlp {command}: error: argument {flag}: "), (value, err)
    for value in good_values(command, flag):
        cli._parser().parse_args([*prefix, f"{flag}={value}"])


@pytest.mark.parametrize("argv", [
    ["generate", "RUN", "--max-new", "2", "--temperature", "1e-6"],
    ["generate", "RUN", "--max-new", "2", "--temperature", "5e-324"],  # was a traceback: 1 / T overflows
    ["generate", "RUN", "--max-new", "2", "--seed", str(2**64)],
    ["generate", "RUN", "--max-new", "2", "--top-k", "100000"],
    ["generate", "RUN", "--max-new", "2", "--seed", str(2**63 - 1)],
    ["generate", "RUN", "--max-new", "100000"],
    ["generate", "RUN", "--max-new", "2", "--n-par", "1", "--iters", "1000"],
    ["generate", "RUN", "--max-new", "4", "--speculative", "--draft-len", "1000", "--temperature", "0"],
    ["generate", "RUN", "--max-new", "2", "--stages", "2", "--timeout", str(2**63 - 1)],
    ["eval", "RUN", *EVAL, "--context", "1"],
    ["eval", "RUN", *EVAL, "--batch-size", "100000"],
    ["eval", "RUN", *EVAL, "--iters", "0", "--step", "0"],
    ["eval", "RUN", *EVAL, "--fuse", "3"],
    ["plan", "RUN", "--max-tokens", "256", "--repeats", "1", "--lengths", "99"],
    ["study", "RUN", "--max-tokens", "1"],
])
def test_values_the_parser_takes_do_not_traceback(run, argv, capsys):
    """A sample of the values at the edges of what the flags take: the command runs (0) or refuses them in one line
    (2), never with a traceback."""
    try:
        code = cli.main([str(run) if word == "RUN" else word for word in argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    messages = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]  # argparse's usage aside
    assert code == 0 or len(messages) == 1, err


# -- row 25 ----------------------------------------------------------------------------------------------------------

def option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The lines `--help` prints for one flag, whitespace collapsed."""
    return " ".join(parser._get_formatter()._format_action(action).split())


def test_row_25_every_help_shows_every_default(capsys):
    """Every flag of every subcommand with a default (not None, not a switch's False) shows it in `--help`, once:
    "(default: X)", or the help's own "(default X ...)"; no flag shows "(default: None)"."""
    shown = 0
    for name, parser in commands().items():
        for action in parser._actions:
            if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
                continue
            text = option_help(parser, action)
            value = action.default
            value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)  # as typed
            stated = "(default" in (action.help or "")  # the help says its default in its own words
            assert text.count("(default") == 1, f"snlp {name} {action.option_strings}: {text}"
            assert stated or f"(default: {value})" in text, f"snlp {name}: {text}"
            shown += 1
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert "(default: None)" not in out and "(default: False)" not in out and "SUPPRESS" not in out, out
    assert shown >= 30


def test_row_25_generate_help_says_its_sampling_defaults_differ_from_the_library(capsys):
    import inspect

    from models.inference.decode import generate

    assert inspect.signature(generate).parameters["temperature"].default == 0.0  # the library is greedy
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.8)" in out and "(default: 50)" in out
    assert "models.inference.decode.generate is greedy by default (temperature=0.0)" in out, out
    api = " ".join((ROOT / "docs" / "api.md").read_text().split())
    assert "`snlp generate` samples (`--temperature 0.8`, `--top-k 50`)" in api


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_row_25_the_readme_layout_names_every_package_and_notebook():
    layout = readme_section("Layout")
    packages = [f"models/{p.parent.name}/" for p in sorted((ROOT / "models").glob("*/__init__.py"))]
    notebooks = [p.stem for p in sorted((ROOT / "notebooks").glob("[0-9]*.py"))]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    top = sorted({f"{line.split('/')[0]}/" for line in files if "/" in line and not line.startswith(".")})
    missing = [name for name in packages + notebooks + top if name not in layout]
    assert len(packages) >= 5 and len(notebooks) >= 5 and not missing, missing


def test_row_25_the_readmes_choices_are_the_parsers():
    """Every `--flag {a,b,...}` of the README and the docs lists the choices the parser has for that flag."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    choices = {}
    for parser in commands().values():
        for action in parser._actions:
            if action.choices is not None and action.option_strings:
                choices.setdefault(action.option_strings[-1], set()).add(tuple(action.choices))
    found = []
    for page in pages:
        for flag, listed in re.findall(r"(--[\w-]+)\s*\{([^}]*)\}", page.read_text()):
            found.append(flag)
            assert tuple(listed.split(",")) in choices.get(flag, ()), (page.name, flag, listed, choices.get(flag))
    assert {"--reg", "--reg-mode"} <= set(found)
