"""Uploads an export directory to a Hugging Face model repository (:func:`push_to_hub`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from jaxpost.runtime.credentials import WHERE_TO_ADD, resolve_credentials
from jaxpost.export.directory import README_FILE

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub model id (``USER/NAME`` or ``ORG/NAME``)."""
    return isinstance(name, str) and _REPO_ID.fullmatch(name) is not None


def hub_write_token(repo_id: str, token: str | None = None):
    """Checks a Hub repo id and finds the token to push with, before any export work.

    Returns:
      The token as a ``jaxpost.runtime.credentials.Secret`` (``token``, else ``HF_TOKEN`` from the
      Colab/Kaggle secrets or the environment).

    Raises:
      ValueError: ``repo_id`` is not ``USER/NAME`` or breaks the Hub's naming rules.
      PermissionError: no token was found.
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is malformed: expected USER/NAME or ORG/NAME, "
                         "e.g. 'my-name/gemma3-gsm8k-grpo'")
    validate_repo_id(repo_id)
    secret = resolve_credentials(hf_token=token).hf_token
    if secret is None:
        raise PermissionError(f"pushing to the Hugging Face Hub needs a write token: set the "
                              f"HF_TOKEN secret ({WHERE_TO_ADD}) or pass token=")
    return secret


def push_to_hub(export_dir: str | os.PathLike, repo_id: str, token: str | None = None,
                private: bool = True, *, endpoint: str | None = None) -> str:
    """Uploads an export directory to a Hugging Face model repository.

    Creates the repository if needed (``create_repo(exist_ok=True)``), then uploads every
    file of the directory in one commit (``upload_folder``).

    Args:
      export_dir: a directory written by any ``jaxpost export`` format.
      repo_id: ``USER/NAME`` or ``ORG/NAME``.
      token: a write token; None takes ``HF_TOKEN`` from jaxpost's credentials (Colab
        secret, Kaggle secret or environment). It is never printed.
      private: create the repository as private.
      endpoint: a Hub URL (default ``HF_ENDPOINT`` or huggingface.co).

    Returns:
      The repository URL.

    Raises:
      ValueError: ``repo_id`` is malformed or ``export_dir`` is not an export directory.
      PermissionError: no token, or the Hub refused it.
    """
    path = Path(export_dir)
    if not path.is_dir() or not (path / README_FILE).is_file():
        raise ValueError(f"export_dir={str(export_dir)!r} is not an export directory (no "
                         f"{README_FILE}): write one with jaxpost export first")
    secret = hub_write_token(repo_id, token)
    api = HfApi(endpoint=endpoint, token=secret.reveal())
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                          commit_message="Upload jaxpost export")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"the Hugging Face Hub refused to write to {repo_id!r} "
                                  f"(HTTP {status}): HF_TOKEN must be a write token of an "
                                  "account that owns this namespace") from None
        raise
    base = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{base}/{repo_id}"
