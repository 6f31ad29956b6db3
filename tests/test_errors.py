"""One ``error:`` line for what users and their machines get wrong: text in another encoding, an
output path that is a file or read-only, manifest fields of the wrong type, a full disk, a
shard that is not a regular file. Nothing partial is left behind."""

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from data_tools import pairs
from harness.errors import DataError
from harness.manifest import load_manifest
from tests.conftest import REPO, run_cli
from tests.test_data_tools import QUIET, make_image
from tests.test_faults import smoke


def one_error_line(stderr: str) -> str:
    """The error line, checking it is the whole of stderr (no traceback before it)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- text in other encodings


def pairs_input(tmp_path: Path, suffix: str, encoding: str) -> Path:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", colour=(10, 200, 10))
    if suffix == ".csv":
        text = "image,caption,split\na.png,un café rouge,train\nb.png,une crème verte,test\n"
    else:
        rows = [{"image": "a.png", "caption": "un café rouge", "split": "train"},
                {"image": "b.png", "caption": "une crème verte", "split": "test"}]  # fmt: skip
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize(
    "encoding, message",
    [
        ("latin-1", r"line [12]: not utf-8 text \(byte 0xe9 at offset \d+\); name the file's "
                    r"encoding, e.g. --encoding latin-1"),
        ("utf-16-le", "holds NUL bytes, as UTF-16 without a byte-order mark does; name the "
                      "file's encoding, e.g. --encoding utf-16-le"),
    ],
)  # fmt: skip
def test_a_pairs_file_in_another_encoding_is_named_then_read(tmp_path, suffix, encoding, message):
    path = pairs_input(tmp_path, suffix, encoding)
    out = tmp_path / "out"
    refused = run_cli("data_tools.pairs", "--input", str(path), "--out", str(out), *QUIET)
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert str(path) in line
    assert __import__("re").search(message, line), line
    assert not out.exists()
    assert (
        pairs.main(["--input", str(path), "--out", str(out), "--encoding", encoding, *QUIET]) == 0
    )
    captions = [
        c for r in pairs.read_rows(path, suffix[1:], encoding)[1] for c in [r[1]["caption"]]
    ]
    assert captions == ["un café rouge", "une crème verte"]


def test_a_utf16_file_with_a_byte_order_mark_is_read_as_such(tmp_path):
    path = pairs_input(tmp_path, ".csv", "utf-16")  # Python writes the mark for "utf-16"
    assert pairs.main(["--input", str(path), "--out", str(tmp_path / "out"), *QUIET]) == 0


# ---------------------------------------------------------------- where results go


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder this process cannot write in (root writes anywhere chmod allows none: /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys/kernel")
    if os.access(folder, os.W_OK) and not _refuses_files(folder):
        pytest.skip("no folder here refuses root's writes")
    yield folder


def _refuses_files(folder: Path) -> bool:
    try:
        (folder / ".clipbench-probe").touch()
    except OSError:
        return True
    (folder / ".clipbench-probe").unlink()
    return False


@pytest.mark.slow
def test_an_out_path_that_is_a_file_or_read_only_is_one_error_line(
    tmp_path, tiny_data, read_only_dir
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out, reason in ((a_file, "is a file, not a folder"), (read_only_dir, "")):
        done = subprocess.run(smoke(out, tiny_data), cwd=REPO, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 2
        line = one_error_line(done.stderr)
        assert line.startswith(f"error: {out}: ") and reason in line, line
    assert a_file.read_text() == "keep me"


@pytest.mark.slow
def test_a_sweep_or_a_converter_into_a_read_only_folder_is_one_error_line(
    tmp_path, tiny_data, read_only_dir
):
    from tests.test_grid import write_grid

    sweep_out = read_only_dir / "sweep"
    sweep = run_cli("harness.run", str(write_grid(tmp_path, "{'SEED': [0]}")), "--out",
                    str(sweep_out), "--gin_param", f"DATA='{tiny_data}'")  # fmt: skip
    assert sweep.returncode == 2
    assert one_error_line(sweep.stderr).startswith(f"error: {sweep_out}: ")
    path = pairs_input(tmp_path, ".csv", "utf-8")
    converted = run_cli(
        "data_tools.pairs", "--input", str(path), "--out", str(read_only_dir), *QUIET
    )
    assert converted.returncode == 2
    assert one_error_line(converted.stderr).startswith(f"error: {read_only_dir}: ")


def test_the_evaluator_checks_it_can_write_before_doing_its_work(tmp_path, monkeypatch, capsys):
    """harness.evaluate into a read-only run directory used to fail after all its work."""
    import tempfile

    from harness import evaluate

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    (run_dir / "operative_config.gin").write_text("")
    real = tempfile.mkstemp

    def refused_there(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == run_dir:
            raise PermissionError(13, "Permission denied", str(Path(dir) / ".x"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused_there)
    monkeypatch.setattr(evaluate, "_evaluate", lambda *a: pytest.fail("evaluated anyway"))
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([str(run_dir)])
    assert stopped.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {run_dir}: Permission denied"


@pytest.mark.slow
def test_a_full_disk_is_the_status_reason_and_one_error_line(tmp_path, tiny_data):
    """A file-size limit fails the checkpoint's write as a full disk does (EFBIG for ENOSPC):
    torch's message for it was '[enforce fail at inline_container.cc:672]'."""
    out = tmp_path / "run"

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))  # a checkpoint is ~19 MB

    done = subprocess.run(smoke(out, tiny_data), cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=small_files_only)  # fmt: skip
    assert done.returncode == 2
    latest = out / "checkpoints" / "latest.pt"
    assert one_error_line(done.stderr) == f"error: {latest}: File too large"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["reason"] == f"OSError: {latest}: File too large"
    assert not list((out / "checkpoints").iterdir())  # the partial file is gone


