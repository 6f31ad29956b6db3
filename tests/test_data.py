"""The data pipeline: exactly once per epoch across ranks x workers, deterministic resume."""

import io
import itertools
from collections import Counter
from dataclasses import replace

import pytest
import torch

from harness.data.loader import make_loader, prepare_batch
from harness.data.samples import random_resized_box
from harness.data.stream import ShardStream, in_one_storage
from harness.manifest import DataError, check_shards, load_manifest


def indices(manifest, *, rank, world, workers, epochs=1, skip=0, batch=7, train=True):
    stream = ShardStream(
        manifest, "train", batch_size=batch, image_size=32, context_length=36, train=train,
        augment="open_clip", seed=3, rank=rank, world_size=world, num_workers=workers,
        shuffle_buffer=20, epochs=epochs, skip_batches=skip,
    )  # fmt: skip
    return [i for b in make_loader(stream, workers) for i in b["index"].tolist()]


@pytest.mark.parametrize("epochs", [1, 2])
def test_every_sample_exactly_once_per_epoch_2_ranks_x_2_workers(tiny_data, epochs):
    manifest = load_manifest(tiny_data)
    seen = Counter()
    for rank in range(2):
        seen.update(indices(manifest, rank=rank, world=2, workers=2, epochs=epochs))
    assert set(seen) == set(range(manifest.split("train").num_samples))
    assert set(seen.values()) == {epochs}


def test_fewer_shards_than_readers_still_exactly_once(tiny_data):
    full = load_manifest(tiny_data)
    train = full.splits["train"]
    few = replace(full, splits={**full.splits, "train": replace(train, shards=train.shards[:3])})
    seen = Counter()
    for rank in range(2):
        seen.update(indices(few, rank=rank, world=2, workers=2))
    expected = {
        i for s in train.shards[:3] for i in range(s.first_index, s.first_index + s.num_samples)
    }
    assert set(seen) == expected and set(seen.values()) == {1}


def test_order_is_deterministic_and_skip_resumes_exactly(tiny_data):
    manifest = load_manifest(tiny_data)
    full = indices(manifest, rank=0, world=1, workers=2, epochs=2)
    again = indices(manifest, rank=0, world=1, workers=2, epochs=2)
    assert full == again
    resumed = indices(manifest, rank=0, world=1, workers=2, epochs=2, skip=5)
    assert resumed == full[5 * 7 :]


def test_epochs_are_shuffled_differently(tiny_data):
    manifest = load_manifest(tiny_data)
    two = indices(manifest, rank=0, world=1, workers=1, epochs=2)
    # the shuffle buffer spans the epoch boundary, so compare orders, not exact halves
    assert two[:400] != two[400:]
    assert Counter(two) == Counter({i: 2 for i in range(400)})


def test_eval_batches_keep_every_caption_and_owner(tiny_data):
    manifest = load_manifest(tiny_data)
    stream = ShardStream(
        manifest, "test", batch_size=16, image_size=32, context_length=36, train=False, epochs=1
    )
    batches = list(make_loader(stream, 0))
    assert sum(b["image"].shape[0] for b in batches) == 60
    first = batches[0]
    assert first["text"].shape == (16 * 3, 36)  # 3 captions per test image in this fixture
    assert first["caption_owner"].tolist() == [i for i in range(16) for _ in range(3)]
    assert first["image"].dtype == torch.uint8


def test_a_workers_batch_arrives_as_one_shared_storage_with_the_same_values(tiny_data):
    """One storage per batch: the training process receives one file descriptor per batch
    from a worker instead of one per tensor (the round trips cost the step milliseconds).
    Looked at unpinned: pinning (on by default where CUDA is) copies each tensor on its own."""
    manifest = load_manifest(tiny_data)
    for train in (True, False):
        stream = ShardStream(
            manifest, "train" if train else "test", batch_size=9, image_size=32,
            context_length=36, train=train, augment="open_clip", seed=3, epochs=1,
            label_tasks=[t.name for t in manifest.label_tasks],
        )  # fmt: skip
        from_worker = next(iter(make_loader(stream, 1, pin_memory=False)))
        in_process = next(iter(make_loader(stream, 0, pin_memory=False)))
        assert from_worker.keys() == in_process.keys()
        assert len({t.untyped_storage().data_ptr() for t in from_worker.values()}) == 1
        for key, tensor in in_process.items():
            assert torch.equal(from_worker[key], tensor), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning is for copies to a GPU")
