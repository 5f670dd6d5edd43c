"""Bad input on the command line: one line on stderr that names the problem, exit code 2.

Every case runs ``steerwise.cli.main`` in-process and checks the last line of stderr (library
progress bars may come before it) and the exit code.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
import transformers
from rich.console import Console

from steerwise import cli
from steerwise.cli import build_parser, main


def error_line(capsys_or_capfd) -> str:
    lines = [line for line in capsys_or_capfd.readouterr().err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks transformers to load a model or tokenizer."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to load {args[:1]} (the name check must come first)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


# ------------------------------------------------------------------------- model names and paths

def test_missing_local_model_path_is_named(tmp_path, capsys, no_hub):
    path = tmp_path / "nope" / "model"
    assert main(["sites", "--model", str(path)]) == 2
    assert error_line(capsys) == f"steerwise sites: error: no model directory at {path}"


def test_missing_relative_path_is_a_path_not_a_repo_id(capsys, no_hub):
    assert main(["sites", "--model", "./nope/model"]) == 2
    assert error_line(capsys) == "steerwise sites: error: no model directory at ./nope/model"


def test_missing_path_suggests_the_closest_sibling(tmp_path, capsys, no_hub):
    (tmp_path / "tox-qwen2-7m").mkdir()
    path = tmp_path / "tox-qwen2-7mm"
    assert main(["sites", "--model", str(path)]) == 2
    assert error_line(capsys) == (f"steerwise sites: error: no model directory at {path} "
                                  f"(did you mean {tmp_path / 'tox-qwen2-7m'}?)")


def test_misspelled_embedded_model_is_not_looked_up(capsys, no_hub):
    assert main(["sites", "--model", "concept_lm"]) == 2
    assert error_line(capsys) == (
        "steerwise sites: error: unknown model 'concept_lm' (did you mean concept-lm?); "
        "embedded models: concept-lm, task-lm")


def test_directory_that_is_not_a_model(tmp_path, capsys, no_hub):
    assert main(["sites", "--model", str(tmp_path)]) == 2
    assert error_line(capsys) == (f"steerwise sites: error: {tmp_path} holds no config.json: "
                                  "not a Hugging Face model directory")


def test_misspelled_tiny_pipeline_is_one_line(capfd):
    pytest.importorskip("diffusers")
    assert main(["diffusion", "sites", "--pipeline", "tiny-sdd"]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert err == [("steerwise diffusion sites: error: unknown pipeline 'tiny-sdd' "
                    "(did you mean tiny-sd?); built-in pipelines: tiny-sd, tiny-sd3")]


# ------------------------------------------------------------------------- files

def test_non_utf8_text_file_names_file_and_line(tmp_path, capsys, no_hub):
    src = tmp_path / "s.txt"
    src.write_bytes(b"the apple is sweet\n\xff\xfe latin-1 text\n")
    assert main(["fit", "--source", str(src), "--out", str(tmp_path / "r")]) == 2
    assert error_line(capsys) == (f"steerwise fit: error: {src}:2: not UTF-8 text (byte 0xff at "
                                  "column 1); save the file as UTF-8")
    assert not (tmp_path / "r").exists()


def test_bad_json_line_names_file_line_and_column(tmp_path, capsys, no_hub):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert main(["fit", "--source", str(src), "--out", str(tmp_path / "r")]) == 2
    assert error_line(capsys) == (f"steerwise fit: error: {src}:2: not valid JSON (Expecting value "
                                  "at column 10)")


def test_non_utf8_task_file_names_file_and_line(tmp_path, capsys, no_hub):
    task = tmp_path / "t.jsonl"
    task.write_bytes(b'{"prompt": "a b", "correct": "x", "wrong": "y"}\n{"prompt": "caf\xe9"}\n')
    assert main(["scale", "fit", "--task", str(task), "--out", str(tmp_path / "r")]) == 2
    assert error_line(capsys) == (f"steerwise scale fit: error: {task}:2: not UTF-8 text (byte 0xe9 "
                                  "at column 16); save the file as UTF-8")


def test_non_utf8_and_bad_json_in_evaluation_files(tmp_path):
    from steerwise.eval.data import read_jsonl

    bad = tmp_path / "c.jsonl"
    bad.write_bytes(b'{"prompt": "p", "continuation": "c"}\n\xff\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not UTF-8 text \(byte 0xff at column 1\)"):
        read_jsonl(bad)
    bad.write_text('{"prompt": "p"}\n\n{"prompt": }\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:3: not valid JSON \(Expecting value at column 12\)"):
        read_jsonl(bad)


def test_directory_given_as_text_file(tmp_path, capsys, no_hub):
    assert main(["fit", "--source", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert error_line(capsys) == (f"steerwise fit: error: {tmp_path} is a directory, not a "
                                  "text file")


# ------------------------------------------------------------------------- numbers and prompts

@pytest.mark.parametrize(("argv", "expected"), [
    (["generate", "--strength", "nan", "x"],
     "argument --strength: expected a finite number, got 'nan'"),
    (["generate", "--strength", "inf", "x"],
     "argument --strength: expected a finite number, got 'inf'"),
    (["generate", "--strength=-inf", "x"],
     "argument --strength: expected a finite number, got '-inf'"),
    (["generate", ""], "argument prompts: a prompt is empty; give some text"),
    (["generate", "ok", "   "], "argument prompts: a prompt is empty; give some text"),
    (["generate", "--max-new-tokens", "0", "x"],
     "argument --max-new-tokens: expected an integer >= 1, got '0'"),
    (["generate", "--top-p", "1.5", "x"], "argument --top-p: expected a number in (0, 1], got '1.5'"),
    (["fit", "--source", "s.txt", "--out", "r", "--n-components", "0"],
     "argument --n-components: expected an integer >= 1, got '0'"),
    (["fit", "--source", "s.txt", "--out", "r", "--cv-folds", "1"],
     "argument --cv-folds: expected an integer >= 2, got '1'"),
    (["fit", "--source", "s.txt", "--out", "r", "--threshold", "2"],
     "argument --threshold: expected a number in [0, 1], got '2'"),
    (["fit", "--source", "s.txt", "--out", "r", "--strength", "nan"],
     "argument --strength: expected a finite number, got 'nan'"),
    (["fit", "--source", "s.txt", "--out", "r", "--batch-size", "-4"],
     "argument --batch-size: expected an integer >= 1, got '-4'"),
    (["demo", "--n-prompts", "0"], "argument --n-prompts: expected an integer >= 1, got '0'"),
    (["demo", "--n-prompts", "-1"], "argument --n-prompts: expected an integer >= 1, got '-1'"),
    (["demo", "--seeds", "0"], "argument --seeds: expected an integer >= 1, got '0'"),
    (["demo", "--strengths", "5", "nan"],
     "argument --strengths: expected a finite number, got 'nan'"),
    (["scale", "fit", "--task", "ccc", "--out", "r", "--betas", "1,inf"],
     "argument --betas: expected comma-separated finite numbers, got '1,inf'"),
    (["scale", "fit", "--task", "ccc", "--out", "r", "--steps", "-1"],
     "argument --steps: expected an integer >= 0, got '-1'"),
    (["diffusion", "fit", "--pipeline", "tiny-sd", "--out", "r", "--n-components", "0"],
     "argument --n-components: expected an integer >= 1, got '0'"),
    (["diffusion", "sweep", "--pipeline", "tiny-sd", "--recipe", "r", "--out", "o",
      "--strengths", "0,nan"],
     "argument --strengths: expected comma-separated finite numbers, got '0,nan'"),
    (["sweep", "--out", "o", "--n-fit", "0"], "argument --n-fit: expected an integer >= 1, got '0'"),
])
def test_out_of_range_options_are_one_line(argv, expected, capsys, no_hub):
    assert main(argv) == 2
    line = error_line(capsys)
    prog = "steerwise " + " ".join(argv[:2] if argv[0] in ("scale", "diffusion") else argv[:1])
    assert line.startswith(f"{prog}: error: {expected}"), line
    assert line.endswith("--help)")


def test_nan_in_a_sweep_grid_names_the_value(capsys, no_hub):
    assert main(["sweep", "--out", "o", "--grid", "0.5,nan"]) == 2
    assert error_line(capsys) == ("steerwise sweep: error: --grid: strengths must be finite "
                                  "numbers, got nan in '0.5,nan'")


# ------------------------------------------------------------------------- main's safety net

def _raise(exc: BaseException):
    def func(args: argparse.Namespace) -> int:
        raise exc

    return func


def test_library_errors_become_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_sites", _raise(OSError("first line\nsecond line")))
    assert main(["sites"]) == 2
    err = capsys.readouterr().err
    assert err == "steerwise sites: error: first line second line\n"
    assert main(["sites", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith(
        "steerwise sites: error: first line second line\n")
    monkeypatch.setenv("STEERWISE_DEBUG", "1")
    assert main(["sites"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_sites", _raise(KeyboardInterrupt()))
    assert main(["sites"]) == 130
    assert capsys.readouterr().err == "steerwise: interrupted\n"


def test_usage_errors_are_one_line_on_stderr_from_a_shell():
    out = subprocess.run([sys.executable, "-m", "steerwise.cli", "demo", "--n-prompts", "0"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("steerwise demo: error: argument --n-prompts: expected an integer >= 1, "
                          "got '0' (see steerwise demo --help)\n")


# ------------------------------------------------------------------------- --help

def _all_parsers(parser: argparse.ArgumentParser, name: str = "steerwise"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) >= 15  # steerwise, fit, generate, sites, demo, sweep, scale x3, diffusion x4
    missing, no_default = [], []
    for name, parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(label)
                continue
            shown = formatter._expand_help(action)
            if action.option_strings and action.default is not None \
                    and action.default is not argparse.SUPPRESS \
                    and not (action.nargs == 0 and isinstance(action.default, bool)) \
                    and "default" not in shown:
                no_default.append(label)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help hides the default: {no_default}"


def test_help_shows_defaults(capsys):
    assert main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "PCA rank r of DSAS gates (default: 5)" in text
    assert "default strength saved in the recipe (default: auto)" in text


# ------------------------------------------------------------------------- --explain as numbers

@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    """A CAA + DSAS recipe on the embedded concept-lm (fruit vs other topics, layers 0-1)."""
    from steerwise.tasks import concepts

    d = tmp_path_factory.mktemp("recipe")
    sets = concepts.demo_sets(12, seed=0)
    for name in ("source", "target", "control"):
        (d / f"{name}.txt").write_text("\n".join(sets[name]))
    rc = main(["fit", "--source", str(d / "source.txt"), "--target", str(d / "target.txt"),
               "--control", str(d / "control.txt"), "--cv-folds", "3", "--layers", "0-1",
               "--out", str(d / "r")])
    assert rc == 0
    return d / "r"


def _explain(recipe_dir) -> int:
    return main(["generate", "--recipe", str(recipe_dir), "--strength", "2", "--explain",
                 "--max-new-tokens", "3", "my uncle washed a"])


# the prompt's tokens, "|", the generated tokens (the last one never went through the model: "-")
NUMBERS = re.compile(r"^gate per token \(mean over 2 sites\): (<bos>:\d\.\d\d )?"
                     r"my:\d\.\d\d uncle:\d\.\d\d washed:\d\.\d\d a:\d\.\d\d \| "
                     r"\S+:\d\.\d\d \S+:\d\.\d\d \S+:-$", re.MULTILINE)


def test_explain_without_a_terminal_prints_numbers(recipe_dir, capsys):
    assert _explain(recipe_dir) == 0
    out = capsys.readouterr().out
    assert NUMBERS.search(out), out
    values = [float(v) for v in re.findall(r":(\d\.\d\d)", out)]
    assert len(values) in (6, 7) and all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_explain_on_a_terminal_without_colour_prints_numbers(env, recipe_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, color_system="truecolor"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _explain(recipe_dir) == 0
    out = capsys.readouterr().out
    assert NUMBERS.search(re.sub(r"\x1b\[[0-9;]*m", "", out)), out


def test_explain_on_a_colour_terminal_colours_the_tokens(recipe_dir, monkeypatch, capsys):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, color_system="truecolor"))
    assert _explain(recipe_dir) == 0
    out = capsys.readouterr().out
    assert "gate per token" not in out and "\x1b[" in out and "48;2;" in out  # background colours


def test_export_without_the_gguf_package_is_one_line(monkeypatch):
    """llama.cpp control vectors are GGUF files: without the gguf package, export says how to
    install it instead of raising ImportError."""
    import sys

    from steerwise.export import ExportError, _gguf

    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ExportError, match=r"pip install 'steerwise\[gguf\]'"):
        _gguf()
