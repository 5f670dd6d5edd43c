"""Recipes on the Hub (offline, from a pre-filled Hugging Face cache; push through a stand-in API)
and the model card every saved recipe carries."""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_model, make_tokenizer, random_recipe
from huggingface_hub import HfApi, constants, scan_cache_dir

from steerwise import DSASOptions, Recipe
from steerwise.card import model_card
from steerwise.fit import fit
from steerwise.hub import RECIPE_FILES
from steerwise.recipe import RecipeError

IDS = torch.tensor([[5, 9, 12, 7, 20]])
REPO = "someone/caa-recipe"


def run(model, recipe, strength=1.5):
    with recipe.apply(model, strength), torch.no_grad():
        return model(IDS).logits


def put_in_cache(cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Store ``folder`` as one commit of ``repo_id`` the way huggingface_hub's cache does: blobs
    by content hash, a snapshot of symlinks per commit, and refs naming commits."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    commit = hashlib.sha1(b"".join(files.values())).hexdigest()
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_by_repo_id_with_revision_pinning(tmp_path, offline_cache):
    model = make_model("qwen2")
    old, new = random_recipe(model, seed=1), random_recipe(model, seed=2)
    old_commit = put_in_cache(offline_cache, REPO, old.save_pretrained(tmp_path / "v1"),
                              refs=("v1",))
    new_commit = put_in_cache(offline_cache, REPO, new.save_pretrained(tmp_path / "v2"))
    # a valid huggingface_hub cache: its own scanner sees both revisions
    (repo,) = scan_cache_dir(offline_cache).repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {old_commit,
                                                                                 new_commit}
    expected_old, expected_new = run(model, old), run(model, new)
    assert not torch.equal(expected_old, expected_new)
    assert torch.equal(run(model, Recipe.from_pretrained(REPO)), expected_new)  # refs/main
    assert torch.equal(run(model, Recipe.from_pretrained(REPO, revision=old_commit)), expected_old)
    assert torch.equal(run(model, Recipe.from_pretrained(REPO, revision="v1")), expected_old)


def test_hub_errors_name_the_id_revision_and_cache(tmp_path, offline_cache):
    with pytest.raises(FileNotFoundError, match=r"'someone/missing'.*not in the Hugging Face "
                                                r"cache.*offline mode"):
        Recipe.from_pretrained("someone/missing")
    put_in_cache(offline_cache, REPO, random_recipe(make_model("llama")).save_pretrained(
        tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match=r"at revision 'v9'"):
        Recipe.from_pretrained(REPO, revision="v9")
    # paths keep the recipe reader's message
    with pytest.raises(FileNotFoundError, match="not a steerwise recipe"):
        Recipe.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="is a local directory"):
        Recipe.from_pretrained(tmp_path / "r", revision="main")


def test_local_directory_wins_over_a_repo_id(tmp_path, offline_cache, monkeypatch):
    model = make_model("llama")
    hub, local = random_recipe(model, seed=1), random_recipe(model, seed=2)
    put_in_cache(offline_cache, REPO, hub.save_pretrained(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    local.save_pretrained(Path(REPO))  # ./someone/caa-recipe
    assert torch.equal(run(model, Recipe.from_pretrained(REPO)), run(model, local))


def test_cli_reads_the_usual_cache_under_hf_home_offline(tmp_path):
    from steerwise.generate import generate
    from steerwise.models import load_model

    model, tok = load_model("concept-lm", device="cpu")
    recipe = random_recipe(model)
    hf_home = tmp_path / "hf-home"
    put_in_cache(hf_home / "hub", REPO, recipe.save_pretrained(tmp_path / "r"))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-m", "steerwise.cli", "generate", "--model", "concept-lm", "--device",
         "cpu", "--max-new-tokens", "4", "--recipe", REPO, "--strength", "4", "the apple"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    expected = generate(model, tok, ["the apple"], recipe, 4.0, max_new_tokens=4, seed=0)
    assert f"steered:   the apple{expected.continuations[0]}" in out.stdout


class StandInHub:
    """Stands in for ``HfApi``: checks every call against HfApi's real signature, and stores
    an uploaded folder as a commit in a local Hugging Face cache."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.calls = cache, []

    def _check(self, name: str, *args, **kwargs) -> None:
        inspect.signature(getattr(HfApi, name)).bind(HfApi(), *args, **kwargs)
        self.calls.append((name, kwargs))

    def create_repo(self, repo_id, **kwargs):
        self._check("create_repo", repo_id, **kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self._check("upload_folder", **kwargs)
        folder = Path(kwargs["folder_path"])
        self.uploaded = sorted(p.name for p in folder.iterdir())
        self.card = (folder / "README.md").read_text()
        return put_in_cache(self.cache, kwargs["repo_id"], folder)


def test_push_to_hub_round_trip_through_a_stand_in(offline_cache):
    model = make_model("qwen2")
    recipe = random_recipe(model)
    api = StandInHub(offline_cache)
    commit = recipe.push_to_hub(REPO, private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True and api.calls[0][1]["exist_ok"] is True
    assert api.uploaded == sorted(RECIPE_FILES)
    assert f'Recipe.from_pretrained("{REPO}")' in api.card
    loaded = Recipe.from_pretrained(REPO, revision=commit)
    assert torch.equal(run(model, loaded), run(model, recipe))


@pytest.fixture(scope="module")
def fitted():
    model, tok = make_model("llama"), make_tokenizer()
    source = ["the apple is sweet", "a ripe pear", "the banana is good", "sweet fruit",
              "a red apple", "the pear is ripe"]
    control = ["the car is fast", "a big bus", "the dog runs", "cold snow", "the train is big",
               "a cat sleeps"]
    recipe = fit(model, tok, source, control, method="caa", gate="dsas", progress=False,
                 dsas=DSASOptions(cv_folds=2, n_components=2), default_strength=3.0)
    recipe.fit_info["model_name"] = "org/tiny-llama"
    return recipe


def test_saved_recipe_carries_a_model_card(fitted, tmp_path):
    out = fitted.save_pretrained(tmp_path / "card-recipe")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: steerwise\n")
    assert "base_model: org/tiny-llama" in card
    facts = ("`caa`", "`dsas`", "| default strength λ | 3 |", "6 source texts (S) and 6 control",
             "llama, 3 layers, hidden size 32", "| gate threshold τ | 0.75 |",
             "3 sites (residual)")
    for fact in facts:
        assert fact in card, fact
    for d in fitted.diagnostics():  # one table row per site, with its measured accuracies
        row = next(line for line in card.splitlines() if line.startswith(f"| `{d['site']}` |"))
        assert f"| {d['gate_accuracy']:.3f} |" in row and f"| {d['probe_accuracy']:.3f} |" in row
        assert f"| {d['scale']:.2f} |" in row
    assert f'Recipe.from_pretrained("{tmp_path / "card-recipe"}")' in card
    # re-saving replaces the card with the current one
    fitted.default_strength = 5.0
    fitted.save_pretrained(out)
    assert "| default strength λ | 5 |" in (out / "README.md").read_text()
    fitted.default_strength = 3.0
    # a README.md is part of a recipe only beside steerwise.json: a user's is never replaced
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("mine")
    with pytest.raises(RecipeError, match=r"other files than a recipe \(README.md\)"):
        fitted.save_pretrained(tmp_path / "project")
    assert (tmp_path / "project" / "README.md").read_text() == "mine"


def test_card_metadata_names_only_hub_base_models(fitted, tmp_path):
    fitted.fit_info["model_name"] = "concept-lm"
    try:
        card = model_card(fitted, repo_id=REPO)
    finally:
        fitted.fit_info["model_name"] = "org/tiny-llama"
    assert "base_model:" not in card and "`concept-lm`" in card
    assert f"--recipe {REPO}" in card
