"""A Hugging Face Hub id (`org/name` or `org/name@revision`) given where a folder is expected: resolved
to its snapshot folder in the Hugging Face cache, downloading only what a conversion reads. The cache,
HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and tokens are huggingface_hub's business (the optional extra
`converter-core[hub]`); we only choose the files and word its failures as one line. The snapshot is a
source like any other: never written to."""

import os
import re

from converter_core.errors import ConversionError, first_line

# What a conversion reads: config and generation config, tokenizer files, remote code, chat templates,
# safetensors (else .bin) weights with their index, and a Megatron checkpoint's tracker and iteration folders.
SIDE_FILES = ["*.json", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja", "iter_*/*", "release/*"]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
PICKLED = ["*.bin", "*.bin.index.json"]
# The Hub's own rule for names (huggingface_hub.utils.validate_repo_id), plus an optional @revision.
HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]{1,96})(?:@(?P<revision>[\w./-]+))?")


def _incomplete(errors):
    """huggingface_hub's error for a cached snapshot that lacks files (newer versions only)."""
    return getattr(errors, "IncompleteSnapshotError", errors.LocalEntryNotFoundError)


def looks_like_id(text):
    text = os.fspath(text)
    match = HUB_ID.fullmatch(text)
    return bool(match) and "--" not in match["repo"] and ".." not in match["repo"] and not text.startswith(".")


def resolve(path, weights=True):
    """`path` itself when something is there or it is no Hub id (a local folder wins, as in transformers);
    else the snapshot folder of the Hub id, from the cache or downloaded. `weights=False` (a reference or
    tokenizer folder): only the side files are fetched."""
    text = os.fspath(path)
    if os.path.lexists(text) or not looks_like_id(text):
        return path
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ConversionError(f"{text}: no such model folder; to read it from the Hugging Face Hub, "
                              "pip install 'converter-core[hub]'", path=text) from None
    match = HUB_ID.fullmatch(text)
    repo, revision = match["repo"], match["revision"]
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision,
                                                   allow_patterns=SIDE_FILES + SAFETENSORS * weights)
        if weights and not any(name.endswith(".safetensors") for _, _, names in os.walk(folder) for name in names):
            folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=SIDE_FILES + PICKLED)
    except errors.RevisionNotFoundError:
        raise ConversionError(f"{text}: the Hugging Face Hub model {repo} has no revision {revision}",
                              path=text) from None
    except errors.GatedRepoError:
        raise ConversionError(f"{text}: a gated model on the Hugging Face Hub: accept its terms on huggingface.co, "
                              "then log in (`hf auth login` or HF_TOKEN)", path=text) from None
    except errors.RepositoryNotFoundError:
        raise ConversionError(f"{text}: no such model folder, and no such model on the Hugging Face Hub (a private one "
                              "needs a login: `hf auth login` or HF_TOKEN)", path=text) from None
    except (errors.LocalEntryNotFoundError, _incomplete(errors)) as error:
        where = huggingface_hub.constants.HF_HUB_CACHE
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            problem = f"not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE is set"
        elif not isinstance(error, errors.LocalEntryNotFoundError):  # an incomplete snapshot
            problem = f"its snapshot in the Hugging Face cache ({where}) is incomplete and the Hub cannot be reached"
        else:
            problem = f"not in the Hugging Face cache ({where}) and the Hub cannot be reached"
        raise ConversionError(f"{text}: no such model folder, and {problem}", path=text) from None
    except (errors.HfHubHTTPError, OSError, ValueError) as error:
        raise ConversionError(f"{text}: cannot download it from the Hugging Face Hub ({first_line(error)})",
                              path=text) from None
    return folder