def test_batches_arrive_pinned_where_cuda_is(tiny_data):
    manifest = load_manifest(tiny_data)
    stream = ShardStream(
        manifest, "train", batch_size=9, image_size=32, context_length=36, train=True,
        augment="open_clip", seed=3, epochs=1, label_tasks=[],
    )  # fmt: skip
    batch = next(iter(make_loader(stream, 1)))
    assert all(t.is_pinned() for t in batch.values() if t.numel())


def test_in_one_storage_keeps_values_dtypes_and_shapes():
    image = torch.arange(2 * 5 * 5 * 3, dtype=torch.uint8).reshape(2, 5, 5, 3).permute(0, 3, 1, 2)
    tensors = {
        "image": image,  # not contiguous: packed as NCHW
        "text": torch.arange(7 * 3).reshape(7, 3),
        "corrupt": torch.tensor(4),
        "empty": torch.zeros(0, 2, dtype=torch.long),
        "odd": torch.ones(3, dtype=torch.uint8),
        "floats": torch.randn(5, dtype=torch.float64),
    }
    packed = in_one_storage(tensors)
    assert len({t.untyped_storage().data_ptr() for t in packed.values()}) == 1
    for key, tensor in tensors.items():
        assert packed[key].dtype == tensor.dtype and packed[key].is_contiguous(), key
        assert torch.equal(packed[key], tensor), key


def test_prepare_batch_normalises_on_device():
    batch = {"image": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), "text": torch.zeros(2, 5)}
    out = prepare_batch(batch, torch.device("cpu"))
    assert out["image"].dtype == torch.float32
    assert out["image"][0, 0, 0, 0] == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-5)


def test_random_resized_box_stays_inside_and_is_seeded():
    import random

    boxes = [random_resized_box(48, 40, random.Random(s)) for s in range(50)]
    assert all(0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 40 for x0, y0, x1, y1 in boxes)
    assert boxes == [random_resized_box(48, 40, random.Random(s)) for s in range(50)]


