"""Converters, manifest-only datasets and the validator, on tiny fixtures built here.

Every converter is checked for: each valid image arriving exactly once with all its cleaned
captions, splits disjoint by image, missing/corrupt/empty entries reported by name; plus resume,
determinism, bad-input errors, and the harness reader on a converted dataset.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools import coco, folder, pairs, validate
from data_tools import manifest as manifest_tool
from data_tools.shards import Item, Record, WriterOptions, assign_splits, convert
from harness.data.loader import eval_loader, make_loader
from harness.data.stream import ShardStream
from harness.files import sha256_file
from harness.manifest import LabelTask, load_manifest
from tests.conftest import run_cli

QUIET = ["--no-progress"]


# ---------------------------------------------------------------- fixture helpers


def make_image(path: Path, size=(24, 16), colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff not really a jpeg")
    return path


def read_dataset(out: Path) -> dict[str, dict[str, dict]]:
    """split -> source -> {"captions", "index", "ext", "image"}; fails on a repeated source."""
    manifest = load_manifest(out)
    found: dict[str, dict[str, dict]] = {}
    for split in manifest.splits:
        found[split] = {}
        for path in manifest.shard_paths(split):
            for sample in wds.tarfile_samples([{"url": path}]):
                meta = json.loads(sample["json"])
                ext = next(k for k in ("png", "jpg", "jpeg", "webp") if k in sample)
                assert meta["source"] not in found[split], meta["source"]
                found[split][meta["source"]] = {
                    "captions": meta["captions"],
                    "index": meta["index"],
                    "ext": ext,
                    "image": Image.open(io.BytesIO(sample[ext])),
                }
    return found


def skipped(out: Path) -> dict[str, list[str]]:
    """source -> reasons, from the manifest."""
    reasons: dict[str, list[str]] = {}
    for entry in load_manifest(out).skipped:
        reasons.setdefault(entry["source"], []).append(entry["reason"])
    return reasons


def all_samples(data: dict[str, dict[str, dict]]) -> dict[str, list[str]]:
    return {s: v["captions"] for split in data.values() for s, v in split.items()}


# ---------------------------------------------------------------- COCO


@pytest.fixture
def coco_input(tmp_path) -> dict:
    """8 good images (one PNG), a corrupt one, a missing one, one whose only caption is blank."""
    images = tmp_path / "images"
    entries, annotations, expected = [], [], {}
    for i in range(8):
        name = f"{i:012d}.png" if i == 5 else f"{i:012d}.jpg"
        make_image(images / name, size=(20 + i, 16), colour=(30 * i, 90, 150))
        entries.append({"id": i, "file_name": name})
        expected[name] = [f"image {i} says {k}" for k in range(1 + i % 3)]
    corrupt(images / "corrupt.jpg")
    make_image(images / "blank.jpg")
    entries += [
        {"id": 100, "file_name": "corrupt.jpg"},
        {"id": 101, "file_name": "missing.jpg"},
        {"id": 102, "file_name": "blank.jpg"},
    ]
    ann_id = 0
    for entry in entries:
        for caption in expected.get(entry["file_name"], ["something"]):
            ann_id += 1
            messy = "  " + caption.replace(" ", " \n\t ") + " "  # cleaned back to `caption`
            annotations.append({"id": ann_id, "image_id": entry["id"], "caption": messy})
    annotations[-1]["caption"] = "   "  # blank.jpg: its only caption is empty
    annotations.append({"id": 999, "image_id": 555, "caption": "an orphan"})
    annotations.reverse()  # order in the file must not matter: captions follow annotation id
    captions = tmp_path / "captions_val.json"
    captions.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return {"images": images, "captions": captions, "expected": expected, "tmp": tmp_path}


def run_coco(data: dict, out: Path, *extra: str) -> None:
    args = ["--images", str(data["images"]), "--captions", str(data["captions"])]
    assert coco.main([*args, "--out", str(out), *extra, *QUIET]) == 0


def test_coco_every_valid_image_once_with_all_captions(coco_input, tmp_path):
    out = tmp_path / "out"
    run_coco(coco_input, out, "--shard-size", "3", "--workers", "2")
    data = read_dataset(out)
    assert all_samples(data) == coco_input["expected"]
    assert not set(data["train"]) & set(data["test"])
    # 9 images exist with a caption (8 good + the corrupt one): round(0.2 * 9) = 2 test images;
    # with seed 0 the corrupt one ranks into train, which is left with 6
    assert len(data["test"]) == 2 and len(data["train"]) == 6
    for split in data.values():  # stable, unique indices (the corrupt image's is simply absent)
        assert len({v["index"] for v in split.values()}) == len(split)
    reasons = skipped(out)
    assert reasons["missing.jpg"] == ["missing file"]
    assert "cannot decode image" in reasons["corrupt.jpg"][0]
    assert reasons["blank.jpg"] == [
        "empty caption (captions_val.json annotation 18)",
        "no non-empty caption",
    ]
    assert "image_id 555" in reasons["captions_val.json annotation 999"][0]
    assert data["train"].get("000000000005.png", data["test"].get("000000000005.png"))["ext"] == (
        "png"
    )


def test_seeded_split_is_exact_order_free_and_by_seed(tmp_path):
    def split(names, seed=0):
        items = [Item(n, n, ["c"], None) for n in names]
        assign_splits(items, WriterOptions(out=tmp_path / "x", seed=seed))
        return {i.source for i in items if i.split == "test"}

    names = [f"{i:012d}.jpg" for i in range(5000)]  # COCO val2017's size
    test = split(names)
    assert len(test) == 1000  # 4,000 train / 1,000 test
    assert split(list(reversed(names))) == test
    assert split(names, seed=1) != test


def test_karpathy_mapping(coco_input, tmp_path):
    splits = ["train", "restval", "val", "test", "test", "train", "val"]  # images 0..6; 7 absent
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(
        json.dumps({"images": [{"cocoid": i, "split": s} for i, s in enumerate(splits)]})
    )
    out = tmp_path / "k"
    run_coco(coco_input, out, "--karpathy", str(karpathy))
    data = read_dataset(out)
    name = {int(n[:12]): n for n in coco_input["expected"]}.__getitem__  # image 5 is a PNG
    assert set(data["train"]) == {name(0), name(1), name(5)}
    assert set(data["val"]) == {name(2), name(6)}  # val is kept apart from the 5k-style test
    assert set(data["test"]) == {name(3), name(4)}
    assert skipped(out)[name(7)] == ["not in the --karpathy split file"]
    run_coco(coco_input, out, "--karpathy", str(karpathy), "--karpathy-val", "test")
    assert set(read_dataset(out)["test"]) == {name(2), name(3), name(4), name(6)}


def test_rerun_reuses_finished_shards_and_output_is_deterministic(coco_input, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run_coco(coco_input, a, "--shard-size", "2", "--workers", "2")
    run_coco(coco_input, b, "--shard-size", "2", "--workers", "1")
    shards = sorted(p.name for p in a.glob("*.tar"))
    assert [sha256_file(a / s) for s in shards] == [sha256_file(b / s) for s in shards]
    with tarfile.open(a / shards[0]) as tar:  # plain ustar: no pax header per member
        assert all(m.pax_headers == {} for m in tar.getmembers())

    stamps = {s: (a / s).stat().st_mtime_ns for s in shards}
    (a / shards[0]).unlink()  # as if the first run had been killed before this shard
    capsys.readouterr()
    run_coco(coco_input, a, "--shard-size", "2")
    assert f"shards written 1, reused {len(shards) - 1}" in capsys.readouterr().out
    assert all((a / s).stat().st_mtime_ns == stamps[s] for s in shards[1:])
    assert sha256_file(a / shards[0]) == sha256_file(b / shards[0])

    # a changed caption rewrites only the shard holding that image
    raw = json.loads(coco_input["captions"].read_text())
    raw["annotations"][-2]["caption"] = "a brand new caption"
    coco_input["captions"].write_text(json.dumps(raw))
    run_coco(coco_input, a, "--shard-size", "2")
    assert "shards written 1," in capsys.readouterr().out
    assert "a brand new caption" in {
        c for caps in all_samples(read_dataset(a)).values() for c in caps
    }


# ---------------------------------------------------------------- CSV / JSONL pairs


def test_pairs_csv_honours_split_column_and_groups_rows(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a.jpg", "b.png", "f.jpg", "g.jpg"):
        make_image(root / name)
    corrupt(root / "e.jpg")
    rows = [
        ("a.jpg", "a dog", "train"),
        ("b.png", "a cat", "test"),
        ("a.jpg", "  a   brown dog ", "train"),
        ("c.jpg", "not on disk", "train"),
        ("g.jpg", " ", "Test"),
        ("e.jpg", "broken", "train"),
        ("./f.jpg", "f one", "train"),
        ("f.jpg", "f two", "train"),
        ("g.jpg", "a fish", "TEST"),
    ]
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption", "split"), *rows])
    out = tmp_path / "out"
    assert (
        pairs.main(["--input", str(table), "--image-root", str(root), "--out", str(out), *QUIET])
        == 0
    )
    data = read_dataset(out)
    assert {k: v["captions"] for k, v in data["train"].items()} == {
        "a.jpg": ["a dog", "a brown dog"],
        "f.jpg": ["f one", "f two"],
    }
    assert {k: v["captions"] for k, v in data["test"].items()} == {
        "b.png": ["a cat"],
        "g.jpg": ["a fish"],
    }
    reasons = skipped(out)
    assert reasons["c.jpg"] == ["missing file"]
    assert "cannot decode image" in reasons["e.jpg"][0]
    assert reasons["g.jpg"] == ["empty caption (pairs.csv line 6)"]


def test_pairs_jsonl_custom_columns_seeded_split(tmp_path):
    lines = []
    for i in range(10):
        make_image(tmp_path / "img" / f"{i}.jpg", colour=(20 * i, 0, 0))
        lines += [
            {"file": f"img/{i}.jpg", "text": f"photo {i}"},
            {"file": f"img/{i}.jpg", "text": f"pic {i}"},
        ]
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    args = ["--input", str(table), "--image-column", "file", "--caption-column", "text"]
    assert pairs.main([*args, "--out", str(out), "--test-size", "3", *QUIET]) == 0
    data = read_dataset(out)
    assert all_samples(data) == {f"img/{i}.jpg": [f"photo {i}", f"pic {i}"] for i in range(10)}
    assert len(data["test"]) == 3 and not set(data["train"]) & set(data["test"])


# ---------------------------------------------------------------- folder


def test_folder_sidecars_nested_corrupt_and_resized(tmp_path):
    src = tmp_path / "photos"
    make_image(src / "cat.jpg", size=(40, 20))
    (src / "cat.txt").write_text("a cat\n\n  a sleepy   cat \n")
    make_image(src / "sub" / "dog.PNG", size=(30, 60))
    (src / "sub" / "dog.txt").write_text("a dog")
    Image.new("RGB", (10, 10)).save(src / "sub" / "tiny.bmp")  # kept size, re-encoded to PNG
    (src / "sub" / "tiny.txt").write_text("tiny")
    make_image(src / "nocaption.jpg")
    (src / "orphan.txt").write_text("no image here")
    corrupt(src / "bad.jpg")
    (src / "bad.txt").write_text("broken")
    make_image(src / "empty.jpg")
    (src / "empty.txt").write_text(" \n")
    out = src / "converted"  # inside the input: must not be read back as input
    args = ["--input", str(src), "--out", str(out), "--image-size", "12", "--test-size", "2"]
    assert folder.main([*args, *QUIET]) == 0
    data = read_dataset(out)
    assert all_samples(data) == {
        "cat.jpg": ["a cat", "a sleepy cat"],
        "sub/dog.PNG": ["a dog"],
        "sub/tiny.bmp": ["tiny"],
    }
    found = {k: v for split in data.values() for k, v in split.items()}
    assert (found["cat.jpg"]["ext"], found["cat.jpg"]["image"].size) == ("jpg", (24, 12))
    assert (found["sub/dog.PNG"]["ext"], found["sub/dog.PNG"]["image"].size) == ("png", (12, 24))
    assert (found["sub/tiny.bmp"]["ext"], found["sub/tiny.bmp"]["image"].size) == ("png", (10, 10))
    reasons = skipped(out)
    assert reasons["nocaption.jpg"] == ["no caption file nocaption.txt"]
    assert reasons["orphan.txt"] == ["caption file without an image"]
    assert "cannot decode image" in reasons["bad.jpg"][0]
    assert reasons["empty.jpg"] == ["empty caption (empty.txt line 1)", "no non-empty caption"]


# ---------------------------------------------------------------- bad input


def write_csv(path: Path, header: str) -> Path:
    path.write_text(header + "\nx.jpg,a cap,train\nx.jpg,b cap,test\n")
    return path


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        (pairs, ["--input", "{tmp}/p.csv", "--caption-column", "text"], "no column 'text'"),
        (pairs, ["--input", "{tmp}/p.csv"], "must be in one split only"),
        (pairs, ["--input", "{tmp}/nope.csv"], "nope.csv: file not found"),
        (
            pairs,
            ["--input", "{tmp}/p.csv", "--split-column", "caption"],
            "line 2: column 'caption'",
        ),
        (coco, ["--images", "{tmp}/none", "--captions", "{tmp}/c.json"], "--images"),
        (coco, ["--images", "{tmp}", "--captions", "{tmp}/c.json"], "lacks key 'annotations'"),
        (folder, ["--input", "{tmp}/p.csv"], "not a folder"),
    ],
)
def test_bad_input_is_one_clear_error_before_any_work(tool, args, message, tmp_path, capsys):
    write_csv(tmp_path / "p.csv", "image,caption,split")
    (tmp_path / "c.json").write_text(json.dumps({"images": []}))
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out"), *QUIET]
    with pytest.raises(SystemExit) as exit_:
        tool.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_convert_api_keeps_labels_for_label_tasks(tmp_path):
    """A converter that knows classes passes labels per record and the tasks to ``convert``."""
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    records = []
    for i in range(6):
        name = list(colours)[i % 2]
        path = make_image(tmp_path / "img" / f"{i}.png", colour=colours[name])
        records.append(Record(f"{i}.png", str(path), f"a {name} square", labels={"colour": i % 2}))
    task = LabelTask("colour", list(colours), ["a {} image."])
    options = WriterOptions(out=tmp_path / "out", test_size=2, workers=1, progress=False)
    done = convert(records, options, converter="test", provenance={}, label_tasks=[task])
    m = load_manifest(done.manifest)
    assert m.label_tasks == [task] and done.samples == {"train": 4, "test": 2}
    test = sorted(read_dataset(options.out)["test"].items(), key=lambda kv: kv[1]["index"])
    batch = next(iter(eval_loader(m, "test", batch_size=2, image_size=16, context_length=16)))
    assert batch["labels"][:, 0].tolist() == [int(source[0]) % 2 for source, _ in test]


# ---------------------------------------------------------------- existing shards, reading


def write_img2dataset_shard(path: Path, start: int, n: int) -> None:
    """img2dataset's layout: jpg + txt caption + a json without captions."""
    with wds.TarWriter(str(path), mtime=0.0) as sink:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (i * 9, 50, 50)).save(buf, format="JPEG")
            meta = {"key": f"{i:09d}", "url": f"http://x/{i}.jpg", "status": "success"}
            sink.write(
                {"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"caption {i}", "json": meta}
            )


def test_manifest_for_existing_shards_is_read_by_the_harness(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, n in enumerate((5, 4, 3)):
        write_img2dataset_shard(shards / f"{k:05d}.tar", 10 * k, n)
    paths = [
        str(p) for p in sorted(shards.glob("*.tar"), reverse=True)
    ]  # order given is irrelevant
    assert manifest_tool.main([*paths, "--test-shards", "00001.tar", *QUIET]) == 0
    m = load_manifest(shards)
    assert [(s.path, s.num_samples, s.first_index) for s in m.splits["train"].shards] == [
        ("00000.tar", 5, 0),
        ("00002.tar", 3, 5),
    ]
    assert [(s.path, s.num_samples) for s in m.splits["test"].shards] == [("00001.tar", 4)]
    assert validate.validate(shards, workers=1, progress=False) == []

    loader = eval_loader(m, "test", batch_size=3, image_size=16, context_length=16)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 4
    assert [i for b in batches for i in b["index"].tolist()] == [0, 1, 2, 3]

    assert manifest_tool.main([*paths, "--out", str(tmp_path), *QUIET]) == 0  # default: last shard
    m = load_manifest(tmp_path)
    assert [s.path for s in m.splits["test"].shards] == ["shards/00002.tar"]


def test_converted_dataset_feeds_the_harness_reader(coco_input, tmp_path):
    out = tmp_path / "out"
    run_coco(coco_input, out, "--shard-size", "3")
    m = load_manifest(out)
    data = read_dataset(out)
    batches = list(eval_loader(m, "test", batch_size=4, image_size=16, context_length=16))
    owners = [o for b in batches for o in b["caption_owner"].tolist()]
    expected = sorted(data["test"].values(), key=lambda v: v["index"])
    assert [b["index"].tolist() for b in batches] == [[v["index"] for v in expected]]
    assert owners == [k for k, v in enumerate(expected) for _ in v["captions"]]

    stream = ShardStream(
        m, "train", batch_size=2, image_size=16, context_length=16, train=True, epochs=1
    )
    seen = [i for b in make_loader(stream, 0) for i in b["index"].tolist()]
    assert sorted(seen) == sorted(v["index"] for v in data["train"].values())


# ---------------------------------------------------------------- the CLI, validator included


def test_cli_convert_validate_and_catch_a_truncated_shard(coco_input, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--images", str(coco_input["images"]), "--captions", str(coco_input["captions"])]
    done = run_cli("data_tools.coco", *args, "--out", str(out), "--shard-size", "3")
    assert done.returncode == 0, done.stderr
    assert str(out / "manifest.json") in done.stdout

    assert validate.main([str(out), "--no-progress"]) == 0  # in-process: spares an import of torch
    report = capsys.readouterr().out
    assert report.rstrip().endswith("OK")
    train_row = next(line for line in report.splitlines() if line.startswith("train"))
    assert train_row.split()[1:4] == ["3", "6", "6"]  # shards (3 + 3 + 1 planned), samples, images

    first = load_manifest(out).splits["train"].shards[0]
    shard = out / first.path
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    bad = run_cli("data_tools.validate", str(out), "--no-progress")
    assert bad.returncode == 1
    assert f"{shard.name}: sha256 differs" in bad.stdout
    assert f"the manifest says {first.num_samples}" in bad.stdout
    assert "FAILED" in bad.stdout
