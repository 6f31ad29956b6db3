"""Retrieval metrics on hand-built embeddings with known ranks (several captions per image, ties)."""

import pytest
import torch

from harness.evaluator import (
    NonFiniteEmbeddings,
    _embed_split,
    check_finite,
    recall_at,
    retrieval_metrics,
    retrieval_ranks,
)
from harness.manifest import DataError

# scores[i, j] = similarity of image i and caption j; caption owners below.
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.9, 0.6, 0.2],  # image 0: best own caption t0 ties t2 (higher index) -> rank 0
        [0.8, 0.8, 0.3, 0.1, 0.9],  # image 1: own caption t2 has three captions above -> rank 3
        [0.2, 0.6, 0.6, 0.6, 0.1],  # image 2: best own t3 (0.6) ties t1, t2 at lower index -> 2
    ]
)
OWNER = torch.tensor([0, 0, 1, 2, 2])
EXPECTED_I2T = [0, 3, 2]
# t0: img0 top -> 0; t1: 0.8, 0.6 above img0's 0.5 -> 2; t2: 0.9, 0.6 above 0.3 -> 2;
# t3: img0 ties img2 at 0.6 and has the lower index -> 1; t4: 0.9, 0.2 above 0.1 -> 2
EXPECTED_T2I = [0, 2, 2, 1, 2]


def embeddings():
    # one-hot images make image . text equal to the chosen score exactly (ties stay exact)
    return torch.eye(3), SCORES.T.contiguous()


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_known_ranks_with_ties_and_several_captions(chunk):
    image, text = embeddings()
    i2t, t2i = retrieval_ranks(image, text, OWNER, chunk_size=chunk)
    assert i2t.tolist() == EXPECTED_I2T
    assert t2i.tolist() == EXPECTED_T2I


def test_recall_values():
    image, text = embeddings()
    metrics = retrieval_metrics(*retrieval_ranks(image, text, OWNER))
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["t2i_r1"] == pytest.approx(20.0)
    assert metrics["i2t_r5"] == metrics["t2i_r5"] == 100.0
    assert metrics["mean_r1"] == pytest.approx(0.5 * (100 / 3 + 20.0))


def reference_ranks(image, text, owner):
    """Brute force: full stable sort of every row (descending score, ascending index)."""
    scores = image @ text.T

    def position(row, target):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        return order.index(target)

    t2i = [position(scores[:, j].tolist(), int(owner[j])) for j in range(text.shape[0])]
    i2t = [
        min(position(scores[i].tolist(), j) for j in range(text.shape[0]) if owner[j] == i)
        for i in range(image.shape[0])
    ]
    return i2t, t2i


def test_matches_brute_force_on_random_data_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(-2, 3, (40, 4), generator=gen).float()  # small integers: many ties
    owner = torch.arange(40).repeat_interleave(3)[torch.randperm(120, generator=gen)]
    text = torch.randint(-2, 3, (120, 4), generator=gen).float()
    i2t, t2i = retrieval_ranks(image, text, owner, chunk_size=7)
    ref_i2t, ref_t2i = reference_ranks(image, text, owner)
    assert i2t.tolist() == ref_i2t
    assert t2i.tolist() == ref_t2i


def test_recall_at_counts_ranks_below_k():
    assert recall_at(torch.tensor([0, 1, 5, 9, 10]), 10) == pytest.approx(80.0)


def test_non_finite_embeddings_are_refused_with_a_count():
    features = torch.randn(5, 4)
    check_finite("test image embeddings", features)  # finite: no error
    features[1, 2] = float("nan")
    features[3] = float("inf")
    with pytest.raises(NonFiniteEmbeddings, match="2 of 5 test image embeddings are NaN or inf"):
        check_finite("test image embeddings", features)


def test_a_split_with_no_readable_sample_is_refused_by_name():
    only_a_count = {"image": torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "corrupt": torch.tensor(3)}
    with pytest.raises(DataError, match=r"split 'test' of /d has no readable .* \(3 corrupt\)"):
        _embed_split(None, None, [only_a_count], torch.device("cpu"), True, "split 'test' of /d")
