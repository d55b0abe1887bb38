"""fastner bench: the command's JSON structure (not its speed), the timing statistics on a fake
clock, the baselines it builds, and the whole-tagger row code on a tiny stand-in model.
Why one ~700-line file: one command (fastner.bench), its groups' rows tested through the same
fake-clock fixtures."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastner.bench import cli, tagger_rows, timing
from fastner.bench.gemm_rows import rnn_flops
from fastner.bench.report import write_json_atomic
from fastner.bench.rows import BACKEND_ENV, Context, Row, forced_reference, on_reference
from fastner.bench.timing import Settings, measure_interleaved, summarize
from fastner.bench.workloads import (LENGTHS, TAGGER_RNN, conll_like_lengths, crf_batch, make_plan,
                                     sentence_batches)

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("gemm", "crf", "rnn", "precision", "tagger")
STAT_KEYS = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "samples", "calls_per_sample")


# ---- the command, end to end --------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "result.json"
    command = [sys.executable, "-m", "fastner.bench", "--quick", "--json", str(json_path),
               "--threads", "1", "--clock", "thread"]
    try:
        import matplotlib  # noqa: F401
        command += ["--plot", str(out / "plots")]
    except ImportError:
        pass
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(BACKEND_ENV, None)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return done, json_path, out


def test_quick_run_succeeds_and_writes_json(quick_run):
    done, json_path, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done in" in done.stdout
    data = json.loads(json_path.read_text())
    assert data["schema_version"] == 1 and data["tool"] == "fastner.bench"
    assert data["quick"] is True
    assert not [p for p in json_path.parent.iterdir() if p.name.startswith(".fastner-bench-")]


def test_quick_run_environment(quick_run):
    data = json.loads(quick_run[1].read_text())
    import fastner

    assert data["fastner_version"] == fastner.__version__
    assert data["torch_version"] == torch.__version__
    assert data["threads"] == 1
    commit = data["git_commit"]
    assert commit is None or (isinstance(commit, str) and len(commit) == 40)
    assert data["arguments"][:3] == ["--quick", "--json", str(quick_run[1])]
    assert data["devices"][0]["device"] == "cpu" and data["devices"][0]["name"]
    assert set(data["fastner_backend"]) >= {"cpu", "version", "torch"}
    assert {"warmup", "min_samples", "max_samples", "budget_s", "plan"} <= set(data["settings"])
    assert data["settings"]["thread_cpu_clock"] is True  # --clock thread


def test_quick_run_groups_ran_or_say_why_not(quick_run):
    data = json.loads(quick_run[1].read_text())
    for device in [d["device"] for d in data["devices"]]:
        records = {g["group"]: g for g in data["groups"] if g["device"] == device}
        assert set(records) == set(GROUPS)
        for record in records.values():
            assert record["status"] in ("ok", "skipped"), record
            if record["status"] == "skipped":
                assert isinstance(record["skipped"], str) and record["skipped"]
            else:
                assert any(r["group"] == record["group"] and r["device"] == device for r in data["rows"])
    # The RNN layers and the GEMM rate exist at every stage of the project.
    assert records["rnn"]["status"] == "ok" and records["gemm"]["status"] == "ok"


def test_quick_run_rows_have_medians_spread_and_ratios(quick_run):
    data = json.loads(quick_run[1].read_text())
    assert data["rows"]
    for row in data["rows"]:
        assert {"device", "group", "op", "shape", "sweeps", "check", "results"} <= set(row)
        assert "error" not in row, row
        assert row["check"] == "ok" or row["check"] == "n/a", row["check"]
        baselines = {r["impl"] for r in row["results"] if r["role"] == "baseline"}
        assert baselines
        for result in row["results"]:
            assert set(STAT_KEYS) <= set(result)
            spread = [result[k] for k in ("min_ms", "q1_ms", "median_ms", "q3_ms", "max_ms")]
            assert 0 < spread[0] and spread == sorted(spread)
            assert result["samples"] >= data["settings"]["min_samples"]
            if result["role"] == "fastner":
                assert set(result["speedup"]) == baselines
                for impl, ratio in result["speedup"].items():
                    base = next(r for r in row["results"] if r["impl"] == impl)
                    assert math.isclose(ratio, base["median_ms"] / result["median_ms"], rel_tol=1e-9)


def test_quick_run_rnn_rows_cover_cells_modes_and_floor(quick_run):
    data = json.loads(quick_run[1].read_text())
    quantized = [r for r in data["rows"] if r["group"] == "precision"]
    rnn = [r for r in data["rows"] if r["group"] == "rnn"]
    tagger_shape = [r for r in rnn if (r["shape"]["B"], r["shape"]["T"], r["shape"]["H"]) == (32, 40, 200)]
    assert {(r["cell"], r["mode"]) for r in tagger_shape} == {
        (c, m) for c in ("lstm", "gru", "rnn") for m in ("inference", "training")}
    for row in tagger_shape:
        bf16 = {"fastner.bf16.padded", "fastner.bf16.lengths"} if row["mode"] == "inference" else set()
        assert {r["impl"] for r in row["results"]} == {
            "torch.padded", "torch.packed", "fastner.padded", "fastner.lengths", "fastner.packed"} | bf16
        assert row["check"] == "ok", row["check"]
        # Which float32 GEMM kernel ran, with both kernels' measured rates; which bf16 one ran.
        assert all("GFLOP/s" in line or line.startswith("bf16 ") for line in row["cpu_gemm_choices"])
    gemm = [r for r in data["rows"] if r["group"] == "gemm" and r["op"] == "mm_fp32"]
    assert len(gemm) == 1 and gemm[0]["gflops_per_s"] > 0
    # int8 / bf16 rows at the tagger shape: every cell, fastner int8 timed, the peers torch has.
    assert {r["cell"] for r in quantized} == {"lstm", "gru", "rnn"}
    int8_gemm = [r for r in data["rows"] if r["op"] == "linear_dynamic_int8"]
    assert len(int8_gemm) == 1 and int8_gemm[0]["gops_per_s"] > 0
    for row in quantized:
        assert "error" not in row and row["check"] == "ok", row
        impls = {r["impl"] for r in row["results"]}
        assert {"fastner.int8.lengths", "fastner.int8.packed", "torch.packed"} <= impls
        if row["cell"] != "rnn":
            assert {"torch.int8.padded", "torch.int8.packed"} <= impls
        assert ("fastner.bf16.lengths" in impls) != ("fastner.bf16" in row)  # timed, or why not
        assert all(r["x_int8_floor"] > 0 for r in row["results"] if ".int8." in r["impl"] + ".")
        # the floor's GEMM timed in the row's own rounds: the rate it gives, and the floor from it
        assert row["int8_gemm_gops_per_s"] > 0
        assert math.isclose(row["int8_floor_ms"], row["flops"] / (row["int8_gemm_gops_per_s"] * 1e9) * 1e3,
                            rel_tol=1e-9)
        assert 0 < row["relative_error_vs_fp32"]["fastner.int8.lengths"] < 0.05
    for row in rnn:
        assert row["flops"] > 0 and row["floor_ms"] > 0
        floor_ms = row["flops"] / (gemm[0]["gflops_per_s"] * 1e9) * 1e3
        assert math.isclose(row["floor_ms"], floor_ms, rel_tol=1e-9)
        assert all(r["x_floor"] > 0 for r in row["results"])
    for axis in ("B", "H", "T"):
        assert len({r["shape"][axis] for r in rnn if axis in r["sweeps"]}) >= 2


def test_quick_run_plots(quick_run):
    done, _, out = quick_run
    plots = out / "plots"
    if not plots.exists():
        pytest.skip("matplotlib is not installed")
    names = {p.name for p in plots.iterdir()}
    assert {"rnn_speedup_vs_batch_cpu.png", "rnn_speedup_vs_seqlen_cpu.png",
            "rnn_speedup_vs_hidden_cpu.png"} <= names
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


# ---- argument errors ----------------------------------------------------------------------

def test_unknown_group_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--only", "crf,bogus"])
    assert exit_info.value.code == 2
    assert "--only" in capsys.readouterr().err


@pytest.mark.parametrize("threads", [[], ["--threads", "2"]])
def test_thread_clock_needs_one_thread(capsys, threads):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--clock", "thread", *threads])
    assert exit_info.value.code == 2
    assert "--clock thread needs --threads 1" in capsys.readouterr().err


def test_clock_for_picks_the_thread_clock_only_when_asked():
    assert isinstance(timing.clock_for(torch.device("cpu")), timing.WallClock)
    assert isinstance(timing.clock_for(torch.device("cpu"), thread_cpu=True), timing.ThreadCpuClock)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


# ---- timing statistics on a fake clock ----------------------------------------------------

class FakeClock:
    """Each call of `name` 'takes' durations[name] seconds; records what ran, in order."""

    def __init__(self, durations):
        self.durations = durations
        self.calls = []

    def time(self, fn, number=1):
        for _ in range(number):
            self.calls.append(fn())
        return self.durations[self.calls[-1]] * number


def _calls(*names):
    return {name: (lambda name=name: name) for name in names}


def test_summarize_median_quartiles_extremes():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    got = (stats.median, stats.q1, stats.q3, stats.min, stats.max, stats.samples)
    assert got == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    even = summarize([4.0, 1.0, 2.0, 3.0])  # linear interpolation, as numpy.quantile
    assert (even.median, even.q1, even.q3) == (2.5, 1.75, 3.25)
    assert summarize([7.0]).median == 7.0
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_measure_interleaves_rotates_and_skips_warmup():
    clock = FakeClock({"a": 0.010, "b": 0.020})
    order = []
    settings = Settings(warmup=3, min_samples=4, max_samples=4, budget_s=100.0, min_sample_s=0.0)
    stats = measure_interleaved(_calls("a", "b"), clock, settings, order_log=order)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rounds start with each in turn
    assert clock.calls[:6] == ["a", "a", "a", "b", "b", "b"]  # warm-up, not in the samples
    assert stats["a"].samples == 4 and stats["b"].samples == 4
    assert stats["a"].median == pytest.approx(0.010) and stats["b"].median == pytest.approx(0.020)


def test_measure_stops_on_budget_but_not_before_min_samples():
    clock = FakeClock({"a": 0.5, "b": 0.5})
    settings = Settings(warmup=1, min_samples=3, max_samples=1000, budget_s=0.1, min_sample_s=0.0)
    stats = measure_interleaved(_calls("a", "b"), clock, settings)
    assert stats["a"].samples == 3  # the budget was spent after one round; min_samples rules
    clock = FakeClock({"a": 0.001, "b": 0.001})
    settings = Settings(warmup=1, min_samples=2, max_samples=1000, budget_s=0.010, min_sample_s=0.0)
    stats = measure_interleaved(_calls("a", "b"), clock, settings)
    assert stats["a"].samples == 10  # 2 x 0.010 s of budget, 0.002 s a round


def test_measure_batches_short_calls_into_samples():
    clock = FakeClock({"fast": 1e-5, "slow": 1e-2})
    settings = Settings(warmup=1, min_samples=2, max_samples=2, budget_s=0.0, min_sample_s=1e-3)
    stats = measure_interleaved(_calls("fast", "slow"), clock, settings)
    assert stats["fast"].calls_per_sample == 100 and stats["slow"].calls_per_sample == 1
    assert stats["fast"].median == pytest.approx(1e-5)  # reported per call


def test_cuda_event_clock_drains_the_queue_then_times_with_events(monkeypatch):
    from fastner.bench.timing import CudaEventClock

    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = "start" if not any(e.startswith("new") for e in log) else "end"
            log.append(f"new {self.name}")

        def record(self):
            log.append(f"record {self.name}")

        def synchronize(self):
            log.append(f"wait {self.name}")

        def elapsed_time(self, end):
            return 6.0  # milliseconds, as CUDA reports them

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
    seconds = CudaEventClock(torch.device("cuda", 0)).time(lambda: log.append("call"), number=2)
    assert seconds == pytest.approx(6e-3)
    assert log == ["synchronize", "new start", "new end", "record start", "call", "call",
                   "record end", "wait end"]
    # On CUDA each sample is one synchronized call: the latency a caller sees.
    ctx = Context(torch.device("cuda", 0), make_plan(True), Settings(min_sample_s=1e-3), emit=print)
    assert isinstance(ctx.clock, CudaEventClock) and ctx.settings.min_sample_s == 0.0


def test_compare_gives_speedups_over_each_baseline():
    settings = Settings(warmup=1, min_samples=3, max_samples=3, min_sample_s=0.0)
    ctx = Context(torch.device("cpu"), make_plan(True), settings, emit=lambda row: None)
    ctx.clock = FakeClock({"fast": 0.001, "base": 0.010, "ref": 0.004})
    row = ctx.compare(Row("cpu", "x", "op", {}), _calls("fast", "base", "ref"), baselines=["base", "ref"])
    fast = row.result("fast")
    assert fast.role == "fastner" and row.result("base").role == "baseline"
    assert fast.speedup == {"base": pytest.approx(10.0), "ref": pytest.approx(4.0)}
    assert row.result("base").speedup == {}


def test_compare_times_alongside_calls_in_the_same_rounds_apart_from_the_results():
    # The int8 rows' floor: its GEMM runs in each round of the row, so a host whose speed
    # drifts between groups cannot move the ratio; it is no implementation of the row.
    settings = Settings(warmup=1, min_samples=4, max_samples=4, min_sample_s=0.0)
    ctx = Context(torch.device("cpu"), make_plan(True), settings, emit=lambda row: None)
    ctx.clock = FakeClock({"fast": 0.001, "base": 0.010, "gemm": 0.005})
    row = ctx.compare(Row("cpu", "x", "op", {}), _calls("fast", "base"), baselines=["base"],
                      alongside=_calls("gemm"))
    assert [r.impl for r in row.results] == ["fast", "base"]
    assert row.result("fast").speedup == {"base": pytest.approx(10.0)}
    assert row.alongside["gemm"].median == pytest.approx(0.005) and row.alongside["gemm"].samples == 4
    rounds = ctx.clock.calls[3:]  # after one warm-up call each
    assert [rounds[i:i + 3].count("gemm") for i in range(0, 12, 3)] == [1, 1, 1, 1]
    assert "alongside" not in row.as_dict()


def test_forced_reference_sets_and_restores_the_variable(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert on_reference(lambda: os.environ.get(BACKEND_ENV))() == "reference"
    assert BACKEND_ENV not in os.environ
    monkeypatch.setenv(BACKEND_ENV, "fused")
    with forced_reference():
        assert os.environ[BACKEND_ENV] == "reference"
    assert os.environ[BACKEND_ENV] == "fused"


# ---- pieces ---------------------------------------------------------------------------------

def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError):  # NaN is not JSON: the old file stays whole
        write_json_atomic(str(path), {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_conll_like_lengths():
    lengths = conll_like_lengths(256, 40, seed=3)
    assert lengths.dtype == torch.long and lengths.shape == (256,)
    assert int(lengths.min()) >= 1 and int(lengths.max()) == 40
    assert torch.equal(lengths, conll_like_lengths(256, 40, seed=3))
    many = torch.cat(sentence_batches(200, 32, seed=5))
    assert 12.0 < float(many.float().mean()) < 17.0 and int(many.max()) <= 110


@pytest.mark.parametrize("kind", sorted(LENGTHS))
def test_crf_batch_is_seeded_and_consistent(kind):
    inputs = crf_batch(5, 7, 3, seed=11, lengths=kind)
    assert inputs.emissions.shape == (5, 7, 3) and inputs.emissions.dtype == torch.float32
    assert inputs.tags.shape == (5, 7) and int(inputs.tags.min()) >= 0 and int(inputs.tags.max()) < 3
    assert int(inputs.lengths.max()) == 7 and int(inputs.lengths.min()) >= 1
    assert torch.equal(inputs.mask.sum(1), inputs.lengths)
    again = crf_batch(5, 7, 3, seed=11, lengths=kind)
    assert torch.equal(inputs.emissions, again.emissions) and torch.equal(inputs.lengths, again.lengths)
    emissions, tags, mask = inputs.time_first()
    assert emissions.shape == (7, 5, 3) and emissions.is_contiguous()
    assert torch.equal(tags, inputs.tags.t()) and torch.equal(mask, inputs.mask.t())
    assert inputs.shape == {"B": 5, "T": 7, "K": 3, "lengths": inputs.lengths_note,
                            "tokens": int(inputs.lengths.sum())}


def test_crf_batch_rejects_an_unknown_length_kind():
    with pytest.raises(ValueError, match="lengths must be one of"):
        crf_batch(2, 3, 4, seed=0, lengths="gamma")


def test_rnn_shape_lengths_are_conll_like_and_fixed_per_shape():
    lengths = TAGGER_RNN.lengths()
    assert lengths.shape == (TAGGER_RNN.batch,) and int(lengths.max()) == TAGGER_RNN.seq_len
    assert torch.equal(lengths, TAGGER_RNN.lengths())


@pytest.mark.parametrize("script", ["crf_cuda_bench", "rnn_cuda_bench"])
def test_cuda_scripts_run_as_modules_and_refuse_without_cuda(script, tmp_path):
    # `python -m benchmarks.X` from the repository root: the harness imports without sys.path edits
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the benchmark")
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", str(tmp_path / "out.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "CUDA" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_crf_step_breakdown_calls_run():
    pytest.importorskip("torchcrf")
    from benchmarks import crf_step_breakdown

    for name, call in crf_step_breakdown.calls(2).items():
        call()


# ---- the scripts in benchmarks/: outside the CI test command, so run here at toy sizes --------

def _bench_env():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(BACKEND_ENV, None)
    return env


def test_pytest_benchmark_suites_run_a_few_rows():
    # benchmarks/bench_*.py are collected only when named: a change to the fastner.bench code
    # they call would otherwise break them unseen; -k: one row of each test function
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("torchcrf")
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_crf.py", "benchmarks/bench_rnn.py",
                           "-q", "--benchmark-disable", "-k",
                           "B1-T40-K9-reference or lstm-training-fastner.lengths or 8-100-fastner.lengths"],
                          cwd=REPO, env=_bench_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 5 = nothing collected
    assert " passed" in done.stdout


@pytest.fixture
def tiny_conll_files(tmp_path):
    """(train, dev) CoNLL files of the generated demo corpus: the epoch scripts' input without
    the CoNLL-2003 data."""
    from fastner.data.conll import write_conll
    from fastner.demo import generate_corpus

    train, dev = generate_corpus(24, 6, seed=1)
    paths = tmp_path / "train.conll", tmp_path / "dev.conll"
    for path, sentences in zip(paths, (train, dev)):
        write_conll(str(path), sentences)
    return paths


def test_char_cnn_step_runs_its_interleaved_epochs(tiny_conll_files, one_thread, capsys):
    from benchmarks import char_cnn_step
    from fastner.models.char_cnn import CharCNN

    forward = CharCNN.forward
    train, dev = tiny_conll_files
    char_cnn_step.main(["--train", str(train), "--dev", str(dev), "--sentences", "20", "--epochs", "2",
                        "--threads", "1", "--embeddings", "none"])
    out = capsys.readouterr().out
    assert "20 sentences an epoch" in out and "median epoch:" in out
    assert CharCNN.forward is forward  # the swapped-in forward is put back


def test_epoch_scripts_need_two_epochs_before_any_training(capsys):
    # the first epoch is warm-up and not reported: with one, the run trained, then failed on
    # the median of no epochs
    from benchmarks import char_cnn_step, dropout_mask
    from benchmarks.interleaved_epochs import interleaved_epochs

    with pytest.raises(ValueError, match="epochs must be >= 2"):
        interleaved_epochs([], [], torch.nn.Module, {}, epochs=1)
    for main in (char_cnn_step.main, dropout_mask.main):
        with pytest.raises(SystemExit) as exit:
            main(["--train", "unread", "--dev", "unread", "--epochs", "1"])
        assert exit.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_dropout_mask_script_times_three_masks_of_one_distribution(one_thread, capsys):
    from benchmarks import dropout_mask

    x = torch.randn(64, 50)
    for name, mask in dropout_mask.MASKS.items():
        values = mask(x, 0.5)
        assert values.shape == x.shape and set(values.unique().tolist()) == {0.0, 2.0}, name
    dropout_mask.main([])  # 200 calls of each mask at three shapes: a fraction of a second
    out = capsys.readouterr().out
    assert out.count("dropout_mask op") == 3 and "training epochs" not in out
    with pytest.raises(SystemExit) as exit:  # --train alone skipped the epochs without a word
        dropout_mask.main(["--train", "unread"])
    assert exit.value.code == 2 and "--train and --dev go together" in capsys.readouterr().err


def test_thread_cpu_clock_counts_this_threads_work():
    from fastner.bench.timing import ThreadCpuClock

    spent = ThreadCpuClock().time(lambda: sum(range(20000)), number=5)
    assert 0.0 < spent < 5.0


def test_rnn_flops():
    # LSTM, I=130, H=200, 10 tokens, 2 directions: 2 * 4*200 * (130+200) * 10 * 2
    assert rnn_flops("lstm", 130, 200, 10, 2, training=False) == 2 * 800 * 330 * 10 * 2
    assert rnn_flops("gru", 130, 200, 10, 2, training=True) == 3 * 2 * 600 * 330 * 10 * 2


def test_torch_baseline_swaps_fastner_layers_keeping_weights():
    pytest.importorskip("torchcrf")
    from fastner import nn as fnn
    from fastner.bench.baselines import PackedGRU, PackedLSTM, torch_baseline

    model = torch.nn.Sequential(fnn.LSTM(6, 5, batch_first=True, bidirectional=True),
                                fnn.GRU(10, 4, batch_first=True))
    base, swapped = torch_baseline(model)
    assert swapped == 2
    assert type(base[0]) is PackedLSTM and type(base[1]) is PackedGRU
    assert type(model[0]) is fnn.LSTM  # the original is left alone
    x = torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 2, 4])
    with torch.no_grad():
        got, _ = base[0](x, lengths=lengths)
        want, _ = model[0](x, lengths=lengths)
    torch.testing.assert_close(got, want)


def test_quantized_torch_baseline_quantizes_the_packed_layers():
    # quantize_dynamic alone passes over PackedLSTM / PackedGRU (it swaps by exact type): the
    # tagger rows' "torch int8" model once ran in fp32 that way.
    pytest.importorskip("torchcrf")
    from torch.ao.nn.quantized import dynamic as quantized_dynamic

    from fastner import nn as fnn
    from fastner.bench.baselines import quantized_torch_baseline, torch_baseline

    model = torch.nn.Sequential(fnn.LSTM(6, 5, batch_first=True, bidirectional=True),
                                fnn.GRU(10, 4, batch_first=True))
    base, _ = torch_baseline(model)
    quantized, count = quantized_torch_baseline(base)
    assert count == 2
    assert isinstance(quantized[0], quantized_dynamic.LSTM) and isinstance(quantized[1], quantized_dynamic.GRU)
    assert type(base[0]).__name__ == "PackedLSTM"  # the fp32 baseline is left alone
    x = torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 2, 4])
    with torch.no_grad():
        got, _ = quantized[0](x, lengths=lengths)
        want, _ = base[0](x, lengths=lengths)
    assert got.shape == want.shape
    assert bool((got[1, 2:] == 0).all())  # padding past a length, as the packed fp32 layer
    error = float((got - want).norm() / want.norm())
    assert 0 < error < 0.05  # int8 arithmetic: close to fp32, but not it
    _, none = quantized_torch_baseline(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert none == 0


def test_torch_baseline_runs_the_char_cnn_on_torch_ops_with_the_same_values():
    pytest.importorskip("torchcrf")
    from fastner.bench.baselines import TorchCharCNN, torch_baseline
    from fastner.models.char_cnn import CharCNN

    model = torch.nn.Sequential(CharCNN(20, char_dim=6, filters=5)).eval()
    base, swapped = torch_baseline(model)
    assert swapped == 1 and type(base[0]) is TorchCharCNN and type(model[0]) is CharCNN
    chars = torch.randint(0, 20, (3, 4, 7))
    chars[0, 1] = 0  # a word of padding only
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(base[0](chars, mask), model[0](chars, mask))
    assert type(base[0].dropout) is torch.nn.Dropout and base[0].dropout.p == model[0].dropout.p


def test_torch_baseline_of_the_tagger_uses_nn_dropout():
    pytest.importorskip("torchcrf")
    from fastner.bench.baselines import torch_baseline
    from fastner.models.dropout import Dropout
    from fastner.models.tagger import ModelConfig, SequenceTagger

    model = SequenceTagger(ModelConfig(num_words=30, num_chars=20, tags=["O", "B-PER", "I-PER"], scheme="IOB2",
                                       word_dim=6, hidden=4))
    base, _ = torch_baseline(model)
    kinds = [type(m) for m in base.modules()]
    assert Dropout not in kinds and torch.nn.Dropout in kinds
    assert any(type(m) is Dropout for m in model.modules())  # the original is left alone


def test_torch_baseline_of_the_tagger_projects_with_torch_ops_to_the_same_values():
    # the emission layer in inference: fastner's masked_linear op in the tagger, torch's ops
    # (the reference) in its baseline, the same values
    pytest.importorskip("torchcrf")
    from fastner import ops, reference
    from fastner.bench.baselines import torch_baseline
    from fastner.models.tagger import ModelConfig, SequenceTagger

    model = SequenceTagger(ModelConfig(num_words=30, num_chars=20, tags=["O", "B-PER", "I-PER"], scheme="IOB2",
                                       word_dim=6, hidden=4)).eval()
    base, _ = torch_baseline(model)
    assert model._masked_linear is ops.masked_linear and base._masked_linear is reference.masked_linear
    x = torch.randn(3, 5, 8)
    mask = torch.arange(5) < torch.tensor([5, 2, 0])[:, None]
    x[~mask] = 0
    with torch.no_grad():
        torch.testing.assert_close(base._project(x, mask), model._project(x, mask))


def test_torch_baseline_of_a_bare_crf_is_pytorch_crf_with_its_weights():
    torchcrf = pytest.importorskip("torchcrf")
    from fastner import nn as fnn
    from fastner.bench.baselines import torch_baseline

    crf = fnn.CRF(5, batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    base, swapped = torch_baseline(crf.eval())
    assert swapped == 1 and isinstance(base, torchcrf.CRF) and not base.training
    assert base.batch_first and base.num_tags == 5
    emissions, tags = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(base(emissions, tags), crf(emissions, tags))


# ---- the whole-tagger rows on a stand-in model (tests only; the real one is fastner.models) ----

@dataclasses.dataclass
class StandInBatch:
    words: torch.Tensor
    chars: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    tags: torch.Tensor
    index: list

    def to(self, device):
        return self


class StandInTagger(torch.nn.Module):
    """Word embedding -> fastner BiLSTM -> linear -> fastner CRF when it exists, else softmax."""

    def __init__(self):
        super().__init__()
        from fastner import nn as fnn

        self.embedding = torch.nn.Embedding(tagger_rows.NUM_WORDS, 8)
        self.encoder = fnn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.output = torch.nn.Linear(12, len(tagger_rows.TAGS))
        crf = getattr(fnn, "CRF", None)
        self.crf = crf(len(tagger_rows.TAGS), batch_first=True) if crf is not None else None

    def emissions(self, words, chars, lengths, mask):
        x, _ = self.encoder(self.embedding(words), lengths=lengths)
        return self.output(x)

    def loss(self, batch):
        scores = self.emissions(batch.words, batch.chars, batch.lengths, batch.mask)
        if self.crf is not None:
            return -self.crf(scores, batch.tags, batch.mask, reduction="sum")
        mask = batch.mask
        return torch.nn.functional.cross_entropy(scores[mask], batch.tags[mask], reduction="sum")

    @torch.no_grad()
    def predict(self, batch):
        scores = self.emissions(batch.words, batch.chars, batch.lengths, batch.mask)
        if self.crf is not None:
            return self.crf.viterbi(scores, batch.mask)
        return scores.argmax(-1).masked_fill(~batch.mask, -1), None


def test_tagger_rows_on_a_stand_in_model():
    pytest.importorskip("torchcrf")
    rows = []
    plan = dataclasses.replace(make_plan(True), tagger_train_batch=4, tagger_infer_batch=8)
    settings = Settings(warmup=1, min_samples=2, max_samples=2, budget_s=0.0)
    ctx = Context(torch.device("cpu"), plan, settings, emit=rows.append)
    tagger_rows.run(ctx, build=lambda device: (StandInTagger(), StandInBatch))
    assert [row.op for row in rows] == ["tagger_training", "tagger_inference"]
    for row in rows:
        assert row.error is None, row.error
        assert row.check == "ok"
        assert row.shape["batching"] == "random" and row.shape["sentences"] >= 1
        fast, base = row.result("fastner"), row.result("torch+pytorch-crf")
        if row.op == "tagger_training":
            assert fast.speedup.keys() == {"torch+pytorch-crf"}
        else:  # inference: int8 too, against fp32 and against torch's int8 model
            assert fast.speedup.keys() == {"torch+pytorch-crf", "torch+pytorch-crf.int8"}
            assert row.result("fastner.int8").speedup.keys() == fast.speedup.keys()
            # every reduced-precision model runs in it: near its fp32 model, never equal to it
            errors = row.info["relative_error_vs_fp32"]
            assert {"fastner.int8", "torch+pytorch-crf.int8"} <= errors.keys()
            assert all(0 < e < 0.05 for e in errors.values()), errors
        assert fast.extra["sentences_per_s"] > 0 and base.extra["sentences_per_s"] > 0


def test_tagger_precision_check_flags_a_model_left_in_fp32():
    pytest.importorskip("torchcrf")
    from fastner.bench.baselines import torch_baseline

    fast = StandInTagger()
    base, _ = torch_baseline(fast)
    batches = tagger_rows.make_batches(StandInBatch, 2, 8, "random", seed=3, device=torch.device("cpu"))
    models, _ = tagger_rows._quantized_models(fast, base)
    assert tagger_rows._precision_check(fast, base, models, batches)[0] == "ok"
    models["torch+pytorch-crf.int8"] = copy.deepcopy(base)  # what quantize_dynamic once gave
    check, errors = tagger_rows._precision_check(fast, base, models, batches)
    assert check == "mismatch: torch+pytorch-crf.int8 equals its fp32 model (not quantized)"
    assert errors["torch+pytorch-crf.int8"] == 0.0


def test_tagger_batches_are_valid_bioes():
    batches = tagger_rows.make_batches(StandInBatch, 3, 16, "bucketed", seed=1,
                                       device=torch.device("cpu"))
    assert len(batches) == 3
    all_lengths = torch.cat([b.lengths for b in batches])
    assert torch.equal(all_lengths, all_lengths.sort().values)  # bucketed: sorted by length
    tags = tagger_rows.TAGS
    for batch in batches:
        assert batch.words.shape == batch.mask.shape == batch.tags.shape
        assert batch.chars.shape[:2] == batch.mask.shape
        assert not batch.words[~batch.mask].any() and batch.words[batch.mask].ge(1).all()
        for row, length in zip(batch.tags.tolist(), batch.lengths.tolist()):
            previous = "O"
            for tag in [tags[i] for i in row[:length]] + ["O"]:
                # BIOES: after B or I comes I or E of the same type; elsewhere no I or E
                if previous[0] in "BI":
                    assert tag[0] in "IE" and tag[2:] == previous[2:], row
                else:
                    assert tag[0] in "OBS", row
                previous = tag


def test_markdown_tables_from_the_quick_run(quick_run):
    from fastner.bench.markdown import render

    text = render(json.loads(quick_run[1].read_text()))
    assert "| RNN (bidirectional) |" in text and "| lstm inference | 32×40×130→200 |" in text
    assert "GEMM rate" in text


def test_plot_without_matplotlib_is_a_usage_error_before_any_timing(monkeypatch, capsys):
    # It was 'fastner bench: --plot needs ...', not the `fastner: error:` line of every other mistake.
    from fastner.bench import cli, plots

    monkeypatch.setattr(cli, "require_matplotlib", lambda: plots.MISSING)
    with pytest.raises(SystemExit) as exit:
        cli.main(["--plot", "somewhere", "--only", "crf"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("fastner: error: --plot needs matplotlib")
