"""Token-classification targets, online IDF and loss against METHODS.md section 2, by hand."""

import math

import pytest
import torch

from methods.token_classification import (
    VOCAB_SIZE,
    OnlineIDF,
    TokenClassifier,
    composed_soft_cross_entropy,
    logsumexp_rows,
    multi_hot,
    soft_cross_entropy,
    soft_targets,
)

SOT, EOT, PAD = 49406, 49407, 0


def caption(*ids: int, length: int = 8) -> list[int]:
    return [SOT, *ids, EOT] + [PAD] * (length - len(ids) - 2)


def dense(rows, ids, values, batch, vocab=VOCAB_SIZE):
    out = torch.zeros(batch, vocab, dtype=values.dtype)
    return out.index_put_((rows, ids), values, accumulate=True)  # repeats hold explicit zeros


def test_multi_hot_is_the_deduplicated_multi_hot():
    text = torch.tensor([caption(320, 736, 320), caption(320, 320, 320), caption()])
    rows, ids, values = multi_hot(text)
    assert rows.shape == ids.shape == values.shape == (3 * 8,)  # one entry per position
    y = dense(rows, ids, values, 3)
    for i, row in enumerate(text.tolist()):
        assert set(y[i].nonzero().flatten().tolist()) == set(row)  # start, end, pad stay in
    assert y.max() == 1  # a repeated token counts once
    assert values.sum() == 5 + 4 + 3 and set(values.tolist()) == {0.0, 1.0}


def hand_state() -> OnlineIDF:
    """Known IDF state before the step: n = 1 update seen, df as fractions of captions."""
    idf = OnlineIDF()
    idf.steps.fill_(1.0)
    idf.df[[PAD, SOT, EOT]] = 1.0
    idf.df[320] = 0.5
    idf.df[736] = 0.25
    return idf


def test_hand_computed_idf_targets_and_loss():
    text = torch.tensor([caption(320, 736, 320), caption(320, 1125)])
    rows, ids, y = multi_hot(text)
    idf = hand_state()
    idf.update(ids, y, batch=2)
    # column mean of y: 1 for pad/start/end and 320, 1/2 for 736 and 1125; n = 2
    assert idf.steps.item() == 2.0
    expected_df = {PAD: 2.0, SOT: 2.0, EOT: 2.0, 320: 1.5, 736: 0.75, 1125: 0.5, 999: 0.0}
    for c, value in expected_df.items():
        assert idf.df[c].item() == value
    # w_c = log((n + 1/N) / (df_c + 1/N)), N = 2
    w = idf.weights(global_batch=2)
    expected_w = {PAD: 0.0, SOT: 0.0, EOT: 0.0, 320: math.log(2.5 / 2.0), 736: math.log(2.5 / 1.25),
                  1125: math.log(2.5 / 1.0), 999: math.log(2.5 / 0.5)}  # fmt: skip
    for c, value in expected_w.items():
        assert w[c].item() == pytest.approx(value, abs=1e-12)

    targets = dense(rows, ids, soft_targets(rows, ids, y, w, 2), 2)
    l125, l2, l25 = math.log(1.25), math.log(2.0), math.log(2.5)
    hand = {(0, 320): l125 / (l125 + l2), (0, 736): l2 / (l125 + l2),
            (1, 320): l125 / (l125 + l25), (1, 1125): l25 / (l125 + l25)}  # fmt: skip
    for (i, c), value in hand.items():
        assert targets[i, c].item() == pytest.approx(value, abs=1e-12)
    assert targets.count_nonzero() == len(hand)  # pad/start/end have weight 0

    # z = 0 except z[0, 736] = 2 and z[1, 320] = 1:
    # row loss = -sum_c y_hat_c (z_c - logsumexp(z)) = logsumexp(z) - sum_c y_hat_c z_c
    logits = torch.zeros(2, VOCAB_SIZE)
    logits[0, 736], logits[1, 320] = 2.0, 1.0
    row0 = math.log(VOCAB_SIZE - 1 + math.exp(2)) - 2 * hand[(0, 736)]
    row1 = math.log(VOCAB_SIZE - 1 + math.exp(1)) - 1 * hand[(1, 320)]
    loss = soft_cross_entropy(logits, rows, ids, soft_targets(rows, ids, y, w, 2))
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_repeated_tokens_count_once():
    once, thrice = torch.tensor([caption(320, 736)]), torch.tensor([caption(320, 320, 736, 320)])
    states = []
    for text in (once, thrice):
        idf = OnlineIDF()
        rows, ids, y = multi_hot(text)
        idf.update(ids, y, batch=1)
        targets = soft_targets(rows, ids, y, idf.weights(1), 1)
        states.append((idf.df.clone(), dense(rows, ids, targets, 1)))
    assert states[0][0][320] == 1.0 and torch.equal(states[0][0], states[1][0])
    assert torch.equal(states[0][1], states[1][1])


