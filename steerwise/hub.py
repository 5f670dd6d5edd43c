"""Recipes on the Hugging Face Hub: ``Recipe.from_pretrained("user/recipe")`` and
``recipe.push_to_hub("user/recipe")``.

Loading goes through ``huggingface_hub.snapshot_download``, so it behaves like every other Hub
library: files are cached in the usual cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``revision`` pins
a branch, tag or commit, ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) reads the cache
only, and a private repo takes ``token`` (or the logged-in token). A path that exists on disk is
always read as a directory; anything else that is a valid repo id is looked up on the Hub.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe

# the files of a recipe directory (steerwise.json, steering.safetensors) and its model card
RECIPE_FILES = ("steerwise.json", "steering.safetensors", "README.md")


def _looks_like_path(name: str) -> bool:
    """A name that can only be a path (a repo id is ``name`` or ``namespace/name``)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def resolve_recipe_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local directory of a recipe: ``name_or_path`` itself when it exists on disk or can
    only be a path, else the cached snapshot of the Hub repo of that id (downloaded unless
    offline). Hub errors name the id, the revision and the cache."""
    path = Path(name_or_path).expanduser()
    if path.exists() and revision is None:
        return path
    name = str(name_or_path)
    if path.exists():
        raise ValueError(f"revision={revision!r} was given, but {name!r} is a local directory")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    if _looks_like_path(name):
        return path  # the reader says it is not a recipe directory
    try:
        validate_repo_id(name)
    except HFValidationError:
        return path
    at = f" at revision {revision!r}" if revision else ""
    try:
        # Offline mode passed on as local_files_only: huggingface_hub 1.33 (what transformers 5.0
        # gets) otherwise lists a commit-hash revision on the Hub even when offline, and fails.
        return Path(snapshot_download(
            name, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only or constants.is_offline_mode(),
            allow_patterns=list(RECIPE_FILES),
        ))
    except LocalEntryNotFoundError:
        offline = local_files_only or constants.is_offline_mode()
        why = ("offline mode (HF_HUB_OFFLINE / local_files_only) reads only the cache"
               if offline else "the Hub could not be reached")
        raise FileNotFoundError(
            f"no recipe directory {name}, and the Hub recipe {name!r}{at} is not in the Hugging "
            f"Face cache ({cache_dir or constants.HF_HUB_CACHE}); {why}"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub repo {name!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no recipe directory {name}, and no Hub repo {name!r} (or it is private: log in or "
            f"pass a token)"
        ) from None


def push_to_hub(
    recipe: Recipe,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    api: Any = None,
) -> Any:
    """Create ``repo_id`` (a model repo) if needed and upload the recipe with its model card in
    one commit; returns ``huggingface_hub``'s ``CommitInfo``. ``api``: an ``HfApi`` (default: a
    new one with ``token``)."""
    from .card import model_card

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    with tempfile.TemporaryDirectory(prefix="steerwise-push-") as tmp:
        folder = recipe.save_pretrained(Path(tmp) / "recipe")
        (folder / "README.md").write_text(model_card(recipe, repo_id=repo_id), encoding="utf-8")
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
            commit_message=commit_message or f"steerwise recipe ({recipe.method} + {recipe.gate})",
            create_pr=create_pr, allow_patterns=list(RECIPE_FILES),
        )
