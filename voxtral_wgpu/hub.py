"""Models on first use: a Hugging Face repo id is fetched into the Hugging Face cache, then loaded.

``ORG/NAME`` names a repo; ``ORG/NAME:FILE.gguf`` picks one GGUF in it. From a repo holding the
Mistral-native checkpoint only ``params.json``, ``consolidated.safetensors`` and ``tekken.json`` are
fetched (such repos also hold other formats that would double the download); from a repo holding
GGUFs, the chosen one (all its ``.part-NNN`` byte shards when it is sharded) and ``tekken.json``.

Downloads go through huggingface_hub (its cache layout, progress bars, ``HF_TOKEN``, ``HF_ENDPOINT``,
``HF_HUB_CACHE``; an interrupted transfer is resumed with a Range request). ``offline=True`` or
``HF_HUB_OFFLINE=1`` reads the cache only and makes no request at all.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

NATIVE_FILES = ("params.json", "consolidated.safetensors", "tekken.json")
TOKENIZER = "tekken.json"
_SHARD = re.compile(r"^(?P<base>.+\.gguf)\.part-(?P<idx>\d{3})$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelFetchError(FileNotFoundError):
    """The model could not be found or fetched; the message names the repo, the file and what to do.

    A FileNotFoundError so that callers treating "no such model" alike (the CLI's one-line error)
    need no new case."""


def parse_model_spec(spec: str) -> tuple[str, str | None] | None:
    """``"ORG/NAME"`` -> ``(repo_id, None)``, ``"ORG/NAME:FILE.gguf"`` -> ``(repo_id, FILE.gguf)``;
    None when ``spec`` does not look like a repo id (a local path, ``./x``, ``/abs``, ``~/x``)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return None
    repo, sep, filename = spec.partition(":")
    if not _REPO_ID.match(repo):
        return None
    if sep and not filename:
        raise ModelFetchError(f"model {spec!r}: nothing after ':'; write ORG/NAME:FILE.gguf or just ORG/NAME")
    return repo, (filename or None)


def offline_mode(offline: bool | None = None) -> bool:
    """True when ``offline`` says so or HF_HUB_OFFLINE is set (read now, not only at import, so a
    variable set after huggingface_hub was imported still counts)."""
    if offline:
        return True
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def choose_files(repo_id: str, names: list[str], filename: str | None) -> list[str]:
    """The files to fetch from a repo holding ``names``: the native checkpoint's three, or one GGUF
    (all its shards) and tekken.json. Raises ModelFetchError saying what is missing or ambiguous."""
    present = set(names)
    ggufs: dict[str, list[str]] = {}  # one entry per GGUF: its file, or its shards in order
    for n in sorted(names):
        m = _SHARD.match(n)
        if n.endswith(".gguf"):
            ggufs.setdefault(n, []).append(n)
        elif m:
            ggufs.setdefault(m.group("base"), []).append(n)
    if filename is not None:
        key = filename[:-len(".part-000")] if filename.endswith(".part-000") else filename
        if key not in ggufs and filename not in present:
            listing = ", ".join(sorted(ggufs)) or "none"
            raise ModelFetchError(f"file {filename!r} is not in Hugging Face repo {repo_id!r} (its GGUF files: "
                                  f"{listing}); pick one with {repo_id}:FILE.gguf")
        files = ggufs.get(key, [filename])
    elif "consolidated.safetensors" in present:
        files = [f for f in NATIVE_FILES if f != TOKENIZER]
        missing = [f for f in files if f not in present]
        if missing:
            raise ModelFetchError(f"Hugging Face repo {repo_id!r} has consolidated.safetensors but no "
                                  f"{', '.join(missing)}; it is not a Mistral-native Voxtral checkpoint")
    elif len(ggufs) == 1:
        files = next(iter(ggufs.values()))
    elif ggufs:
        raise ModelFetchError(f"Hugging Face repo {repo_id!r} holds {len(ggufs)} GGUF files ({', '.join(sorted(ggufs))}); "
                              f"pick one with {repo_id}:FILE.gguf")
    else:
        raise ModelFetchError(f"Hugging Face repo {repo_id!r} holds neither consolidated.safetensors nor a .gguf file; "
                              "it is not a Voxtral Realtime checkpoint this package reads")
    if TOKENIZER not in present:
        raise ModelFetchError(f"Hugging Face repo {repo_id!r} has no {TOKENIZER} beside {files[0]}; download the "
                              "tokenizer from the original repo and pass it with --tokenizer / tokenizer=")
    return files + [TOKENIZER]


def _entry_point(root: Path, files: list[str]) -> Path:
    """What load() opens: the snapshot folder for a native checkpoint, the GGUF (first shard) file otherwise."""
    weights = files[0]
    return root if weights == "params.json" else root / weights


def _errors():
    try:  # huggingface_hub >= 0.23 keeps its exceptions here
        from huggingface_hub import errors as e
    except ImportError:  # older releases: in utils
        from huggingface_hub import utils as e
    return e


def fetch(repo_id: str, filename: str | None = None, *, offline: bool | None = None,
          progress: bool | None = None) -> Path:
    """Fetch (or find in the cache) a Voxtral model repo; returns the path load() opens: a snapshot
    folder (native checkpoint) or the GGUF / first shard in it. ``progress=False`` hides the
    download bars (default: huggingface_hub's, which honour HF_HUB_DISABLE_PROGRESS_BARS)."""
    from huggingface_hub import constants

    if offline_mode(offline):
        return _from_cache(repo_id, filename)
    from huggingface_hub import HfApi, snapshot_download

    err = _errors()
    endpoint = constants.ENDPOINT
    tqdm_class = None
    if progress is False:
        from tqdm.auto import tqdm

        class tqdm_class(tqdm):  # noqa: N801 - huggingface_hub takes a tqdm class
            def __init__(self, *a, **k):
                k["disable"] = True
                super().__init__(*a, **k)
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id)
    except err.RepositoryNotFoundError:
        raise ModelFetchError(
            f"model {repo_id!r} is not a local path, and no Hugging Face repo of that name was found at {endpoint} "
            "(if it is private or gated: accept its terms on the Hub and log in with `hf auth login`); check the "
            "name or pass a local model directory") from None
    except Exception as e:  # no network, DNS, TLS, a 5xx: the cache may still hold it
        try:
            return _from_cache(repo_id, filename)
        except ModelFetchError:
            raise ModelFetchError(
                f"could not reach {endpoint} to fetch Hugging Face repo {repo_id!r} ({type(e).__name__}: "
                f"{_first_line(e)}) and it is not in the local Hugging Face cache; check the network "
                "(or HF_ENDPOINT), or pass a local model directory") from None
    names = [s.rfilename for s in (info.siblings or [])]
    files = choose_files(repo_id, names, filename)
    try:
        # snapshot_download pins every file to one commit and writes refs/main, which offline runs read
        root = snapshot_download(repo_id, allow_patterns=[glob.escape(f) for f in files], endpoint=endpoint,
                                 tqdm_class=tqdm_class)
    except err.RepositoryNotFoundError:
        raise ModelFetchError(f"Hugging Face repo {repo_id!r} vanished from {endpoint} while fetching it; "
                              "check the name") from None
    except Exception as e:
        raise ModelFetchError(
            f"downloading {', '.join(files)} from Hugging Face repo {repo_id!r} failed ({type(e).__name__}: "
            f"{_first_line(e)}); run the command again to resume, or fetch them with `hf download {repo_id} "
            f"{' '.join(files)}` and pass the folder") from None
    root = Path(root)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:  # the listing and the download disagreed (a push in between)
        raise ModelFetchError(f"Hugging Face repo {repo_id!r}: {', '.join(missing)} missing after the download; "
                              "run the command again")
    return _entry_point(root, files)


def _from_cache(repo_id: str, filename: str | None) -> Path:
    """The cached snapshot of refs/main, without any request."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    what = f"{repo_id}:{filename}" if filename else repo_id
    hint = (f"run once without --offline / HF_HUB_OFFLINE to fetch it, or `hf download {repo_id}` on a machine "
            "online, or pass a local model directory")
    if not ref.is_file():
        raise ModelFetchError(f"model {what!r} is not in the local Hugging Face cache ({cache}) and offline mode "
                              f"is on; {hint}")
    snap = repo_dir / "snapshots" / ref.read_text().strip()
    names = [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()] if snap.is_dir() else []
    try:
        files = choose_files(repo_id, names, filename)
    except ModelFetchError as e:
        raise ModelFetchError(f"{e} (looked in the local Hugging Face cache, {snap}, offline mode is on; {hint})") from None
    return _entry_point(snap, files)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""
