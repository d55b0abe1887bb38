"""benchmarks/serve_profile.py: the per-stage profile runs the served path itself, every stage is
reached, and a stage that the path no longer reaches fails the run instead of hiding its time."""
import pytest

from benchmarks import serve_profile
from fastner.demo import generate_corpus
from fastner.serve.model import predict_documents


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    from tests.serve_testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def documents_file(tmp_path):
    sentences, _ = generate_corpus(40, 0, seed=4)
    path = tmp_path / "documents.conll"
    path.write_text("".join("".join(f"{token} O\n" for token in s.tokens) + "\n" for s in sentences))
    return str(path)


def test_profile_runs_every_stage_of_the_served_path(tagger_dir, documents_file, capsys, one_thread):
    # main() sets torch's threads to 1, as the server's worker; one_thread restores them
    assert serve_profile.main([tagger_dir, "--documents", documents_file, "--batch", "4", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    stages = {stage for _, _, stage in serve_profile.MODULE_STAGES} | {stage for _, stage in serve_profile.MODEL_STAGES}
    for stage in stages | {"JSON answer", serve_profile.OTHER}:
        row = next(line for line in table.splitlines() if line.startswith(f"| {stage} |"))
        assert all(float(cell) >= 0 for cell in row.strip("|").split("|")[1:]), row
    assert "| **total** |" in table and "| batch 1 / batch n |" in table


def test_batch_one_is_measured_once(tagger_dir, documents_file, capsys, one_thread):
    # batch 1 is the baseline column: asking for it too ("--batch 1,4") gave two batch-1 columns
    assert serve_profile.main([tagger_dir, "--documents", documents_file, "--batch", "1,4,4", "--rounds", "1"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| stage |"))
    assert header == "| stage | batch 1 | batch 4 |"


@pytest.mark.parametrize("batch", ["0", "4,x", ""])
def test_bad_batch_sizes_are_refused(tagger_dir, documents_file, capsys, batch):
    with pytest.raises(SystemExit) as exit_info:
        serve_profile.main([tagger_dir, "--documents", documents_file, "--batch", batch])
    assert exit_info.value.code == 2 and "--batch" in capsys.readouterr().err


def test_staged_returns_what_the_server_returns_and_restores_the_path(tagger):
    texts = ["Peter Blackburn met the European Commission in Brussels .", "John Smith works for Acme Corp ."]
    clock = serve_profile.StageClock()
    expected = predict_documents(tagger, texts)
    assert serve_profile.staged(tagger, texts, clock) == expected
    serve_profile.stages_reached(clock)
    assert clock.clock[serve_profile.OTHER] >= 0 and sum(clock.clock.values()) > 0
    # the wrappers are gone afterwards: a call now adds nothing to the clock
    before = dict(clock.calls)
    assert predict_documents(tagger, texts) == expected
    assert clock.calls == before


def test_a_stage_the_path_no_longer_reaches_fails_the_run(tagger, monkeypatch):
    # sentence_result is not on the served path: as if a stage's function had stopped being called
    monkeypatch.setattr(serve_profile, "MODULE_STAGES",
                        serve_profile.MODULE_STAGES + [("fastner.documents", "sentence_result", "unreached")])
    clock = serve_profile.StageClock()
    serve_profile.staged(tagger, ["John Smith works for Acme Corp ."], clock)
    with pytest.raises(SystemExit, match="unreached"):
        serve_profile.stages_reached(clock)


def test_nested_stages_are_charged_exclusively():
    clock = serve_profile.StageClock()

    def inner():
        return sum(i * i for i in range(20000))

    wrapped_inner = clock.wrap(inner, "inner")
    clock.measure(lambda: [wrapped_inner() for _ in range(3)])
    assert clock.calls == {"inner": 3, serve_profile.OTHER: 1}
    # the outer stage's own share is what the comprehension costs beyond the inner calls
    assert clock.clock["inner"] > clock.clock[serve_profile.OTHER] >= 0


def test_generator_stages_time_each_step():
    clock = serve_profile.StageClock()

    def numbers(n):
        yield from range(n)

    assert list(clock.wrap(numbers, "numbers")(4)) == [0, 1, 2, 3]
    assert clock.calls["numbers"] == 5  # four values and the StopIteration


def test_crf_ops_inside_another_stage_are_charged_to_that_stage():
    # a CRF op that another stage calls (a posterior stage running one) is charged to that stage
    clock = serve_profile.StageClock()
    crf_op = clock.wrap(lambda: sum(range(1000)), serve_profile.CRF)
    posteriors = clock.wrap(lambda: crf_op(), "posteriors")
    clock.measure(lambda: (crf_op(), posteriors()))
    assert clock.calls == {serve_profile.CRF: 1, "posteriors": 1, serve_profile.OTHER: 1}