def test_corrupt_samples_are_skipped_and_counted(tiny_data, tmp_path):
    import io
    import json
    import tarfile

    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for i, payload in enumerate([b"not an image", None]):
            meta = json.dumps({"index": i, "captions": ["a red circle"]}).encode()
            for ext, data in (("png", payload), ("json", meta)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    good = load_manifest(tiny_data)
    shard = good.splits["test"].shards[0]
    mixed = replace(
        good,
        root=tmp_path,
        splits={"test": replace(good.splits["test"], shards=[replace(shard, path="bad.tar")])},
    )
    stream = ShardStream(
        mixed, "test", batch_size=4, image_size=32, context_length=36, train=False, epochs=1
    )
    # nothing decodable, no crash: one batch with no image carries the count
    (batch,) = list(make_loader(stream, 0))
    assert batch["image"].shape == (0, 3, 32, 32) and batch["text"].shape == (0, 36)
    assert int(batch["corrupt"]) == 2


def test_corrupt_samples_after_the_last_full_batch_are_still_counted(tiny_data, tmp_path):
    import tarfile

    good = load_manifest(tiny_data)
    shard = good.splits["test"].shards[0]
    with tarfile.open(good.root / shard.path) as src, tarfile.open(tmp_path / "t.tar", "w") as out:
        members = src.getmembers()[:8]  # the first four samples: json and png each
        for member in members:
            out.addfile(member, src.extractfile(member))
        for member in members[:4]:  # then two samples whose images are garbage
            payload = src.extractfile(member).read()
            payload = b"not an image" if member.name.endswith(".png") else payload
            bad = tarfile.TarInfo("bad-" + member.name)
            bad.size = len(payload)
            out.addfile(bad, io.BytesIO(payload))
    mixed = replace(
        good, root=tmp_path,
        splits={"test": replace(good.splits["test"], shards=[replace(shard, path="t.tar")])},
    )  # fmt: skip
    stream = ShardStream(
        mixed, "test", batch_size=4, image_size=32, context_length=36, train=False, epochs=1
    )
    batches = list(make_loader(stream, 0))
    assert [b["image"].shape[0] for b in batches] == [4, 0]
    assert [int(b["corrupt"]) for b in batches] == [0, 2]


def _damage(path, how: str) -> None:
    """Cut or garble ``path`` (a tar of json+png samples) inside sample 10."""
    import tarfile

    with tarfile.open(path) as tar:
        members = [m for m in tar if m.name.startswith("00000010")]
    data = bytearray(path.read_bytes())
    if how == "cut in a member":
        data = data[: members[1].offset_data + 5]
    elif how == "cut in a header":
        data = data[: members[0].offset + 100]
    elif how == "garbled header":
        data[members[0].offset + 148 : members[0].offset + 156] = b"garbage!"  # its checksum
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["intact", "cut in a member", "cut in a header", "garbled header"])
def test_a_damaged_shard_keeps_what_precedes_the_damage_and_counts_it(tiny_data, tmp_path, how):
    import shutil

    good = load_manifest(tiny_data)
    shard = good.splits["train"].shards[0]
    shutil.copy(good.root / shard.path, tmp_path / shard.path)
    if how != "intact":
        _damage(tmp_path / shard.path, how)
    one = replace(
        good, root=tmp_path, splits={"train": replace(good.splits["train"], shards=[shard])}
    )
    stream = ShardStream(
        one, "train", batch_size=64, image_size=32, context_length=36, train=False, epochs=1
    )
    batches = list(make_loader(stream, 0))
    seen = [i for b in batches for i in b["index"].tolist()]
    corrupt = sum(int(b["corrupt"]) for b in batches)
    if how == "intact":
        assert seen == list(range(shard.first_index, shard.first_index + 50)) and corrupt == 0
    else:
        assert seen == list(range(shard.first_index, shard.first_index + 10)) and corrupt >= 1


def test_missing_shard_and_bad_checksum_are_refused(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data.parent, copy)
    manifest = load_manifest(copy)
    shard = copy / manifest.splits["train"].shards[0].path
    with open(shard, "r+b") as f:
        f.seek(600)
        f.write(b"garbage")
    with pytest.raises(DataError, match="sha256"):
        check_shards(manifest, checksums=True)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        check_shards(manifest, checksums=False)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "nowhere")


def test_cached_tokenizer_gives_open_clips_ids():
    import random

    import open_clip

    from data_tools.builtin import caption, random_scene
    from harness.data.tokenizer import Tokenizer

    rng = random.Random(0)
    texts = [caption(random_scene(rng, 3), rng) for _ in range(300)]
    texts += ["Héllo wörld!! 123 &amp; <b>x</b>", "word " * 60, "", "it's 😀 日本語", "A  B\tc"]
    texts += [
        "â€œmojibakeâ€\x9d",
        "ｆｕｌｌ ｗｉｄｔｈ",
        "ﬁne",
        "a\x1b[31mred",
        "x\r\ny",
        " Caps  ",
    ]
    # random text: printable ASCII (the fast path) mixed with what ftfy and unescaping change
    pieces = [*"abcXYZ019 .,'!?-_<>/\\\"", "&", "&amp;", "&lt;", "&#39;", "\t", "\n", "\x00"]
    pieces += ["\x7f", "\x85", "é", "Ã©", "“", "ﬀ", "\u200b", "\xa0", "  ", "'s", "'LL"]
    texts += ["".join(rng.choices(pieces, k=rng.randint(0, 40))) for _ in range(2000)]
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=36)
    ours = Tokenizer(context_length=36)
    assert torch.equal(ours(texts), reference(texts))
    assert torch.equal(ours(texts[::-1]), reference(texts[::-1]))  # again, from the word cache
    assert torch.equal(ours("One text", context_length=5), reference("One text", context_length=5))
    assert sum(t.isascii() and t.isprintable() and "&" not in t for t in texts) > 300  # fast path