def test_idf_after_k_steps_is_log_samples_seen_over_document_frequency():
    gen = torch.Generator().manual_seed(0)
    idf, batch, k = OnlineIDF(), 4, 3
    counts = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    for _ in range(k):
        text = torch.randint(1, 12, (batch, 8), generator=gen)  # small ids: many repeats
        text[:, 0], text[:, -1] = SOT, EOT
        for row in text.tolist():
            counts[list(set(row))] += 1  # DF in captions
        _, ids, y = multi_hot(text)
        idf.update(ids, y, batch=batch)
    assert idf.steps.item() == k
    expected = torch.log((k * batch + 1) / (counts + 1))
    torch.testing.assert_close(idf.weights(batch), expected, rtol=0, atol=1e-12)


def test_sparse_loss_and_gradient_equal_the_dense_formula():
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(1, 300, (5, 10), generator=gen)
    text[:, 0], text[:, -1], text[0, 5:] = SOT, EOT, PAD
    rows, ids, y_entries = multi_hot(text)
    idf = OnlineIDF()
    idf.df.uniform_(0, 2, generator=gen)
    idf.steps.fill_(2.0)
    idf.update(ids, y_entries, batch=5)
    targets = soft_targets(rows, ids, y_entries, idf.weights(5), 5)

    logits = torch.randn(5, VOCAB_SIZE, generator=gen, requires_grad=True)
    ours = soft_cross_entropy(logits, rows, ids, targets)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    y = dense(rows, ids, y_entries, 5)
    yw = y * idf.weights(5)
    y_hat = yw / yw.sum(1, keepdim=True).clamp_min(1e-12)
    reference = -(y_hat * torch.log_softmax(logits.double(), dim=1)).sum(1).mean()
    (ref_grad,) = torch.autograd.grad(reference, logits)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad.float(), rtol=0, atol=1e-6)


def test_loss_is_float32_under_bf16_logits():
    rows, ids, y = multi_hot(torch.tensor([caption(320)]))  # 4 distinct ids
    logits = torch.zeros(1, VOCAB_SIZE, dtype=torch.bfloat16)
    loss = soft_cross_entropy(logits, rows, ids, 0.25 * y)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(math.log(VOCAB_SIZE))


def test_head_shape_and_initialisation():
    torch.manual_seed(0)
    head = TokenClassifier(width=64)
    assert head.linear.weight.shape == (VOCAB_SIZE, 64) and head.linear.bias.abs().max() == 0
    assert head.linear.weight.std().item() == pytest.approx(64**-0.5, rel=0.01)
    assert head.idf.df.dtype == head.idf.steps.dtype == torch.float64
    assert set(head.state_dict()) >= {"idf.df", "idf.steps"}  # saved in checkpoints


def test_classifier_updates_idf_before_weighting():
    """The head's forward: IDF update (current batch included), then the hand targets above."""
    head = TokenClassifier(width=4)
    head.idf = hand_state()
    text = torch.tensor([caption(320, 736, 320), caption(320, 1125)])
    out = head(torch.randn(2, 4), text)
    assert out["cls_logits"].shape == (2, VOCAB_SIZE) and head.idf.steps.item() == 2.0
    targets = dense(out["cls_rows"], out["cls_ids"], out["cls_targets"], 2)
    l125, l2 = math.log(1.25), math.log(2.0)
    assert targets[0, 736].item() == pytest.approx(l2 / (l125 + l2), abs=1e-12)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA only where lent


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_written_backward_is_autograds_bit_for_bit(dtype, device):
    gen = torch.Generator().manual_seed(2)
    text = torch.randint(1, 2000, (64, 20), generator=gen)
    text[:, 0], text[:, -1], text[3] = SOT, EOT, PAD  # row 3: padding only
    rows, ids, y = multi_hot(text)
    idf = OnlineIDF()
    idf.update(ids, y, batch=64)
    targets = soft_targets(rows, ids, y, idf.weights(64), 64)
    logits = 3 * torch.randn(64, VOCAB_SIZE, generator=gen)
    logits = logits.to(device, dtype).requires_grad_()
    rows, ids, targets = rows.to(device), ids.to(device), targets.to(device)
    results = []
    for loss_fn in (soft_cross_entropy, composed_soft_cross_entropy):
        loss = 0.7 * loss_fn(logits, rows, ids, targets)  # an outer factor, as cls_weight is
        (grad,) = torch.autograd.grad(loss, logits)
        results.append((loss, grad))
    (ours, ours_grad), (composed, composed_grad) = results
    assert ours_grad.dtype == dtype and ours_grad.device == logits.device
    if device == "cpu":
        assert torch.equal(ours, composed) and torch.equal(ours_grad, composed_grad)
    else:  # CUDA reductions and atomic index_put adds run in no fixed order
        torch.testing.assert_close(ours, composed, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours_grad, composed_grad)


@pytest.mark.parametrize("batch", [1, 2, 43, 100])
def test_logsumexp_by_blocks_of_rows_is_logsumexp(batch):
    # 42 rows of the vocabulary per block: 1 and 2 fit in one, 43 and 100 end on a partial one
    z = 5 * torch.randn(batch, VOCAB_SIZE, generator=torch.Generator().manual_seed(batch))
    z[0, :3] = torch.tensor([80.0, -float("inf"), 79.0])  # large and masked entries
    blocked = logsumexp_rows(z)
    assert blocked.shape == (batch,)
    torch.testing.assert_close(blocked, torch.logsumexp(z, dim=1), rtol=1e-6, atol=0)
