"""Step cost of the default tagger (GloVe 50d, BiLSTM 200, char CNN, CRF, SGD momentum 0.9,
clipping 5, batches of 10 eng.train sentences, one thread). Variants, timed in interleaved rounds
(median and min ms/step over 60 steps a round; process CPU time, not wall time, since the
machine is shared and a descheduled process's wall time says little):
  before: the closed vocabulary of the old recipe (eng.train words + eng.testa words with a GloVe
          vector, 1 dense table, fine-tuned);
  after:  the open vocabulary (eng.train words fine-tuned + the 400k-row frozen float16 table);
  after, sparse word-table update (RowSparseSGD): the open vocabulary with the word table's rows
          updated sparsely (fastner.optim), as fastner.train's Trainer does with SGD;
  after, frozen word table: the same without the word table's gradient (a floor for what a
          sparse word-table update could save).
usage: python benchmarks/word_table_step.py [TREE] [ROUNDS]  (TREE: the fastner checkout to import,
default "."; ROUNDS: default 5, after one warm-up round; needs eng.train and eng.testa, in
$CONLL_DIR or else ../shared/data/conll2003 beside the checkout, and the GloVe package)"""
import os, random, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
if ROUNDS < 1:  # checked before the data loads, not when the medians find no rounds
    sys.exit(f"word_table_step: ROUNDS must be >= 1, got {ROUNDS}")
from fastner.data.conll import read_conll, Sentence
from fastner.data.schemes import convert_tags
from fastner.data.batching import encode_sentences, make_batch, bucket_batches
from fastner.data.vocab import Vocab
from fastner.embeddings import load_pretrained, embedding_matrix, frozen_table
from fastner.models.tagger import ModelConfig, SequenceTagger
from fastner.train import build_vocabularies

torch.set_num_threads(1)
DATA = os.environ.get("CONLL_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "conll2003"))
full = read_conll(DATA + "/eng.train")
dev = read_conll(DATA + "/eng.testa")
glove = load_pretrained("glove")
words, chars, tags = build_vocabularies(full, "BIOES", False)
closed = Vocab(words.itos[2:] + sorted({t for s in dev for t in s.tokens if t not in words.stoi and t in glove}))
enc = encode_sentences([Sentence(s.tokens, convert_tags(s.tags, "BIOES")) for s in full[:3000] if s.tokens], words, chars, tags)
batches = [make_batch(enc, i, words.pad_id, chars.pad_id) for i in bucket_batches([len(e.words) for e in enc], 10, True, random.Random(0))][:60]

def build(vocab, open_vocabulary):
    torch.manual_seed(0)
    weights, _ = embedding_matrix(vocab, glove, 50, torch.Generator().manual_seed(0))
    config = ModelConfig(num_words=len(vocab), num_chars=len(chars), tags=list(tags.itos), word_dim=50,
                         word_pad=vocab.pad_id, char_pad=chars.pad_id,
                         pretrained_rows=len(glove.words) if open_vocabulary else 0)
    model = SequenceTagger(config, weights, frozen_table(glove) if open_vocabulary else None).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9)

variants = {"before (closed vocabulary, %d rows)" % len(closed): build(closed, False),
            "after (open vocabulary, %d fine-tuned rows)" % len(words): build(words, True)}
variants["after, sparse word-table update (RowSparseSGD)"] = build(words, True)
variants["after, frozen word table (floor)"] = build(words, True)
variants["after, frozen word table (floor)"][0].word_embedding.weight.requires_grad_(False)

from fastner.optim import RowSparseSGD, clip_grad_norm, sparse_rows
m, _ = variants["after, sparse word-table update (RowSparseSGD)"]
m.word_embedding.sparse = True
table = RowSparseSGD(m.word_embedding.weight, 0.015, 0.9)
dense = [p for p in m.parameters() if p is not m.word_embedding.weight]
variants["after, sparse word-table update (RowSparseSGD)"] = (m, torch.optim.SGD(dense, lr=0.015, momentum=0.9))

def run(model, opt):
    if model is m:
        t0 = time.process_time()
        for b in batches:
            table.catch_up(b.words)
            loss = model.loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rows, values = sparse_rows(table.weight.grad)
            table.weight.grad = None
            clip_grad_norm([p.grad for p in dense], values, 5.0)
            opt.step()
            table.step(rows, values)
        table.flush()
        return (time.process_time() - t0) / len(batches) * 1e3
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.process_time()
    for b in batches:
        loss = model.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    return (time.process_time() - t0) / len(batches) * 1e3

res = {k: [] for k in variants}
for k, v in variants.items():
    run(*v)
for _ in range(ROUNDS):
    for k, v in variants.items():
        res[k].append(run(*v))
print(f"{len(batches)} steps a round, {sum(int(b.lengths.sum()) for b in batches)/len(batches):.0f} tokens/step")
for k, r in res.items():
    print(f"{k}: median {statistics.median(r):.2f} ms/step, min {min(r):.2f}")