class _Niceness(torch.utils.data.IterableDataset):
    def __iter__(self):
        import os

        yield os.nice(0)


def test_loader_workers_run_at_the_configured_nice_value():
    import os

    from harness.specs import DataConfig

    parent = os.nice(0)
    assert next(iter(make_loader(_Niceness(), 1, worker_nice=5))) == min(19, parent + 5)
    assert next(iter(make_loader(_Niceness(), 1))) == parent
    with pytest.raises(ValueError, match="worker_nice"):
        DataConfig(worker_nice=20)


def _tar_with_every_kind_of_header(path, fmt) -> None:
    """Plain members, then a pax long name, a directory, a symlink, a non-ASCII name, plain."""
    import tarfile

    def add(tar, name, data=b"", kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mtime = kind, len(data), 0
        if kind == tarfile.SYMTYPE:
            info.linkname = "0000.txt"
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(3):
            add(tar, f"{i:04d}.txt", f"caption {i}".encode())
        add(tar, "prefix/" * 20 + "p.txt", b"a name split over ustar's prefix field")
        if fmt != tarfile.USTAR_FORMAT:  # plain ustar holds neither of these two
            add(tar, "d/" + "x" * 120 + ".txt", b"long name")
            add(tar, "é.txt", b"non-ascii name")
        add(tar, "somedir", kind=tarfile.DIRTYPE)
        add(tar, "link.txt", kind=tarfile.SYMTYPE)
        add(tar, "__meta__", b"webdataset metadata")
        add(tar, "0005.txt", b"")
        add(tar, "0006.txt", b"x" * 513)


@pytest.mark.parametrize("fmt", ["PAX_FORMAT", "GNU_FORMAT", "USTAR_FORMAT"])
def test_shard_members_are_tarfiles_regular_files_whatever_the_headers(tmp_path, fmt):
    import tarfile
    import types

    from harness.data.tar import PlainUstarMembers

    path = tmp_path / "s.tar"
    _tar_with_every_kind_of_header(path, getattr(tarfile, fmt))
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    expected = [(n, d) for n, d in expected if n != "__meta__"]
    reader = types.SimpleNamespace(broken=0)
    got = [(m["fname"], m["data"]) for m in ShardStream._tar_members(reader, str(path))]
    assert got == expected and reader.broken == 0
    assert len(expected) == (6 if fmt == "USTAR_FORMAT" else 8)  # every regular file came through
    if fmt == "USTAR_FORMAT":  # the prefixed name was read without tarfile
        assert [n for n, _, _ in PlainUstarMembers(path.read_bytes())][-1] == expected[3][0]


def test_plain_ustar_reader_hands_over_at_the_first_header_it_does_not_handle(tmp_path):
    import tarfile

    from harness.data.tar import PlainUstarMembers

    path = tmp_path / "s.tar"
    _tar_with_every_kind_of_header(path, tarfile.PAX_FORMAT)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    data = path.read_bytes()
    plain = PlainUstarMembers(data)
    assert [(n, data[s : s + z]) for n, s, z in plain] == [
        (f"{i:04d}.txt", f"caption {i}".encode()) for i in range(3)
    ]
    assert plain.offset == members[3].offset and not plain.at_end  # the pax header
    garbled = bytearray(data)
    garbled[members[1].offset + 148 : members[1].offset + 156] = b"0000000\0"  # wrong checksum
    stops = PlainUstarMembers(bytes(garbled))
    assert len(list(stops)) == 1 and stops.offset == members[1].offset
    only_plain = PlainUstarMembers(data[: members[3].offset] + bytes(1024))
    assert len(list(only_plain)) == 3 and only_plain.at_end


def test_images_decode_to_pillows_rgb_pixels_whatever_the_png_kind(monkeypatch):
    import numpy as np
    import pyspng
    from PIL import Image

    from harness.data.samples import decode_image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    kinds = {
        "RGB": rgb, "P": rgb.convert("P"), "L": rgb.convert("L"), "LA": rgb.convert("LA"),
        "RGBA": rgb.convert("RGBA"), "1": rgb.convert("1"), "I;16": rgb.convert("I;16"),
    }  # fmt: skip
    fast_calls = []
    real_load = pyspng.load
    monkeypatch.setattr(pyspng, "load", lambda data: fast_calls.append(1) or real_load(data))
    for mode, image in kinds.items():
        for fmt in ("PNG", "JPEG") if mode == "RGB" else ("PNG",):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt)
            data = buffer.getvalue()
            expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            decoded = decode_image({"png": data})
            assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), expected), mode
    assert len(fast_calls) == 1  # only the 8-bit RGB PNG took libspng's path
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    broken = buffer.getvalue()[:-40]  # cut inside the image data: no decoder makes pixels
    with pytest.raises(OSError, match="truncated"):  # Pillow's error: libspng's was caught
        decode_image({"png": broken})


