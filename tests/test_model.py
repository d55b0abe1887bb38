"""The BiLSTM-CNN-CRF model on every encoder x head: loss, gradients, decoding, padding."""
import pytest
import torch

from fastner.data import Batch
from fastner.data.schemes import spans_to_tags, strict_spans, tags_to_spans
from fastner.models import ENCODERS, HEADS, CharCNN, ModelConfig, SequenceTagger

TAGS = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]

# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")



def random_batch(lengths, num_words=30, num_chars=12):
    lengths = torch.tensor(lengths)
    batch, time_len = len(lengths), int(lengths.max())
    mask = torch.arange(time_len)[None, :] < lengths[:, None]
    words = torch.randint(2, num_words, (batch, time_len)) * mask
    char_len = torch.randint(1, 6, (batch, time_len))
    chars = torch.randint(1, num_chars, (batch, time_len, 6))
    chars = chars * (torch.arange(6) < char_len[..., None]) * mask[..., None]
    # gold tags must be well formed: the CRF gives ill-formed BIOES paths probability 0
    tags = torch.zeros(batch, time_len, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        spans, position = [], 0
        while position < n:
            width = int(torch.randint(1, 4, ()))
            if position + width <= n and bool(torch.rand(()) < 0.5):
                spans.append((position, position + width, ["PER", "LOC"][int(torch.randint(0, 2, ()))]))
            position += width
        tags[row, :n] = torch.tensor([TAGS.index(t) for t in spans_to_tags(spans, n, "BIOES")])
    return Batch(words, chars, lengths, mask, tags, list(range(batch)))


def make_model(encoder, head, **overrides):
    options = dict(num_words=30, num_chars=12, tags=TAGS, encoder=encoder, head=head, hidden=8, word_dim=6,
                   char_dim=5, char_filters=4)
    options.update(overrides)
    return SequenceTagger(ModelConfig(**options))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_loss_backward_and_decode(encoder, head):
    model = make_model(encoder, head)
    lengths = torch.randint(1, 9, (5,)).tolist()
    batch = random_batch(lengths)
    loss = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    tags, marginals = model.predict(batch, with_marginals=True)
    assert tags.shape == batch.words.shape
    assert ((tags == -1) == ~batch.mask).all()
    assert marginals.shape == (*batch.words.shape, len(TAGS))
    sums = marginals.sum(-1)
    assert torch.allclose(sums[batch.mask], torch.ones(int(batch.mask.sum())), atol=1e-4)
    assert (sums[~batch.mask] == 0).all()


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_crf_decodes_only_well_formed_bioes(encoder):
    model = make_model(encoder, "crf").eval()
    with torch.no_grad():  # large random emissions push towards invalid paths
        model.output.weight.mul_(50)
    batch = random_batch([7, 5, 3, 1] * 4)
    tags, _ = model.predict(batch)
    for row, n in zip(tags.tolist(), batch.lengths.tolist()):
        names = [TAGS[t] for t in row[:n]]
        assert tags_to_spans(names) == strict_spans(names, "BIOES"), names


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_padding_does_not_change_a_sentence(encoder):
    # in eval mode a sentence scores the same alone and padded inside a batch of longer ones
    model = make_model(encoder, "crf").eval()
    batch = random_batch([3, 9, 6])
    alone = Batch(batch.words[:1, :3], batch.chars[:1, :3], batch.lengths[:1], batch.mask[:1, :3], None, [0])
    with torch.no_grad():
        full = model.emissions(batch.words, batch.chars, batch.lengths, batch.mask)
        single = model.emissions(alone.words, alone.chars, alone.lengths, alone.mask)
    torch.testing.assert_close(full[0, :3], single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.predict(batch)[0][0, :3], model.predict(alone)[0][0])


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_inference_projects_only_the_tokens_with_the_same_values(encoder):
    # Without grad the output Linear runs on the tokens' rows alone (SequenceTagger._project);
    # the emissions must equal the all-rows product's: the tokens' to float rounding, the
    # padding's exactly (the bias, what a zero row gives).
    model = make_model(encoder, "crf").eval()
    batch = random_batch([3, 9, 6, 1])
    with torch.no_grad():
        fast = model.emissions(batch.words, batch.chars, batch.lengths, batch.mask)
    with torch.enable_grad():
        full = model.emissions(batch.words, batch.chars, batch.lengths, batch.mask).detach()
    torch.testing.assert_close(fast[batch.mask], full[batch.mask], rtol=1e-6, atol=1e-6)
    assert torch.equal(fast[~batch.mask], full[~batch.mask])
    assert torch.equal(fast[~batch.mask], model.output.bias.detach().expand_as(fast[~batch.mask]))
    # one sentence alone (no padding) and one with padding after it: the same values too
    for lengths, steps in (([5], 5), ([3], 7)):
        alone = random_batch(lengths)
        words, chars = alone.words, alone.chars
        if steps > words.shape[1]:
            pad = steps - words.shape[1]
            words = torch.nn.functional.pad(words, (0, pad))
            chars = torch.nn.functional.pad(chars, (0, 0, 0, pad))
        mask = torch.arange(steps).unsqueeze(0) < alone.lengths.unsqueeze(1)
        with torch.no_grad():
            fast = model.emissions(words, chars, alone.lengths, mask)
        with torch.enable_grad():
            full = model.emissions(words, chars, alone.lengths, mask).detach()
        torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)
        assert torch.equal(fast[~mask], full[~mask])


