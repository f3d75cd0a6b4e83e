"""``cpmlive download REPO``: a published model repository from the Hugging Face Hub, on disk.

A thin layer over ``huggingface_hub.snapshot_download`` (so ``HF_ENDPOINT``, ``HF_HOME``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean to every HF tool): the files land in the
hub's cache, or in ``out`` when given, and the directory is returned. Every failure the hub's
client reports (no such repository or revision, no network, a gated repository) is one
:class:`~cpmlive.errors.CpmliveError` line. Where each CPM model lives is in README.md
("Getting the published models").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cpmlive.errors import CpmliveError
from cpmlive.utils import check_output

# owner/name as the hub spells them: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'
_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def check_repo_id(repo: str) -> str:
    """``repo`` when it is ``owner/name``; anything else (a URL, a path, one word) is refused."""
    if not _REPO_RE.fullmatch(repo) or ".." in repo or repo.endswith((".", "-")):
        raise CpmliveError(f"{repo!r} is not a Hub repository id (expected owner/name, e.g. openbmb/cpm-ant-10b)")
    return repo


def _reason(exc: Exception, repo: str, revision: str | None) -> str:
    """One line for a failure of the hub's client."""
    from huggingface_hub import errors

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo}: no revision {revision!r} on {endpoint}"
    if isinstance(exc, errors.GatedRepoError):
        return f"{repo}: the repository is gated; accept its terms on the Hub and set HF_TOKEN"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{repo}: no such repository on {endpoint} (or it is private: set HF_TOKEN)"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        return f"{repo}: cannot reach {endpoint} and no copy is cached{offline}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    where = f"HTTP {status}" if status else type(exc).__name__
    return f"{repo}: download failed ({where}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"


def _check_remote(repo: str, revision: str | None, include: list[str] | None) -> None:
    """Refuse a bad repository, revision or pattern before any transfer (some file must match
    ``include``). Offline (``HF_HUB_OFFLINE``) there is nothing to ask: the cache answers."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    if constants.HF_HUB_OFFLINE:
        return
    info = huggingface_hub.HfApi().repo_info(repo, revision=revision)
    names = [sibling.rfilename for sibling in info.siblings or []]
    if not list(filter_repo_objects(names, allow_patterns=include or None)):
        raise CpmliveError(f"{repo}: no file matches {' '.join(include or ['*'])} "
                           f"(the repository has: {', '.join(sorted(names)[:12]) or 'no files'})")


def download(repo: str, revision: str | None = None, out: str | os.PathLike[str] | None = None,
             include: list[str] | None = None, force: bool = False) -> Path:
    """Download ``repo`` (every file, or those matching the ``include`` glob patterns) and return
    its directory: ``out`` if given, else the snapshot in the hub's cache. An ``out`` that holds
    other files is refused unless ``force`` (what an interrupted download left there resumes)."""
    import httpx2  # huggingface_hub's HTTP client
    import huggingface_hub
    from huggingface_hub import errors

    check_repo_id(repo)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CpmliveError(f"{out}: exists and is not a directory")
    if out is not None:
        check_output(out, force, resumable=(".cache",))  # huggingface_hub's resume state in a local_dir
    try:
        _check_remote(repo, revision, include)  # refuse a bad repo, revision or pattern before any transfer
        # the revision as given, not the commit it resolved to: a branch's ref is then recorded in
        # the hub's cache, so an offline run (HF_HUB_OFFLINE=1, transformers) finds the snapshot
        path = huggingface_hub.snapshot_download(repo_id=repo, revision=revision, local_dir=out,
                                                 allow_patterns=include or None)
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.HFValidationError,
            errors.IncompleteSnapshotError) as exc:
        raise CpmliveError(_reason(exc, repo, revision)) from None
    except httpx2.TransportError as exc:  # no route to the hub, a timeout, a connection reset mid-file
        raise CpmliveError(_reason(errors.LocalEntryNotFoundError(str(exc)), repo, revision)) from None
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        raise CpmliveError(f"{repo}: download failed ({type(exc).__name__}: {exc})") from None
    return Path(path)

__all__ = ["check_repo_id", "download"]