def test_a_resumed_reader_skips_the_corrupt_samples_it_had_consumed(tiny_data, tmp_path):
    from tests.test_faults import copy_with_broken_pngs

    copy_with_broken_pngs(tiny_data, tmp_path / "data", "train")  # 5 of shard 0's 50 samples
    manifest = load_manifest(tmp_path / "data")

    def batches(skip=0, skip_samples=None):
        stream = ShardStream(
            manifest, "train", batch_size=7, image_size=32, context_length=36, train=True,
            augment="open_clip", seed=3, num_workers=2, shuffle_buffer=20, epochs=2,
            skip_batches=skip, skip_samples=skip_samples,
        )  # fmt: skip
        return [
            (b["index"].tolist(), int(b["corrupt"]), int(b["consumed"]))
            for b in make_loader(stream, 2)
        ]

    full = batches()
    stop = 60  # each reader is past its first epoch, shard 0 included
    assert sum(corrupt for _, corrupt, _ in full[:stop]) >= 5
    readers = [full[stop - 2][2], full[stop - 1][2]]  # batch i came from reader i % 2
    assert [i for i, _, _ in batches(stop, readers)] == [i for i, _, _ in full[stop:]]
    # counting the batches alone re-serves as many samples as were corrupt
    assert [i for i, _, _ in batches(stop)] != [i for i, _, _ in full[stop:]]


# ---------------------------------------------------------------- distinct images per batch


@pytest.fixture(scope="module")
def images_48(tmp_path_factory):
    """48 training images in 3 shards: one reader's epoch is 1.5 batches of 32."""
    from data_tools.builtin import BuiltinSpec, build

    spec = BuiltinSpec(num_train=48, num_test=8, shard_size=16, test_captions=2, image_size=16)
    return build(spec, tmp_path_factory.mktemp("data48") / "d", workers=1, verbose=False)


def train_batches(manifest, count, *, batch, rank=0, world=1, workers=1, skip=None, pending=None):
    """The first ``count`` training batches of one rank's endless stream."""
    stream = ShardStream(
        manifest, "train", batch_size=batch, image_size=16, context_length=36, train=True,
        augment="open_clip", seed=5, rank=rank, world_size=world, num_workers=workers,
        shuffle_buffer=2000, skip_samples=skip, skip_pending=pending,
    )  # fmt: skip
    return list(itertools.islice(make_loader(stream, workers), count))