def test_inference_emissions_of_a_batch_with_no_steps():
    # One sentence alone skips the token-row selection; with no steps at all (T = 0) that check
    # once indexed a position that is not there (IndexError).
    model = make_model("lstm", "crf").eval()
    with torch.no_grad():
        out = model.emissions(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 6, dtype=torch.long),
                              torch.tensor([0]), torch.zeros(1, 0, dtype=torch.bool))
    assert out.shape == (1, 0, model.output.out_features)


def test_char_cnn_ignores_padding_chars():
    cnn = CharCNN(10, char_dim=4, filters=3, dropout=0.0)
    chars = torch.tensor([[[3, 4, 0, 0], [5, 0, 0, 0]]])
    short = chars[:, :, :2]
    mask = torch.tensor([[True, True]])
    torch.testing.assert_close(cnn(chars, mask), cnn(short, mask))
    out = cnn(torch.tensor([[[3, 4], [0, 0]]]), torch.tensor([[True, False]]))
    assert (out[0, 1] == 0).all()


def test_multi_layer_and_no_chars():
    model = make_model("gru", "crf", layers=2, use_chars=False)
    assert model.char_cnn is None and model.encoder.num_layers == 2
    model.loss(random_batch([4, 2])).backward()


def test_lstm_forget_gate_bias_starts_at_one():
    model = make_model("lstm", "crf")
    hidden = model.config.hidden
    assert (model.encoder.bias_ih_l0[hidden : 2 * hidden] == 1).all()
    assert (model.encoder.bias_hh_l0[hidden : 2 * hidden] == 0).all()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="encoder"):
        make_model("transformer", "crf")
    with pytest.raises(ValueError, match="head"):
        make_model("lstm", "mlp")
    with pytest.raises(ValueError, match="dropout"):
        make_model("lstm", "crf", dropout=1.5)
    with pytest.raises(ValueError, match="word_weights"):
        SequenceTagger(ModelConfig(num_words=30, num_chars=12, tags=TAGS), torch.zeros(3, 3))
    model = make_model("lstm", "crf")
    batch = random_batch([2])
    batch.tags = None
    with pytest.raises(ValueError, match="gold tags"):
        model.loss(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_keeps_one_minus_p_scaled_and_is_identity_in_eval(dtype):
    from fastner.models.dropout import Dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, dtype=dtype, requires_grad=True)
    for p in (0.1, 0.5, 0.8):
        drop = Dropout(p).train()
        y = drop(x)
        kept = y != 0
        assert y.dtype == dtype
        assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # ~Binomial: sd ~0.001
        assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(), 1 / (1 - p)), rtol=1e-2)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(grad, y.detach())  # d(x * mask)/dx = mask, with x = 1
        assert drop.eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_dropout_follows_torch_seed():
    from fastner.models.dropout import Dropout

    x = torch.randn(4, 50)
    torch.manual_seed(3)
    a = Dropout(0.5)(x)
    torch.manual_seed(3)
    assert torch.equal(a, Dropout(0.5)(x))
