"""The one evaluator: retrieval both ways, zero-shot classification, linear probe.

Retrieval. Every test image has several captions. An image query is ranked by its best caption
(correct at k if any of its captions is within the top k); a caption query by its own image.
Ties are broken by index (an item with an equal score and a lower index ranks first), so ranks
are deterministic. Similarities are computed in query chunks: memory is O(N * chunk).
Per-query ranks go to ``eval_ranks.json`` for bootstrap confidence intervals, with each label
task's per-image correctness and the test-image index of each of those images.

Chance. Beside each metric, ``chance_<metric>`` is what a random ranking or a uniform guess
scores in expectation (retrieval: from the numbers of images and captions per image;
classification: 1 / classes), so that a number near it reads as what it is.

Zero-shot. For each label task of the manifest: class embedding = normalised mean of the
normalised embeddings of its prompts; prediction = argmax (first index on ties).

Linear probe. Multinomial logistic regression (scikit-learn, L-BFGS) on standardised frozen
features from the method's ``probe_features``, fit on labelled train-split images and scored on
the labelled test images. Covers image-only models too.

Standalone: ``python -m harness.evaluate RUN_DIR`` rebuilds the model from the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness.data.loader import eval_loader, prepare_batch
from harness.errors import DataError, NonFiniteEmbeddings
from harness.manifest import LabelTask, Manifest
from harness.specs import EvalConfig
from methods.base import Method

RECALL_KS = (1, 5, 10)


def check_finite(name: str, features: torch.Tensor) -> None:
    """Raise ``NonFiniteEmbeddings`` naming ``name`` and how many of its rows are not finite."""
    bad = int((~torch.isfinite(features)).any(dim=1).sum())
    if bad:
        raise NonFiniteEmbeddings(
            f"{bad} of {features.shape[0]} {name} are NaN or inf; the model's weights or "
            "activations are not finite (training diverged after its last loss check?)"
        )


# ---------------------------------------------------------------- retrieval (pure functions)


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of column ``target[r]`` in row r: higher scores first, then lower index first."""
    target_score = scores.gather(1, target[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_score) | ((scores == target_score) & (index[None] < target[:, None]))
    return ahead.sum(1)


@torch.no_grad()
def retrieval_ranks(
    image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each image's best caption, rank of each caption's image); 0 is the top.

    ``owner[j]`` is the image index of caption j. Embeddings are compared by dot product.
    """
    n_img, n_txt = image.shape[0], text.shape[0]
    t2i = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk_size):
        scores = text[s : s + chunk_size] @ image.T
        t2i[s : s + chunk_size] = _rank_of(scores, owner[s : s + chunk_size]).cpu()
    i2t = torch.empty(n_img, dtype=torch.long)
    text_index = torch.arange(n_txt, device=text.device)
    for s in range(0, n_img, chunk_size):
        rows = torch.arange(s, min(s + chunk_size, n_img), device=image.device)
        scores = image[rows] @ text.T
        positive = owner[None, :] == rows[:, None]
        # the best caption: highest score, lowest index among equal scores
        masked = scores.masked_fill(~positive, float("-inf"))
        best_score = masked.max(1, keepdim=True).values
        candidates = positive & (scores == best_score)
        best = torch.where(candidates, text_index[None], n_txt).min(1).values
        i2t[s : s + chunk_size] = _rank_of(scores, best).cpu()
    return i2t, t2i


def recall_at(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * int((ranks < k).sum()) / len(ranks)  # exact: counts, not a float32 mean


def retrieval_chance(owner: torch.Tensor, n_images: int) -> dict[str, float]:
    """``chance_<metric>``: the expected recall of a random ranking. A caption query's one
    image is within the top k of n images with probability k/n; an image query with c of the
    m captions is correct unless all c fall outside the top k: 1 - prod_j (m-k-j)/(m-j)."""
    m, counts = len(owner), torch.bincount(owner, minlength=n_images).tolist()
    out = {}
    for k in RECALL_KS:
        out[f"chance_i2t_r{k}"] = 100.0 * (
            1 - float(np.mean([_all_outside(m, k, c) for c in counts]))
        )
        out[f"chance_t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["chance_mean_r1"] = 0.5 * (out["chance_i2t_r1"] + out["chance_t2i_r1"])
    return out


def _all_outside(m: int, k: int, c: int) -> float:
    """Probability that none of c marked items of m is among k drawn without replacement."""
    return float(np.prod([max(0, m - k - j) / (m - j) for j in range(c)]))


def retrieval_metrics(i2t: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    out = {}
    for k in RECALL_KS:
        out[f"i2t_r{k}"] = recall_at(i2t, k)
        out[f"t2i_r{k}"] = recall_at(t2i, k)
    out["mean_r1"] = 0.5 * (out["i2t_r1"] + out["t2i_r1"])
    return out


# ---------------------------------------------------------------- zero-shot and probe


@torch.no_grad()
def zero_shot_classifier(
    method: Method, model: nn.Module, task: LabelTask, tokenize, device: torch.device
) -> torch.Tensor:
    """(classes, dim) normalised class embeddings from the task's prompt templates."""
    rows = []
    for name in task.classes:
        tokens = tokenize([t.format(name) for t in task.templates]).to(device)
        emb = method.embed_texts(model, tokens).float().mean(0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, C: float, max_iter: int
) -> np.ndarray:
    """Predicted test labels of a standardised multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(scaler.transform(train_x), train_y)
    return clf.predict(scaler.transform(test_x))


# ---------------------------------------------------------------- running it on a model


@dataclass
class _Embedded:
    image: torch.Tensor
    text: torch.Tensor | None
    owner: torch.Tensor
    probe: torch.Tensor
    labels: torch.Tensor
    corrupt: int  # samples the reader skipped as unreadable


def _probe_features(method, model, images, embedding=None) -> torch.Tensor:
    features = method.probe_features(model, images)
    if features is None:
        features = embedding if embedding is not None else method.embed_images(model, images)
    return features.float().cpu()


@torch.no_grad()
def _embed_split(method, model, loader, device, with_text: bool, where: str) -> _Embedded:
    """Embeddings of every readable sample; ``where`` names the split in errors."""
    images, texts, owners, probes, labels = [], [], [], [], []
    offset = corrupt = 0
    for batch in loader:
        corrupt += int(batch["corrupt"])
        if batch["image"].shape[0] == 0:  # only a count of corrupt samples
            continue
        batch = prepare_batch(batch, device)
        image = method.embed_images(model, batch["image"]).float().cpu()
        images.append(image)
        probes.append(_probe_features(method, model, batch["image"], image))
        if with_text:
            texts.append(method.embed_texts(model, batch["text"]).float().cpu())
        owners.append(batch["caption_owner"].cpu() + offset)
        labels.append(batch["labels"].cpu())
        offset += batch["image"].shape[0]
    if not images:
        raise DataError(f"{where} has no readable sample to evaluate ({corrupt} corrupt)")
    return _Embedded(
        image=torch.cat(images),
        text=torch.cat(texts) if with_text else None,
        owner=torch.cat(owners),
        probe=torch.cat(probes),
        labels=torch.cat(labels),
        corrupt=corrupt,
    )


@torch.no_grad()
def _probe_train_features(method, model, manifest, config, loader_kwargs, device):
    """Features and labels of the first labelled train images (only labelled ones are embedded)."""
    want = config.probe_train_samples
    feats, labels = [], []
    have = 0
    for batch in eval_loader(manifest, config.probe_split, labelled_only=True, **loader_kwargs):
        keep = (batch["labels"] >= 0).any(1)
        if not keep.any():
            continue
        image = prepare_batch({"image": batch["image"][keep]}, device)["image"]
        feats.append(_probe_features(method, model, image))
        labels.append(batch["labels"][keep])
        have += int(keep.sum())
        if have >= want:
            break
    if not feats:
        return None, None
    features = torch.cat(feats)[:want]
    check_finite(f"{config.probe_split} probe features", features)
    return features.numpy(), torch.cat(labels)[:want].numpy()


def evaluate(
    method: Method,
    model: nn.Module,
    manifest: Manifest,
    config: EvalConfig,
    *,
    image_size: int,
    context_length: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """(flat metrics, per-query results) for one trained model."""
    model.eval()
    method.eval()
    loader_kwargs = dict(
        batch_size=config.batch_size, image_size=image_size, context_length=context_length
    )
    loader = eval_loader(manifest, config.split, **loader_kwargs)
    tokenize = loader.dataset.tokenizer
    with_text = method.has_text_tower(model)
    where = f"split {config.split!r} of {manifest.root}"
    test = _embed_split(method, model, loader, device, with_text, where)
    check_finite(f"{config.split} image embeddings", test.image)
    if with_text:
        check_finite(f"{config.split} caption embeddings", test.text)
    check_finite(f"{config.split} probe features", test.probe)
    metrics: dict[str, float] = {
        "num_test_images": float(test.image.shape[0]),
        "num_test_captions": float(test.owner.shape[0]),
        "num_test_corrupt": float(test.corrupt),  # skipped: the metrics are over the rest
    }
    per_query: dict[str, list[int]] = {}
    if with_text:
        i2t, t2i = retrieval_ranks(test.image, test.text, test.owner, chunk_size=config.chunk_size)
        metrics.update(retrieval_metrics(i2t, t2i))
        metrics.update(retrieval_chance(test.owner, test.image.shape[0]))
        per_query.update(
            i2t_rank=i2t.tolist(), t2i_rank=t2i.tolist(), caption_owner=test.owner.tolist()
        )
        zs = _zero_shot(method, model, manifest, test, tokenize, device)
        metrics.update(zs[0])
        per_query.update(zs[1])
    probe = _probe(method, model, manifest, config, loader_kwargs, test, device)
    metrics.update(probe[0])
    per_query.update(probe[1])
    return metrics, per_query


def _zero_shot(method, model, manifest, test, tokenize, device):
    metrics, per_query, accs = {}, {}, []
    for t, task in enumerate(manifest.label_tasks):
        has = test.labels[:, t] >= 0
        if not has.any():
            continue
        classifier = zero_shot_classifier(method, model, task, tokenize, device).cpu()
        pred = (test.image[has] @ classifier.T).argmax(1)
        correct = (pred == test.labels[has, t]).long()
        metrics[f"zeroshot_{task.name}_top1"] = 100.0 * int(correct.sum()) / len(correct)
        metrics[f"chance_zeroshot_{task.name}_top1"] = 100.0 / len(task.classes)
        per_query[f"zeroshot_{task.name}_correct"] = correct.tolist()
        per_query[f"zeroshot_{task.name}_image"] = has.nonzero().flatten().tolist()
        accs.append(metrics[f"zeroshot_{task.name}_top1"])
    if accs:
        metrics["zeroshot_mean_top1"] = float(np.mean(accs))
        metrics["chance_zeroshot_mean_top1"] = float(
            np.mean([v for k, v in metrics.items() if k.startswith("chance_zeroshot_")])
        )
    return metrics, per_query


def _probe(method, model, manifest, config, loader_kwargs, test, device):
    metrics, per_query, accs = {}, {}, []
    if not manifest.label_tasks or config.probe_train_samples <= 0:
        return metrics, per_query
    train_x, train_y = _probe_train_features(method, model, manifest, config, loader_kwargs, device)
    if train_x is None:
        return metrics, per_query
    for t, task in enumerate(manifest.label_tasks):
        tr, te = train_y[:, t] >= 0, (test.labels[:, t] >= 0).numpy()
        if tr.sum() < 2 or len(np.unique(train_y[tr, t])) < 2 or not te.any():
            continue
        pred = linear_probe(
            train_x[tr],
            train_y[tr, t],
            test.probe.numpy()[te],
            C=config.probe_C,
            max_iter=config.probe_max_iter,
        )
        correct = (pred == test.labels.numpy()[te, t]).astype(int)
        metrics[f"linprobe_{task.name}_top1"] = 100.0 * float(correct.mean())
        metrics[f"chance_linprobe_{task.name}_top1"] = 100.0 / len(task.classes)
        per_query[f"linprobe_{task.name}_correct"] = correct.tolist()
        per_query[f"linprobe_{task.name}_image"] = np.flatnonzero(te).tolist()
        accs.append(metrics[f"linprobe_{task.name}_top1"])
    if accs:
        metrics["linprobe_mean_top1"] = float(np.mean(accs))
        metrics["chance_linprobe_mean_top1"] = float(
            np.mean([v for k, v in metrics.items() if k.startswith("chance_linprobe_")])
        )
    return metrics, per_query
