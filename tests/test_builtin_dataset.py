"""The built-in dataset: deterministic, disjoint splits, binding twins, idempotent builds."""

import json
import random

import webdataset as wds

from data_tools.builtin import (
    BuiltinSpec,
    build,
    caption,
    make_test_scenes,
    random_scene,
    signature,
)
from harness.manifest import load_manifest


def samples(manifest, split):
    out = []
    for path in manifest.shard_paths(split):
        out.extend(wds.tarfile_samples([{"url": path}]))
    return out


def test_manifest_describes_the_shards(tiny_data):
    manifest = load_manifest(tiny_data)
    assert manifest.split("train").num_samples == 400
    assert manifest.split("test").num_samples == 60
    assert [t.name for t in manifest.label_tasks] == ["shape", "colour"]
    test = samples(manifest, "test")
    assert len(test) == 60
    assert all(len(json.loads(s["json"])["captions"]) == 3 for s in test)


def test_splits_are_disjoint_by_scene(tiny_data):
    manifest = load_manifest(tiny_data)

    def sigs(split):
        return {
            tuple(sorted(tuple(o.values()) for o in json.loads(s["json"])["objects"]))
            for s in samples(manifest, split)
        }

    assert not sigs("train") & sigs("test")


def test_twins_share_words_but_not_scenes():
    spec = BuiltinSpec(num_test=200)
    scenes = make_test_scenes(spec)
    for base, twin in zip(scenes[0::2], scenes[1::2], strict=True):
        assert signature(base) != signature(twin)
        swappable = any(
            (a.shape, a.colour, a.size) != (b.shape, b.colour, b.size)
            for k, a in enumerate(base)
            for b in base[k + 1 :]
        )
        if swappable:  # a swap: the same multiset of words describes both scenes
            words = lambda sc: sorted(w for o in sc for w in (o.shape, o.colour, o.size))  # noqa: E731
            assert words(base) == words(twin)


def test_captions_name_every_object_attribute():
    rng = random.Random(0)
    for _ in range(100):
        scene = random_scene(rng, 3)
        text = caption(scene, rng)
        for o in scene:
            assert o.shape in text and o.colour in text and o.size in text


def test_build_is_deterministic_and_idempotent(tmp_path):
    spec = BuiltinSpec(num_train=30, num_test=10, shard_size=20, image_size=24, seed=5)
    a = build(spec, tmp_path / "a", workers=1, verbose=False)
    b = build(spec, tmp_path / "b", workers=2, verbose=False)
    sums = lambda p: [s.sha256 for split in load_manifest(p).splits.values() for s in split.shards]  # noqa: E731
    assert sums(a) == sums(b)
    stamp = a.stat().st_mtime_ns
    assert build(spec, tmp_path / "a", workers=1, verbose=False) == a
    assert a.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_damaged_build_is_rebuilt(tmp_path):
    spec = BuiltinSpec(num_train=20, num_test=10, shard_size=20, image_size=24)
    path = build(spec, tmp_path / "d", workers=1, verbose=False)
    shard = path.parent / load_manifest(path).splits["train"].shards[0].path
    shard.write_bytes(b"broken")
    build(spec, tmp_path / "d", workers=1, verbose=False)
    assert len(samples(load_manifest(path), "train")) == 20


def test_shards_have_plain_ustar_headers(tiny_data):
    # a pax header per member (tarfile's answer to a float mtime) halves webdataset's read speed
    import tarfile

    for path in load_manifest(tiny_data).shard_paths("train"):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert members and all(m.pax_headers == {} for m in members)
