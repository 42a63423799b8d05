"""The benchmark suite: rows, baselines, accuracy, the roofline's work model, and the table (no timing asserted)."""

import json
import re

import pytest
import torch

import layersolve as ls
from models import nanochat, snlp
from models.tools import bench, cli, suite


def test_the_tiny_preset_writes_json_and_tables(tmp_path, capsys):
    assert cli.main(["bench", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"device", "torch", "triton", "threads", "preset", "dtype", "repeats", "rates", "shapes"} <= set(results)
    rates = results["rates"]
    assert rates["matmul_flops"] > 0 and rates["copy_bytes"] > 0
    shape = results["shapes"][0]
    prefill, decode = shape["prefill"], shape["decode"]
    names = [r["case"] for r in prefill]
    assert names[0] == "sequential" and "mHC sequential" in names and any(n.startswith("mHC HCN") for n in names)
    assert any("xF2" in n for n in names) and any(n.startswith("IDN n4 ") for n in names)
    for row in prefill + decode:
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["bound_s"] == pytest.approx(max(row["flops"] / rates["matmul_flops"],
                                                   row["bytes"] / rates["copy_bytes"]))
        assert "sequential" in row["case"] or ls.Result[row["result"]].ok
    for row in prefill:
        assert 0 <= row["top1_agreement"] <= 1 and row["max_abs_logit_diff"] >= 0
    assert {r["case"] for r in decode} >= {"decode b1 sequential", "decode b1 IDN n2 K1 warm"}
    assert decode[0]["token_agreement"] == 1.0
    assert prefill[0]["speedup"] == 1.0 and prefill[0]["baseline"] == "sequential"  # tiny: no compiled forward
    mhc = [r for r in prefill if r["case"].startswith("mHC")]
    assert mhc[0]["speedup"] == 1.0 and {r["baseline"] for r in mhc} == {"mHC sequential"}  # its own model's
    text = capsys.readouterr().out
    assert "prefill: L4 D64 T32" in text and "decode: L4 D64 T32" in text
    assert (tmp_path / "bench.md").read_text().startswith("# snlp bench --preset tiny")
    speculative = shape["speculative"]  # the first shape's speculative sweep, its table and figure
    assert {(r["plan"], r["draft_len"], r["temperature"]) for r in speculative} == {
        (plan, b, t) for t in (0.0, 1.0) for plan, b in (("sequential", None), *(
            (name, b) for name in ("IDN n2 K1 repeat", "IDN n2 K1 warm") for b in (1, 2)))}
    assert all(r["greedy_equal"] for r in speculative if r["temperature"] == 0)
    assert "speculative decoding: L4 D64, batch 1" in text and "speculative T1 IDN n2 K1 warm B2" in text
    assert (tmp_path / "speculation.png").stat().st_size > 1000
    cases = {r["case"] for r in prefill + decode + speculative}  # row 21: the real run's legend, as below
    legend = _assert_the_legend_explains_exactly_the_printed_columns(bench.table(results), cases)
    assert {"x fastest", "accept", "tok/rnd"} <= set(legend)
    assert "prefill: L4 D64 T32, random trained-like weights (x fastest over: sequential, mHC sequential)" in text


def test_models_trained_for_snlp_have_accuracy_beside_speed(tmp_path):
    """The cpu preset's trained rows: the demo pair of a training preset (here the quick one, cut to 4 steps),
    each plan's held-out PPL and top-1 beside its speedup, printed under the random-weight tables."""
    import dataclasses

    from models.training.config import PRESETS as TRAINING

    cfg = dataclasses.replace(TRAINING["quick"], steps=4, eval_every=2)
    preset = dataclasses.replace(suite.PRESETS["tiny"], trained="quick")
    trained = suite.trained_rows("quick", cfg, preset, torch.device("cpu"), tmp_path / "cache", lambda line: None)
    assert set(trained["models"]) == {"baseline", "idn-regularized"}
    plans = {"sequential", *(snlp_name for snlp_name in trained["models"]["baseline"]["speed"]["rows"])}
    for m in trained["models"].values():
        assert set(m["grid"]) <= plans and "IDN n3 K1 repeat" in m["grid"]
        assert all(cell["quality"]["ppl"] > 1 and 0 <= cell["top1_agreement"] <= 1 for cell in m["grid"].values())
    text = "\n".join(bench.trained_table(trained))
    row = next(line for line in text.splitlines() if line.startswith("IDN n3 K1 repeat "))
    cell, speed = trained["models"]["baseline"]["grid"]["IDN n3 K1 repeat"], trained["models"]["baseline"]["speed"]
    assert f"{cell['quality']['ppl']:.3f}" in row and f"{speed['rows']['IDN n3 K1 repeat']['speedup']:.2f}x" in row
    assert "trained for SNLP: `snlp demo --quick`'s baseline model" in text


def test_the_work_model_counts_each_evaluation():
    """Sequential: L block evaluations; a plan: the prefix, then K passes over the n_par tail (one more for the
    one-step guess). A block's FLOPs by hand for one tiny config."""
    cfg = nanochat.GPTConfig(sequence_len=32, vocab_size=64, n_layer=8, n_head=2, n_kv_head=1, n_embd=64)
    assert suite.evaluations(cfg, None) == 8
    k1, k2 = (suite.evaluations(cfg, snlp.Plan(n_par=4, iters=k)) for k in (1, 2))
    assert (k1, k2) == (8, 12)
    assert suite.evaluations(cfg, snlp.Plan(n_par=4, iters=1, init="one_step")) == 12
    tokens, context, hd = 10, 5.5, 32
    by_hand = (2 * tokens * 64 * (2 + 2 * 1) * hd + 2 * tokens * 2 * hd * 64  # q, k, v and the output projection
               + 2 * 2 * tokens * 64 * 256  # the MLP
               + 2 * 2 * tokens * 2 * hd * context)  # scores and the weighted values
    assert suite.block_flops(cfg, tokens, context) == by_hand
    rates = suite.Rates(matmul_flops=1e9, copy_bytes=1e9)
    one, two = (suite.roofline(cfg, snlp.Plan(n_par=4, iters=k), tokens, context, 4, rates) for k in (1, 2))
    head = 2 * tokens * 64 * cfg.padded_vocab_size
    assert two["flops"] - head == pytest.approx(1.5 * (one["flops"] - head))


@pytest.fixture(scope="module")
def tiny_model():
    model = nanochat.GPT(nanochat.GPTConfig(sequence_len=32, vocab_size=512, n_layer=4, n_head=1, n_kv_head=1,
                                            n_embd=64))
    model.init_weights(seed=0, output_std=0.02)
    return model.eval()


def test_rows_carry_the_solve_result_and_the_table_marks_failures(tiny_model):
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    plans = {"exact": snlp.Plan(n_par=4, iters=4),
             "diverges": snlp.Plan(n_par=4, jacobian=ls.Scaled(1e3), iters=3)}  # J~ = 1000 I blows the step up
    rows = bench.prefill_rows(tiny_model, idx, plans, warmup=0, repeats=1, progress=lambda line: None)
    by_case = {r["case"]: r for r in rows}
    assert by_case["exact"]["result"] == "CONVERGED" and by_case["diverges"]["result"] == "DIVERGED"
    assert by_case["exact"]["max_abs_logit_diff"] < 1e-4 and by_case["exact"]["top1_agreement"] == 1.0
    for row in rows:
        row.update(speedup=1.0, baseline="sequential", bound_s=1e-3)
        row.pop("plan")
    results = {"device": "cpu", "dtype": "float32", "threads": 1, "torch": "x", "repeats": 1,
               "rates": {"matmul_flops": 1e9, "copy_bytes": 1e9},
               "shapes": [{"shape": {"layers": 4, "width": 64, "tokens": 16}, "prefill": rows, "decode": rows}]}
    lines = {line.split()[0]: line for line in bench.table(results).splitlines() if line.strip()}
    assert lines["diverges"].endswith(f"{bench.FAILED_MARK} DIVERGED")
    assert lines["exact"].endswith(" CONVERGED") and bench.FAILED_MARK not in lines["exact"]
    assert lines["sequential"].endswith(" -")
    assert lines[bench.FAILED_MARK + ":"].startswith(f"{bench.FAILED_MARK}: the solve did not end ok")


@pytest.mark.parametrize("name", ["sequential", "sequential compiled"])
def test_a_plan_named_like_the_reference_is_refused(tiny_model, name):
    with pytest.raises(ValueError, match="are the sequential forwards' rows"):
        bench.prefill_rows(tiny_model, torch.zeros(1, 4, dtype=torch.long), {name: snlp.Plan(n_par=2)})


def test_the_speedups_are_over_the_fastest_sequential_way(tiny_model, monkeypatch):
    """With the compiled forward timed, the baseline is whichever sequential row is faster, named; every speedup
    (the sequential rows' own too) is its time over the row's, so the fastest sequential row is at 1.0x. The
    compiled row lifts dynamo's limit of 8 variants per function, past which a process that compiled other models
    before would time eager code under the compiled row's name, and compiles its shape statically, not as dynamo's
    dynamic graph for a function's second shape."""
    from models.nanochat.gpt import RECOMPILE_LIMIT

    compiles, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compiles.append(kwargs) or compile(*args, **kwargs))
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    plans = {"IDN n2 K1": snlp.Plan(n_par=2, iters=1)}
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default, restored on exit (not monkeypatch's delattr)
        speed = bench.speedups(tiny_model, idx, plans, warmup=0, repeats=3, progress=lambda line: None)
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    assert [kwargs["dynamic"] for kwargs in compiles] == [False]
    rows = speed["rows"]
    assert list(rows) == ["sequential", "sequential compiled", "IDN n2 K1"]
    base = min(("sequential", "sequential compiled"), key=lambda c: rows[c]["median_s"])
    assert speed["baseline_case"] == base and speed["baseline"].startswith(f"fastest sequential forward: {base} (")
    for case, row in rows.items():
        assert row["speedup"] == pytest.approx(rows[base]["median_s"] / row["median_s"])
    assert rows[base]["speedup"] == 1.0 and max(r["speedup"] for c, r in rows.items() if c != "IDN n2 K1") == 1.0
    eager = bench.speedups(tiny_model, idx, plans, warmup=0, repeats=1, progress=lambda line: None, compile=False)
    assert list(eager["rows"]) == ["sequential", "IDN n2 K1"] and eager["baseline_case"] == "sequential"
    assert "the compiled forward not timed" in eager["baseline"]


@pytest.mark.parametrize("layers", [2, 4, 6, 12, 24, 32])
def test_the_suite_plans_fit_the_model(layers):
    for plan in suite.prefill_plans(layers) + suite.decode_plans(layers):
        assert 1 <= plan.n_par <= layers and plan.n_par % plan.fuse == 0


def test_an_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.parametrize("graphed", ["all", "sequential"])
def test_graphed_decode_rows_and_the_fastest_baseline(tiny_model, graphed):
    """The graphed rows rerun the decode rows ("all", or the sequential one: the CPU preset's second sequential
    way) with compiled blocks and static caches: same tokens as eager decoding (K = n_par here), a compile time
    apart; every speedup is over the faster of eager and graphed sequential decoding."""
    rates = suite.Rates(matmul_flops=1e9, copy_bytes=1e9)
    plan = snlp.Plan(n_par=2, iters=2)
    rows = suite.decode_rows(tiny_model, 1, 2, {"IDN n2 K2": plan}, warmup=0, repeats=1, rates=rates,
                             progress=lambda line: None, graphed=graphed)
    cases = ["decode b1 sequential", "decode b1 IDN n2 K2", "decode b1 sequential graphed",
             *(["decode b1 IDN n2 K2 graphed"] if graphed == "all" else [])]
    assert [r["case"] for r in rows] == cases
    assert all(r["token_agreement"] == 1.0 for r in rows)
    assert all(r["compile_s"] > 0 for r in rows[2:]) and all("compile_s" not in r for r in rows[:2])
    base = min((rows[0], rows[2]), key=lambda r: r["median_s"])
    assert all(r["baseline"] == base["case"] and r["speedup"] == base["median_s"] / r["median_s"] for r in rows)


def test_compiled_blocks_rows_time_the_forward_and_the_plans_on_compiled_blocks(tiny_model):
    """The CPU preset's compiled-blocks rows: the sequential forward and each plan on a compiled copy, the first
    call (compilation) timed apart, the mode named."""
    idx = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    preset = suite.Preset(shapes=(), dtype=torch.float32, head_dim=64, warmup=0, repeats=1)
    rows = suite.compiled_blocks_rows(tiny_model, idx, {"IDN n2 K1": snlp.Plan(n_par=2, iters=1)}, preset,
                                      progress=lambda line: None)
    assert [r["case"] for r in rows] == ["sequential compiled blocks", "IDN n2 K1 compiled blocks"]
    assert all(r["compile_s"] > 0 and r["mode"] == "compile_blocks(default)" for r in rows)


def test_interleaved_rounds_alternate_direction():
    """One call of each in turn, repeat after repeat, each round the reverse of the one before; warm-up first."""
    made = []
    calls = {name: (lambda name=name: made.append(name)) for name in "abc"}
    times = bench.interleaved(calls, timed=lambda call: call() or len(made), warmup=1, repeats=3)
    assert "".join(made) == "abc" + "abc" + "cba" + "abc"
    assert times == {"a": [4, 9, 10], "b": [5, 8, 11], "c": [6, 7, 12]}


def test_decode_rows_interleave_their_repeats(tiny_model, monkeypatch):
    """One decoding of each row in turn, repeat after repeat (a drift in the machine's speed falls on every row
    alike), the rounds alternating direction, then one more of each for its tokens."""
    made = []

    class Recording(suite.Decoder):
        def __init__(self, model, plan=None, **kwargs):
            made.append("sequential" if plan is None else "IDN")
            super().__init__(model, plan, **kwargs)

    monkeypatch.setattr(suite, "Decoder", Recording)
    rates = suite.Rates(matmul_flops=1e9, copy_bytes=1e9)
    suite.decode_rows(tiny_model, 1, 2, {"IDN n2 K1": snlp.Plan(n_par=2)}, warmup=0, repeats=3, rates=rates,
                      progress=lambda line: None)
    assert made == ["sequential", "IDN", "IDN", "sequential", "sequential", "IDN", "sequential", "IDN"]


def _timing(ms: float) -> dict:
    return {"median_s": ms / 1e3, "min_s": ms / 1e3, "max_s": ms / 1e3}


def _hand_made_results(compiled: bool, speculative: bool) -> dict:
    """Suite results made by hand (no benchmark): a prefill and a decode table, with the compiled baselines as on
    the GPU preset (`sequential compiled` and its column, compiled-blocks rows, graphed decoding and its column)
    or without them as on the CPU, and with the speculative table or not."""
    prefill = [{"case": "sequential", **_timing(2), "top1_agreement": 1.0, "max_abs_logit_diff": 0.0}]
    if compiled:
        prefill.append({"case": "sequential compiled", **_timing(1), "compile_s": 3.0})
    prefill += [{"case": "IDN n2 K1 repeat", **_timing(1.5), "top1_agreement": 0.9, "max_abs_logit_diff": 1e-3,
                 "result": "COMPLETED"},
                *([{"case": "IDN n2 K1 repeat compiled blocks", **_timing(1), "top1_agreement": 0.9,
                    "max_abs_logit_diff": 1e-3, "result": "COMPLETED", "compile_s": 3.0}] if compiled else []),
                {"case": "mHC sequential", **_timing(3), "top1_agreement": 1.0, "max_abs_logit_diff": 0.0},
                {"case": "mHC HCN n2 K1 repeat", **_timing(4), "top1_agreement": 1.0, "max_abs_logit_diff": 1e-4,
                 "result": "COMPLETED"}]
    for row in prefill:
        row.update(speedup=1.0, baseline="mHC sequential" if row["case"].startswith("mHC") else "sequential")
    decode = [{"case": f"decode b1 {name}{suffix}", **_timing(2), "token_agreement": 1.0, "speedup": 1.0,
               "baseline": "decode b1 sequential",
               **({"result": "COMPLETED"} if name != "sequential" else {})}
              for suffix in ("", " graphed")[:1 + compiled] for name in ("sequential", "IDN n2 K1 warm")]
    for row in prefill + decode:
        row["bound_s"] = 1e-4
    shape = {"shape": {"layers": 4, "width": 64, "tokens": 32}, "prefill": prefill, "decode": decode}
    if speculative:
        shape["speculative"] = [
            {"case": f"speculative T{t:g} {plan}" + ("" if b is None else f" B{b}"), "plan": plan, "draft_len": b,
             "temperature": t, **_timing(2), "tokens_per_s": 500.0, "speedup": 1.0,
             "baseline": f"speculative T{t:g} sequential",
             "acceptance_rate": None if b is None else 0.5, "mean_accepted_length": None if b is None else 1.5,
             "greedy_equal": True if t == 0 else None}
            for t in (0.0, 1.0) for plan, b in (("sequential", None), *[("sequential graphed", None)][:compiled],
                                                 ("IDN n2 K1 warm", 2))]
    return {"device": "cpu", "dtype": "float32", "threads": 1, "torch": "x", "repeats": 1,
            "rates": {"matmul_flops": 1e9, "copy_bytes": 1e9}, "shapes": [shape]}


def _headers_and_legend(text: str, cases: set[str]) -> tuple[list[str], dict[str, str]]:
    """The table's header lines, and its legend: the entries `key: explanation` (continuation lines indented) among
    the lines that are neither the first (the machine), a table's title, its header nor one of its rows (a case)."""
    headers, legend, key = [], {}, None
    for line in text.splitlines()[1:]:
        if not line.strip() or re.match(r"(prefill|decode): L\d|speculative decoding: L\d", line):
            continue
        if line.startswith("case "):
            headers.append(line)
        elif any(line.startswith(case + " ") for case in cases):
            continue
        elif line[0].isspace() and key is not None:
            legend[key] += " " + line.strip()
        else:
            key, _, explanation = line.partition(": ")
            legend[key] = explanation
    return headers, legend


def _assert_the_legend_explains_exactly_the_printed_columns(text: str, cases: set[str]) -> dict[str, str]:
    headers, legend = _headers_and_legend(text, cases)
    assert headers and legend

    def token(key):  # a header as a whole: "x eager" is not in "x eager_", "ms" is not in "ms/tok"
        return re.compile(rf"(?<!\S){re.escape(key)}(?!\S)")

    for header in headers:  # every printed header text is some legend entry's key
        rest = header
        for key in sorted(legend, key=len, reverse=True):
            rest = token(key).sub(" ", rest)
        assert not rest.strip(), f"columns without a legend entry: {rest.split()} in {header!r}"
    for key in legend:  # and every legend entry names a printed column
        assert any(token(key).search(header) for header in headers), f"legend entry {key!r} names no printed column"
        assert legend[key].strip(), f"legend entry {key!r} explains nothing"
    return legend


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_row_21_the_legend_explains_exactly_the_printed_columns(compiled, speculative):
    """Issue 26 row 21: the legend under `snlp bench`'s tables explains every column printed (the speculative
    table's too) and no column that is not printed (no speculation columns without the speculative table)."""
    results = _hand_made_results(compiled, speculative)
    text = bench.table(results)
    cases = {row["case"] for shape in results["shapes"] for kind in ("prefill", "decode", "speculative")
             for row in shape.get(kind, [])}
    legend = _assert_the_legend_explains_exactly_the_printed_columns(text, cases)
    assert "x fastest" in legend and "x eager" not in legend
    for note in ("`sequential compiled`", "`compiled blocks`", "`graphed`"):  # rows named only on the GPU preset
        assert (note in legend["case"]) is compiled
    spec = {"accept", "tok/rnd", "tok/s", "= greedy"}
    assert (spec <= set(legend)) is speculative and (spec & set(legend) == set()) is not speculative
    explained = " ".join(legend.values())
    if speculative:  # the speculative rows' names: the temperature, the draft length and the drafting plan's guess
        assert all(part in legend["case"] for part in ("T<t>", "B<B>", "warm", "temperature", "draft length"))
    else:
        assert "draft" not in explained and "temperature" not in explained
