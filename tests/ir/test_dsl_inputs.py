"""Hostile spec input: non-ASCII digits, and `use` paths that name things other than spec files.
Each is a located SpecError; none reads a device, waits on a FIFO or quotes a non-spec file."""
import os

import pytest

from plait.ir.dsl import load_file, parse_text
from plait.ir.dsl.files import MAX_SPEC_BYTES
from plait.ir.errors import SpecError

TINY = 'model "m" {{ vocab = {vocab}, hidden = 8, mlp {{ ffn = 8 }}, layers = [mlp] }}\n'


@pytest.mark.parametrize("vocab, col", [("4\u0663", 22), ("\uff11\uff10", 21), ("1e\u0665", 23),
                                        ("\u0967", 21)],
                         ids=["arabic-indic", "full-width", "exponent", "devanagari"])
def test_numbers_are_ascii_digits_only(vocab, col):
    with pytest.raises(SpecError) as err:
        parse_text(TINY.format(vocab=vocab), file="m.plait")
    e = err.value
    assert (e.file, e.line, e.col) == ("m.plait", 1, col)
    assert "ASCII digits 0-9" in e.hint


@pytest.mark.parametrize("vocab", ["1e999999K", "-1e999999M", "1e999999"])
def test_integers_beyond_any_range_are_a_located_error(vocab):
    """Found by the spec fuzzer: `abs()` of 1e999999K rounded in decimal's default context and
    raised decimal.Overflow."""
    with pytest.raises(SpecError) as err:
        parse_text(TINY.format(vocab=vocab), file="m.plait")
    assert (err.value.line, err.value.col) == (1, 21) and "too large" in str(err.value)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def use_error(tmp_path, target: str) -> SpecError:
    spec = write(tmp_path / "job.plait", f'use "{target}"\n')
    with pytest.raises(SpecError) as err:
        load_file(spec)
    assert (err.value.line, err.value.col) == (1, 5)  # at the path
    return err.value


def test_use_refuses_absolute_paths(tmp_path):
    e = use_error(tmp_path, "/proc/self/environ")
    assert "`use` paths are relative" in e.message and "PATH=" not in e.format()


def test_use_refuses_files_that_are_not_specs(tmp_path):
    write(tmp_path / "secret.txt", "TOKEN=hunter2\n")
    e = use_error(tmp_path, "secret.txt")
    assert "spec files (*.plait)" in e.message and "hunter2" not in e.format()


@pytest.mark.parametrize("target", ["/dev/zero", "/proc/self/environ", "/etc/passwd"])
def test_use_refuses_links_to_files_that_are_not_specs(tmp_path, target):
    os.symlink(target, tmp_path / "innocent.plait")
    e = use_error(tmp_path, "innocent.plait")
    assert "not a spec file" in e.message and "root:" not in e.format() and "PATH=" not in e.format()


def test_use_never_waits_on_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe.plait")  # opening it for reading would block until a writer came
    assert "not a regular file" in use_error(tmp_path, "pipe.plait").message


def test_use_refuses_directories(tmp_path):
    (tmp_path / "dir.plait").mkdir()
    assert "not a regular file" in use_error(tmp_path, "dir.plait").message


def test_use_refuses_oversized_and_binary_files_without_quoting_them(tmp_path):
    write(tmp_path / "big.plait", "#" * (MAX_SPEC_BYTES + 1))
    assert "larger than 1 MiB" in use_error(tmp_path, "big.plait").message
    (tmp_path / "bin.plait").write_bytes(b"model \xff\xfe secret")
    e = use_error(tmp_path, "bin.plait")
    assert "not UTF-8" in e.message and "secret" not in e.format()


def test_use_searches_plait_path_then_the_library(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    write(shared / "m.plait", TINY.format(vocab=16))
    job = tmp_path / "jobs"
    job.mkdir()
    spec = write(job / "j.plait", 'use "m.plait", "models/tiny-dense.plait"\n')
    monkeypatch.setenv("PLAIT_PATH", str(shared))
    lib = load_file(spec)
    assert set(lib.models) == {"m", "tiny-dense"}


def test_use_of_a_missing_file_says_where_it_looked(tmp_path):
    e = use_error(tmp_path, "nowhere.plait")
    assert "no such file" in e.message and str(tmp_path) in e.hint


def test_a_spec_file_on_the_command_line_is_size_limited():
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        load_file("/dev/zero")


def test_a_directory_on_the_command_line_is_refused(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        load_file(str(tmp_path))
