"""c_null, the negative prompt's embedding, stored once beside a data set's shards.

``anyflow-ray prepare`` and ``anyflow-ray data`` encode ``model.negative_prompt`` with the text encoder
(as the learners did at every set-up) and write ``c_null.safetensors`` into the data folder (``data.root``;
for ``prepare``, the folder above ``prepare.output``): one ``(1, L, D)`` float32 tensor ``c_null``, with
the prompt, ``L`` and the text encoder's fingerprint in its metadata. ``load_uncond(cfg)`` returns it when
all three match the config (so a learner loads no text encoder) and otherwise (a data set written before
it existed, another negative prompt or model) encodes it, saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch

UNCOND_NAME = "c_null.safetensors"
log = logging.getLogger("anyflow_ray")


def encoder_fingerprint(base: str | Path) -> str:
    """A short hash of ``<base>/text_encoder`` and ``<base>/tokenizer``: their config files' contents and
    their weight files' names and sizes ("" when the folder has no text encoder)."""
    digest = hashlib.blake2b(digest_size=8)
    found = False
    for folder in ("text_encoder", "tokenizer"):
        path = Path(base) / folder
        if not path.is_dir():
            continue
        for file in sorted(path.iterdir()):
            if not file.is_file():
                continue
            found = True
            digest.update(file.name.encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
            else:
                digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest() if found else ""


def uncond_bytes(embedding: torch.Tensor, prompt: str, max_length: int, fingerprint: str) -> bytes:
    """The ``c_null.safetensors`` file of a ``(1, L, D)`` embedding."""
    from safetensors.torch import save

    if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[1] != max_length:
        raise ValueError(f"c_null must be (1, {max_length}, D), got {tuple(embedding.shape)}")
    meta = {"prompt": prompt, "max_length": str(max_length), "text_encoder": fingerprint}
    return save({"c_null": embedding.detach().float().contiguous().cpu()}, metadata=meta)


def write_uncond(folder: str, embedding: torch.Tensor, prompt: str, max_length: int, fingerprint: str,
                 filesystem: Any = None) -> str:
    """Write ``<folder>/c_null.safetensors`` (a local folder, or a path in the ``pyarrow.fs`` filesystem)
    under a temporary name, then renamed; returns its path."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    base = str(folder) if filesystem is not None else str(Path(folder).absolute())
    fs.create_dir(base, recursive=True)
    path, temp = f"{base}/{UNCOND_NAME}", f"{base}/.{UNCOND_NAME}.tmp"
    with fs.open_output_stream(temp) as stream:
        stream.write(uncond_bytes(embedding, prompt, max_length, fingerprint))
    fs.move(temp, path)
    return path


def parse_uncond(data: bytes, where: str) -> tuple[torch.Tensor, dict]:
    """(c_null, metadata) of a ``c_null.safetensors`` file's bytes; ValueError naming ``where``."""
    from safetensors.torch import load

    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
        tensor = load(data)["c_null"]
    except (struct.error, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{where}: not a c_null file ({error.__class__.__name__}: {error})") from error
    return tensor.float(), meta


def read_uncond(folder: str, filesystem: Any = None) -> tuple[torch.Tensor, dict] | None:
    """The stored c_null and its metadata, or None when the folder has none."""
    import pyarrow.fs as pafs

    if filesystem is None and "://" in str(folder):
        filesystem, folder = pafs.FileSystem.from_uri(str(folder))
    fs = filesystem or pafs.LocalFileSystem()
    base = str(folder).rstrip("/") if filesystem is not None else str(Path(folder).absolute())
    path = f"{base}/{UNCOND_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return parse_uncond(stream.read(), path)


def _data_folder(cfg) -> tuple[str, Any]:
    """(folder, filesystem or None) of ``data.root``: a URI, the local folder, or its copy under run.storage."""
    from anyflow_ray.run.storage import Storage

    root = str(cfg.data.root)
    if "://" in root or Path(root).is_dir():
        return root, None
    storage = Storage.of(cfg)
    remote = storage.remote_of(Path(root))
    return (remote, storage.fs) if remote is not None else (root, None)


def stored_mismatch(meta: dict, prompt: str, max_length: int, fingerprint: str) -> str:
    """Why a stored c_null does not fit (prompt, length, encoder), or "" when it does."""
    if meta.get("prompt") != prompt:
        return f"it encodes the negative prompt {meta.get('prompt', '')[:40]!r}, not model.negative_prompt"
    if meta.get("max_length") != str(max_length):
        return f"its text max length is {meta.get('max_length')}, the model's {max_length}"
    if fingerprint and meta.get("text_encoder") and meta["text_encoder"] != fingerprint:
        return "it was encoded by another text encoder than model.base's"
    return ""


def encode_uncond(base: str | Path, prompt: str, max_length: int) -> torch.Tensor:
    """(1, L, D) float32: ``prompt`` through ``<base>``'s text encoder (on this process's CPU)."""
    from anyflow_ray.models.loading import load_text_encoder
    from anyflow_ray.models.text import encode_prompts

    tokenizer, encoder = load_text_encoder(base)
    return encode_prompts(tokenizer, encoder, [prompt], max_length)


def load_uncond(cfg) -> torch.Tensor:
    """c_null for ``cfg``: ``(1, L, D)`` float32, the stored one of ``data.root`` when it matches
    ``model.negative_prompt``, the text max length and encoder of ``model.base``, else encoded here."""
    from anyflow_ray.models.loading import text_max_length

    prompt, max_length = str(cfg.model.negative_prompt), text_max_length(cfg.model.base)
    fingerprint = encoder_fingerprint(cfg.model.base)
    folder, filesystem = _data_folder(cfg)
    stored = read_uncond(folder, filesystem)
    reason = f"no {UNCOND_NAME} in {folder} (a data set written before it was stored)"
    if stored is not None:
        reason = stored_mismatch(stored[1], prompt, max_length, fingerprint)
        if not reason:
            return stored[0]
    log.info("c_null: encoding the negative prompt with the text encoder of %s: %s", cfg.model.base, reason)
    return encode_uncond(cfg.model.base, prompt, max_length)
