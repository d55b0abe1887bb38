"""RowSparseSGD (sparse word-table updates) against torch.optim.SGD on the dense gradient."""
import pytest
import torch

from fastner.optim import RowSparseSGD, clip_grad_norm, sparse_rows


def _steps(sparse, batches, lr_of_step, clip, momentum=0.9):
    torch.manual_seed(0)
    table = torch.nn.Embedding(12, 3, padding_idx=0, sparse=sparse).double()
    head = torch.nn.Linear(3, 2).double()
    target = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense_params = list(head.parameters()) + ([] if sparse else [table.weight])
    optimizer = torch.optim.SGD(dense_params, lr=lr_of_step[0], momentum=momentum)
    rows_opt = RowSparseSGD(table.weight, lr_of_step[0], momentum) if sparse else None
    for step, ids in enumerate(batches):
        lr = lr_of_step[step]
        if rows_opt is not None and lr != rows_opt.lr:
            rows_opt.flush()  # as the Trainer does at each epoch's end, before the rate changes
            rows_opt.lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        if rows_opt is not None:
            rows_opt.catch_up(torch.tensor(ids))
        loss = ((head(table(torch.tensor(ids))) - target) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        table.weight.grad = None
        loss.backward()
        values = None
        if sparse:
            rows, values = sparse_rows(table.weight.grad)
        if clip:
            if sparse:
                clip_grad_norm([p.grad for p in dense_params], values, clip)
            else:
                torch.nn.utils.clip_grad_norm_(dense_params, clip)
        optimizer.step()
        if sparse:
            rows_opt.step(rows, values)
    if rows_opt is not None:
        rows_opt.flush()
    return table.weight.detach(), [p.detach() for p in head.parameters()], rows_opt


@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_row_sparse_sgd_equals_dense_sgd(clip, momentum):
    # rows 7-11 idle for many steps, repeated ids in a batch, the padding row, a rate change
    batches = [[1, 2, 2, 0], [3, 4], [1, 5, 0], [6], [2, 3], [7, 8, 9], [1], [1, 10], [11, 2], [4], [5, 5, 5], [1]]
    lrs = [0.1] * 5 + [0.05] * 7
    dense_w, dense_head, _ = _steps(False, batches, lrs, clip, momentum)
    sparse_w, sparse_head, opt = _steps(True, batches, lrs, clip, momentum)
    torch.testing.assert_close(sparse_w, dense_w, rtol=1e-12, atol=1e-12)
    for a, b in zip(sparse_head, dense_head):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (sparse_w[0] == 0).all()  # the padding row never moves
    assert opt.state_dict()["momentum_buffer"].shape == (12, 3)


def test_row_sparse_sgd_checks_its_arguments():
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="momentum"):
        RowSparseSGD(weight, 0.1, 1.0)
    with pytest.raises(ValueError, match="momentum_buffer"):
        RowSparseSGD(weight, 0.1, 0.9).load_state_dict({"momentum_buffer": torch.zeros(3, 2)})
