"""GGUF models (``load_model("x.gguf")``, ``--model x.gguf``, ``--model DIR --gguf-file x.gguf``) on
a tiny random Gemma-3 written with the ``gguf`` package's writer (tests/gguf_tiny.py): the loaded
model equals the one written, recipes carry over to the same model loaded from a HF directory, and
bad files (truncated, not GGUF, an architecture transformers cannot dequantize) or a missing
``gguf`` package give one line naming the problem (exit 2 on the command line)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install steerwise[gguf])")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install steerwise[gguf])")

from gguf_tiny import WORDS, tiny_gemma3, write_gguf  # noqa: E402

from steerwise import Recipe, load_model  # noqa: E402
from steerwise.cli import main  # noqa: E402
from steerwise.fit import fit  # noqa: E402
from steerwise.models import gguf_architectures, inspect_gguf, read_gguf_header  # noqa: E402
from steerwise.recipe import ModelIdentity  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, its directory, the GGUF file written from it)."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_gemma3()
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    path = write_gguf(model, root / "tiny-f32.gguf")
    return model, hf_dir, path


FRUIT = ("apple", "pear", "banana", "fruit", "sweet", "ripe")
OTHER = ("car", "bus", "train", "road", "fast", "dog", "cat", "bird", "rain", "snow", "music")


def texts(seed: int, words=WORDS, n: int = 8) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g))
            for _ in range(n)]


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def test_gguf_file_loads_as_the_model_written(tiny, capsys):
    model, _, path = tiny
    loaded, tok = load_model(str(path), device="cpu")
    assert "loading GGUF model" in capsys.readouterr().err  # the long load says what it does
    assert type(loaded).__name__ == "Gemma3ForCausalLM"
    ids = tok("hello world you are such a", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert loaded.config._name_or_path == str(path)  # recipes record the file
    assert ModelIdentity.of(loaded) == ModelIdentity("gemma3_text", 32, 2, str(path))


def test_header_reader_agrees_with_the_gguf_package(tiny):
    from gguf import GGUFReader

    _, _, path = tiny
    info = read_gguf_header(path)
    reader = GGUFReader(path)
    assert info["tensors"] == len(reader.tensors) == 28
    assert info["needs"] == path.stat().st_size == max(
        int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert (info["architecture"], info["name"]) == ("gemma3", "tiny gemma3")


def test_directory_plus_gguf_file_is_the_same_model(tiny):
    model, _, path = tiny
    loaded, _ = load_model(str(path.parent), gguf_file=path.name, device="cpu", progress=False)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # norms: (1 + w) - 1


def test_recipe_fitted_on_gguf_applies_to_the_hf_directory(tiny, tmp_path):
    _, hf_dir, path = tiny
    gmodel, gtok = load_model(str(path), device="cpu", progress=False)
    recipe = fit(gmodel, gtok, texts(1, FRUIT, 16), texts(2, OTHER, 16), method="caa",
                 gate="dsas", progress=False, probe_accuracy=False)
    assert any(e.scale > 0 for e in recipe.entries)  # something is steered
    out = recipe.save_pretrained(tmp_path / "r")
    saved = json.loads((out / "steerwise.json").read_text())
    assert saved["model"]["model_type"] == "gemma3_text"
    assert saved["model"]["name_or_path"] == str(path)
    hmodel, htok = load_model(str(hf_dir), device="cpu")
    loaded = Recipe.from_pretrained(out)
    loaded.check_model(hmodel)  # same type, width and depth: the same model, unquantized
    ids = htok("the apple is sweet", return_tensors="pt").input_ids
    with torch.no_grad(), loaded.apply(hmodel, 2.0):
        steered_hf = hmodel(ids).logits
    with torch.no_grad(), loaded.apply(gmodel, 2.0):
        steered_gguf = gmodel(ids).logits
    torch.testing.assert_close(steered_gguf, steered_hf, rtol=0, atol=1e-4)


def test_cli_fit_and_generate_on_a_gguf_file(tiny, tmp_path, capsys):
    _, _, path = tiny
    src, ctl = tmp_path / "s.txt", tmp_path / "c.txt"
    src.write_text("\n".join(texts(3)) + "\n")
    ctl.write_text("\n".join(texts(4)) + "\n")
    out = tmp_path / "recipe"
    assert main(["fit", "--model", str(path.parent), "--gguf-file", path.name, "--source",
                 str(src), "--control", str(ctl), "--gate", "dsas", "--out", str(out)]) == 0
    info = json.loads((out / "steerwise.json").read_text())
    assert info["fit"]["model_name"] == str(path)  # given again as one path
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--recipe", str(out), "--strength", "2",
                 "--max-new-tokens", "3", "--explain", "the apple"]) == 0
    assert "gate per token" in capsys.readouterr().out


def test_truncated_gguf_is_one_line(tiny, tmp_path, capsys):
    _, _, path = tiny
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 40):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            inspect_gguf(bad)
        assert main(["generate", "--model", str(bad), "hello"]) == 2
        line = error_line(capsys)
        assert line.startswith(f"steerwise generate: error: cannot read {bad} ({cut} bytes): "
                               "truncated"), line


def test_not_a_gguf_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is no model\n" * 10)
    assert main(["sites", "--model", str(bad)]) == 2
    assert error_line(capsys) == (f"steerwise sites: error: cannot read {bad} (170 bytes): "
                                  "not a GGUF file (bad magic number)")


def test_unsupported_architecture_is_named_with_the_supported_ones(tiny, tmp_path, capsys):
    model, _, _ = tiny
    bad = write_gguf(model, tmp_path / "rwkv.gguf", arch="rwkv7")
    assert main(["sites", "--model", str(bad)]) == 2
    line = error_line(capsys)
    assert "cannot dequantize GGUF architecture 'rwkv7' (rwkv.gguf); it supports: " in line
    assert "gemma3" in gguf_architectures() and "llama" in line and "gemma3" in line


def test_missing_gguf_file_suggests_the_closest(tiny, capsys):
    _, _, path = tiny
    wrong = path.parent / "tiny-f16.gguf"
    assert main(["sites", "--model", str(wrong)]) == 2
    assert error_line(capsys) == (f"steerwise sites: error: no GGUF file at {wrong} "
                                  f"(did you mean {path.name}?)")
    assert main(["sites", "--model", str(path.parent), "--gguf-file", "nope.gguf"]) == 2
    assert error_line(capsys) == (f"steerwise sites: error: no GGUF file at "
                                  f"{path.parent / 'nope.gguf'} ({path.parent} holds: "
                                  f"{path.name})")


def test_gguf_file_with_a_gguf_model_is_refused(tiny, capsys):
    _, _, path = tiny
    assert main(["sites", "--model", str(path), "--gguf-file", path.name]) == 2
    assert "not both" in error_line(capsys)


def test_missing_gguf_package_says_how_to_install(tiny, monkeypatch, capsys):
    _, _, path = tiny
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["sites", "--model", str(path)]) == 2
    assert error_line(capsys) == ("steerwise sites: error: loading a GGUF model needs the gguf "
                                  "package: pip install 'steerwise[gguf]'")


def test_gguf_package_without_the_architecture_says_to_upgrade(tiny, monkeypatch, capsys):
    """transformers raises NotImplementedError when the installed gguf predates the architecture
    (gguf 0.16.0 and Gemma 3): one line that says so."""
    import transformers

    _, _, path = tiny

    def too_old(*args, **kwargs):
        raise NotImplementedError("Unknown gguf model_type: gemma3 in gguf-py. This might ...")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", too_old)
    assert main(["sites", "--model", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"steerwise sites: error: cannot load GGUF model {path}: the installed "
                           "gguf package (") and line.endswith(
        "does not know its architecture 'gemma3'; pip install -U gguf"), line
