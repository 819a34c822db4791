"""Uploading a converted directory to the Hugging Face hub (mlx-lm's `--upload-repo`)."""

from __future__ import annotations

from pathlib import Path

from illada_mlx.config import IlladaError


def _first_line(e: BaseException) -> str:
    """The error's first line, whole (the rest of a hub error is a response dump)."""
    return (str(e).strip().splitlines() or [""])[0]


def check_repo_id(repo: str) -> None:
    """Refuse a malformed repo id before anything is converted."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise IlladaError(f"--upload-repo {repo!r} is not a hub repo id ({_first_line(e)})")


def upload_to_hub(path: Path, repo: str) -> str:
    """Create the model repo if needed and upload `path` to it in one commit; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    except Exception as e:  # network, authentication, permissions: the hub's errors have many types
        raise IlladaError(
            f"upload to {repo} failed ({type(e).__name__}: {_first_line(e)}); the converted model is "
            f"in {path}: log in (`hf auth login`) and upload it with `hf upload {repo} {path}`"
        )
    return str(url)