# ---------------------------------------------------------------- manifests


def manifest_with(tiny_data: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(tiny_data.parent if tiny_data.is_file() else tiny_data, folder)
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


def _shard(raw, **fields):
    raw["splits"]["train"]["shards"][0].update(fields)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: _shard(r, num_samples="fifty"), r"shards\[0\].num_samples is 'fifty'; expected an integer"),
        (lambda r: _shard(r, num_samples=-1), r"shards\[0\].num_samples is -1; expected at least 0"),
        (lambda r: _shard(r, path=7), r"shards\[0\].path is 7; expected a string"),
        (lambda r: _shard(r, first_index=True), r"shards\[0\].first_index is True; expected an integer"),
        (lambda r: r["splits"]["train"]["shards"].__setitem__(0, "a.tar"), r"shards\[0\] must be an object"),
        (lambda r: r.__setitem__("label_tasks", {"shape": []}), "key 'label_tasks' must be a list"),
        (lambda r: r["label_tasks"][0].__setitem__("classes", "circle"), r"label_tasks\[0\].classes must be a list of strings"),
        (lambda r: r.__setitem__("source", "me"), "key 'source' must be a mapping"),
    ],
)  # fmt: skip
def test_manifest_fields_of_the_wrong_type_are_named(tiny_data, tmp_path, edit, message):
    path = manifest_with(tiny_data, tmp_path, edit)
    with pytest.raises(DataError, match=message):
        load_manifest(path)


def test_a_manifest_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must hold a JSON object, not list"):
        load_manifest(tmp_path)


@pytest.mark.slow
def test_a_shard_that_is_not_a_regular_file_is_refused_not_read_forever(tiny_data, tmp_path):
    path = manifest_with(tiny_data, tmp_path, lambda r: _shard(r, path="/dev/zero"))
    done = subprocess.run(smoke(tmp_path / "run", path.parent), cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert one_error_line(done.stderr) == (f"error: {path}: shard /dev/zero is not a regular file")
    assert not (tmp_path / "run").exists()  # nothing left behind