def test_no_batch_holds_an_image_twice_on_48_images_at_batch_32(images_48):
    manifest = load_manifest(images_48)
    batches = train_batches(manifest, 30, batch=32)  # 20 epochs
    seen = Counter()
    for b in batches:
        index = b["index"].tolist()
        assert len(set(index)) == len(index) == 32, sorted(index)
        seen.update(index)
        # every sample once per epoch: no image is ever a whole epoch ahead of another
        counts = [seen[i] for i in range(48)]
        assert max(counts) - min(counts) <= 1
    assert sum(len(b["pending"]) > 0 for b in batches) > 0  # the boundary case did happen


def test_a_finite_stream_reads_every_sample_once_per_epoch_in_distinct_batches(images_48):
    manifest = load_manifest(images_48)
    stream = ShardStream(
        manifest, "train", batch_size=32, image_size=16, context_length=36, train=True,
        seed=5, num_workers=1, shuffle_buffer=20, epochs=5,
    )  # fmt: skip
    batches = [b["index"].tolist() for b in make_loader(stream, 1)]
    assert all(len(set(b)) == len(b) for b in batches)
    assert Counter(i for b in batches for i in b) == Counter({i: 5 for i in range(48)})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reader_resumes_with_the_samples_that_were_waiting_for_a_batch(tiny_data, workers):
    manifest = load_manifest(tiny_data)
    full = train_batches(manifest, 40, batch=64, workers=workers)  # 400 images: 6.4 epochs
    stop = next(k for k in range(workers, 40) if len(full[k - 1]["pending"]) > 0)
    last = {(k % workers): full[k] for k in range(stop)}  # each reader's last batch before stop
    skip = [int(last[r]["consumed"]) for r in range(workers)]
    waiting = [last[r]["pending"].tolist() for r in range(workers)]
    stream = ShardStream(
        manifest, "train", batch_size=64, image_size=16, context_length=36, train=True,
        augment="open_clip", seed=5, num_workers=workers, shuffle_buffer=2000,
        skip_batches=stop, skip_samples=skip, skip_pending=waiting,
    )  # fmt: skip
    resumed = list(itertools.islice(make_loader(stream, workers), 40 - stop))
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in full[stop:]]
    assert torch.equal(resumed[0]["image"], full[stop]["image"])  # same crops, same captions
    assert torch.equal(resumed[0]["text"], full[stop]["text"])


def test_each_rank_batch_is_distinct_on_the_2_rank_x_2_worker_split(tiny_data):
    manifest = load_manifest(tiny_data)
    for rank in range(2):
        # 100 images per reader an epoch, batches of 64: every other batch spans a boundary
        for b in train_batches(manifest, 24, batch=64, rank=rank, world=2, workers=2):
            index = b["index"].tolist()
            assert len(set(index)) == len(index) == 64


def test_a_reader_with_fewer_images_than_a_batch_is_refused():
    from harness.data.stream import DistinctBatcher

    batcher = DistinctBatcher(4, distinct=True)
    for position in range(5):  # one image, again and again: 1 in the batch, 4 waiting
        batcher.offer(position, {"index": 0})
    with pytest.raises(DataError, match="fewer distinct readable images than a batch"):
        batcher.offer(5, {"index": 0})
    evaluation = DistinctBatcher(2, distinct=False)  # evaluation keeps every sample
    evaluation.offer(0, {"index": 0})
    evaluation.offer(1, {"index": 0})
    assert evaluation.full


def test_a_batch_larger_than_one_readers_epoch_is_refused_before_training(images_48, tmp_path):
    from harness import config
    from harness.errors import ConfigError
    from harness.plan import check_data_fits

    def check(batch: int, workers: int, world: int) -> None:
        bindings = [
            f"DATA='{images_48}'",
            f"DataConfig.num_workers={workers}",
            f"BATCH_SIZE={batch}",
        ]
        config.parse(["configs/smoke.gin"], bindings)
        check_data_fits(config.resolve(), load_manifest(images_48), world_size=world)

    check(32, workers=1, world=1)  # one reader sees all 48 images
    with pytest.raises(ConfigError, match=r"one reader gets as few as 16 training samples"):
        check(32, workers=2, world=1)  # 3 shards of 16 over 2 readers
    check(16, workers=2, world=1)
