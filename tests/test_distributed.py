"""Multi-process training (fastner.distributed): 2 CPU processes with gloo.

The workers are plain subprocesses of this file (`python tests/test_distributed.py worker ...`)
given torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
on a free local port; they are killed if they outlive a deadline. One pair of workers does all the
distributed work (starting processes is the expensive part on a small machine) and writes what it
saw into a directory that the tests then compare with single-process runs in this process.

Why 2 ranks x batch b equals 1 process x batch 2b exactly (up to float summation order): the
tagger's loss is a SUM over sentences and fastner sums (does not average) gradients over ranks,
so the gradient of one distributed step is the gradient of the summed loss of the union of the
ranks' batches; the loss of that step is the sum of the ranks' losses.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # when run as a worker script
    sys.path.insert(0, ROOT)

from fastner import distributed  # noqa: E402

WORLD = 2
PER_RANK = 3  # sentences per rank and step
STEPS = 3
DEADLINE_S = 240  # the workers are killed past this (a hang must fail, not block the suite)


# ---- what the workers and the single-process runs share -------------------------------------

def _corpus(n_train=36, n_dev=10):
    from fastner.demo import generate_corpus

    return generate_corpus(n_train, n_dev, seed=11)


def _tiny_model(train_data):
    from fastner.models.tagger import ModelConfig, SequenceTagger
    from fastner.train import build_vocabularies

    words, chars, tags = build_vocabularies(train_data, "BIOES", False)
    torch.manual_seed(123)
    # dropout 0: the comparison is of the arithmetic, not of random masks
    config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), word_dim=8,
                         char_dim=6, char_filters=6, hidden=8, dropout=0.0)
    return SequenceTagger(config), words, chars, tags


def _encoded(train_data, words, chars, tags):
    from fastner.data.batching import encode_sentences
    from fastner.data.conll import Sentence
    from fastner.data.schemes import convert_tags

    sentences = [Sentence(s.tokens, convert_tags(s.tags, "BIOES")) for s in train_data]
    return encode_sentences(sentences, words, chars, tags)


def _sgd_steps(module, model, encoded, step_index, pad, reduce_loss=lambda value: value):
    """SGD over the steps; step_index(step) -> sentence indices of this process."""
    from fastner.data.batching import make_batch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(STEPS):
        batch = make_batch(encoded, step_index(step), *pad)
        loss = distributed.loss_of(module, batch)
        optimizer.zero_grad()
        loss.backward()
        # no clipping here: clipping to a norm would hide a gradient off by a constant factor
        optimizer.step()
        losses.append(reduce_loss(float(loss.detach())))
    return losses


def _tiny_train_config(**overrides):
    from fastner.train import TrainConfig

    options = dict(epochs=2, batch_size=4, seed=3, optimizer="adam", lr=0.01, word_dim=8,
                   model={"hidden": 8, "char_filters": 6, "char_dim": 6})
    options.update(overrides)
    return TrainConfig(**options)


# ---- the worker ------------------------------------------------------------------------------

def _worker(out_dir):
    import torch.distributed as torch_dist

    from fastner.train import train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # The worker owns the group so that train() (which joins an existing group and leaves it
    # alone) can run twice in it.
    torch_dist.init_process_group("gloo", init_method="env://")
    context = distributed.setup("cpu")
    assert (context.rank, context.world_size, context.backend) == (rank, WORLD, "gloo")

    # 1. some SGD steps on fixed data: rank r takes its own PER_RANK sentences of each step
    train_data, dev_data = _corpus()
    model, words, chars, tags = _tiny_model(train_data)
    module = context.wrap(model)
    encoded = _encoded(train_data, words, chars, tags)
    start = lambda step: step * WORLD * PER_RANK + rank * PER_RANK  # noqa: E731
    losses = _sgd_steps(module, model, encoded, lambda step: list(range(start(step), start(step) + PER_RANK)),
                        (words.pad_id, chars.pad_id), reduce_loss=lambda value: context.all_sum([value])[0])
    torch.save({"losses": losses, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               os.path.join(out_dir, f"steps{rank}.pt"))

    # 2. the whole training loop, twice with the same seed
    for run in ("a", "b"):
        run_dir = os.path.join(out_dir, f"train_{run}")
        summary = train(train_data, dev_data, run_dir, _tiny_train_config(), log=lambda text: None)
        with open(os.path.join(out_dir, f"summary_{run}{rank}.json"), "w") as handle:
            json.dump(_strip(summary), handle)
    # 3. each rank names its own directory: only rank 0's may receive files; with test data
    # and patience 1, every rank takes rank 0's test result and stops when it does
    summary = train(train_data, dev_data, os.path.join(out_dir, f"own{rank}"), _tiny_train_config(patience=1, epochs=4),
                    test_data=dev_data[:4], log=lambda text: None)
    with open(os.path.join(out_dir, f"summary_c{rank}.json"), "w") as handle:
        json.dump(dict(_strip(summary), test=summary["test"]), handle)
    torch_dist.barrier()
    # Rank 0 leaves last: it hosts the rendezvous store, and a rank that exits while another
    # is still finishing the barrier or leaving the group can leave that one waiting for good
    # (rank 1 hung here once in ~25 runs on the 2-core machine, rank 0 having exited cleanly).
    if rank != 0:
        torch_dist.destroy_process_group()
        open(os.path.join(out_dir, f"left{rank}"), "w").close()
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(os.path.exists(os.path.join(out_dir, f"left{r}"))
                                                  for r in range(1, WORLD)):
        time.sleep(0.02)
    torch_dist.destroy_process_group()


def _strip(summary):
    drop = ("train_seconds", "tokens_per_s", "elapsed_seconds")
    return {"best_epoch": summary["best_epoch"], "best_dev_f1": summary["best_dev_f1"],
            "history": [{k: v for k, v in r.items() if k not in drop} for r in summary["history"]]}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop(distributed.BACKEND_ENV, None)
        if sys.platform.startswith("linux"):
            # gloo otherwise binds to the address the hostname resolves to, which some
            # containers cannot reach; the test's processes all live on this host
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        log = open(out / f"log{rank}.txt", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(out)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + DEADLINE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [proc.returncode for proc in procs]
    if codes != [0] * WORLD:
        pytest.fail(f"workers exited with {codes} (negative: killed at the {DEADLINE_S} s deadline)\n"
                    + "\n".join(f"--- rank {r} ---\n{text[-3000:]}" for r, text in enumerate(outputs)))
    return out


# ---- tests -----------------------------------------------------------------------------------

def test_replicas_stay_identical(worker_results):
    ranks = [torch.load(worker_results / f"steps{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert ranks[0]["losses"] == ranks[1]["losses"]


def test_two_ranks_match_one_process_on_the_union_of_their_batches(worker_results):
    torch.set_num_threads(1)
    train_data, _ = _corpus()
    model, words, chars, tags = _tiny_model(train_data)  # same seed: same initial weights
    encoded = _encoded(train_data, words, chars, tags)
    single = distributed.wrap_model(model, distributed.DistContext())
    size = WORLD * PER_RANK
    losses = _sgd_steps(single, model, encoded, lambda step: list(range(step * size, (step + 1) * size)),
                        (words.pad_id, chars.pad_id))
    dist = torch.load(worker_results / "steps0.pt", weights_only=True)
    torch.testing.assert_close(torch.tensor(dist["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0] * 2  # sanity: the steps did something finite
    for name, value in model.state_dict().items():
        torch.testing.assert_close(dist["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    initial, *_ = _tiny_model(train_data)
    assert not torch.allclose(initial.output.weight, model.output.weight)  # the steps moved the weights


def test_training_loop_agrees_across_ranks_and_seeds(worker_results):
    summaries = {(run, r): json.loads((worker_results / f"summary_{run}{r}.json").read_text())
                 for run in "ab" for r in range(WORLD)}
    # every rank returns rank 0's dev results and decisions; the same seed gives the same run
    assert summaries["a", 0] == summaries["a", 1] == summaries["b", 0] == summaries["b", 1]
    assert len(summaries["a", 0]["history"]) == 2
    run_a, run_b = worker_results / "train_a", worker_results / "train_b"
    for name in ("weights.pt", "config.json", "vocab.json", "checkpoint.pt", "training.json"):
        assert (run_a / name).is_file(), name
    wa = torch.load(run_a / "weights.pt", weights_only=True)
    wb = torch.load(run_b / "weights.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [name for name in os.listdir(run_a) if name.startswith(".tmp-")]


def test_only_rank_0_writes_and_all_ranks_stop_together(worker_results):
    assert sorted(os.listdir(worker_results / "own1")) == []
    assert "weights.pt" in os.listdir(worker_results / "own0")
    summaries = [json.loads((worker_results / f"summary_c{r}.json").read_text()) for r in range(WORLD)]
    assert summaries[0] == summaries[1]
    assert "f1" in summaries[0]["test"]


# ---- units that need no process group ----------------------------------------------------------

def test_shard_gives_every_rank_the_same_count_and_covers_all_batches():
    for total in range(0, 12):
        batches = [[i] for i in range(total)]
        for world in (1, 2, 3, 4):
            shards = [distributed.shard(batches, r, world) for r in range(world)]
            assert len({len(s) for s in shards}) == 1
            assert len(shards[0]) == -(-total // world)
            seen = [b[0] for s in shards for b in s]
            assert sorted(set(seen)) == list(range(total))
            assert len(seen) - total < world  # only the wrap-around repeats


def test_shard_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        distributed.shard([[0]], 2, 2)


def test_single_process_context(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    context = distributed.setup("cpu")
    assert (context.enabled, context.is_main, context.world_size) == (False, True, 1)
    assert context.shard([[1], [2]]) == [[1], [2]]
    assert context.broadcast({"f1": 1.0}) == {"f1": 1.0}
    assert context.all_sum([1, 2.5]) == [1.0, 2.5]
    context.barrier()
    context.cleanup()


def test_setup_names_missing_or_bad_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK"):
        distributed.setup("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    with pytest.raises(ValueError, match="nccl"):
        distributed.setup("cpu")


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """`torchrun --standalone --nproc_per_node=2 -m fastner train ...` end to end."""
    from fastner.demo import generate_corpus

    train_data, dev_data = generate_corpus(30, 8, seed=2)
    for name, sentences in (("train.txt", train_data), ("dev.txt", dev_data)):
        with open(tmp_path / name, "w") as handle:
            for s in sentences:
                handle.write("".join(f"{t} {g}\n" for t, g in zip(s.tokens, s.tags)) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def torchrun(out, epochs, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastner",
                   "train", "--train", str(tmp_path / "train.txt"), "--dev", str(tmp_path / "dev.txt"),
                   "--out", str(tmp_path / out), "--epochs", str(epochs), "--batch-size", "4", "--hidden", "8",
                   "--word-dim", "8", "--optimizer", "adam", "--lr", "0.01", "--threads", "1", *extra]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DEADLINE_S, cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 0 alone reports
        return [r["loss_per_token"] for r in json.loads((tmp_path / out / "training.json").read_text())["history"]]

    assert len(torchrun("out", 2)) == 2
    assert (tmp_path / "out" / "weights.pt").is_file()
    # a resumed distributed run continues exactly as an uninterrupted one
    assert torchrun("out", 3, "--resume") == torchrun("straight", 3)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
