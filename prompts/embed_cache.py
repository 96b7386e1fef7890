"""A disk cache of text embeddings in sharded safetensors files, not one file per prompt.

The reference caches one file per prompt (~0.5-0.9 TB and millions of inodes at 1.7M
prompts). Here each shard holds `keys` (n, 32) uint8 — sha256 of (encoder id, prompt) —
and `embeddings` (n, ...) in the encoder's dtype. A shard is written to a temporary
file and renamed, and the index is rebuilt from the shards' keys on open, so a crash
loses at most the entries not yet flushed and never leaves a corrupt index. Shard names
are unique per writer, so several ranks may share one folder (each sees the others'
shards when it next opens the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META = "meta.json"


def cache_key(encoder_id: str, prompt: str) -> bytes:
    """sha256 of the encoder id and the prompt (a NUL between them keeps pairs distinct)."""
    return hashlib.sha256(f"{encoder_id}\0{prompt}".encode()).digest()


class EmbeddingCache:
    """Embeddings of prompts by one text encoder, kept in `folder`.

    encoder_id: names the encoder and anything changing its output (weights, max length,
    layer); a folder serves one encoder id. shard_size: entries buffered in memory before
    a shard is written. batch_size: prompts per call of encode_fn.
    """

    def __init__(
        self, folder: str | Path, encoder_id: str, shard_size: int = 4096, batch_size: int = 64
    ):
        if shard_size < 1 or batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1: {shard_size}, {batch_size}")
        self.folder, self.encoder_id = Path(folder), encoder_id
        self.shard_size, self.batch_size = shard_size, batch_size
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / META
        if meta.is_file():
            stored = json.loads(meta.read_text("utf-8"))["encoder_id"]
            if stored != encoder_id:
                raise ValueError(
                    f"{self.folder} caches encoder {stored!r}, not {encoder_id!r}; "
                    "use one folder per encoder"
                )
        else:
            _atomic_write(meta, json.dumps({"encoder_id": encoder_id}).encode())
        self._index: dict[bytes, tuple[str, int]] = {}
        self._handles: dict[str, object] = {}
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                keys = f.get_tensor("keys")
            for row, key in enumerate(keys.numpy()):
                self._index.setdefault(key.tobytes(), (path.name, row))
        self._pending: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def get_or_compute(
        self, prompts: Sequence[str], encode_fn: Callable[[list[str]], torch.Tensor]
    ) -> torch.Tensor:
        """Embeddings (N, ...) of `prompts`, in order, on the CPU in the encoder's dtype.

        Misses (unique prompts not yet cached) are encoded in batches of batch_size by
        encode_fn(list of prompts) -> (n, ...) tensor, then cached.
        """
        keys = [cache_key(self.encoder_id, p) for p in prompts]
        missing: dict[bytes, str] = {}
        for k, p in zip(keys, prompts):
            if k not in self._index and k not in self._pending:
                missing.setdefault(k, p)
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        miss_keys = list(missing)
        for s in range(0, len(miss_keys), self.batch_size):
            chunk = miss_keys[s : s + self.batch_size]
            emb = encode_fn([missing[k] for k in chunk])
            if not isinstance(emb, torch.Tensor) or emb.shape[0] != len(chunk):
                raise ValueError(
                    f"encode_fn returned {type(emb).__name__} of shape "
                    f"{getattr(emb, 'shape', None)} for {len(chunk)} prompts"
                )
            for k, e in zip(chunk, emb.detach().cpu()):
                self._pending[k] = e.clone()
        out = [self._pending[k] if k in self._pending else self._load(k) for k in keys]
        if len(self._pending) >= self.shard_size:
            self.flush()
        if not out:
            raise ValueError("get_or_compute needs at least one prompt")
        shapes = {(tuple(o.shape), o.dtype) for o in out}
        if len(shapes) > 1:
            raise ValueError(f"cached embeddings of {self.encoder_id!r} disagree: {shapes}")
        return torch.stack(out)

    def _load(self, key: bytes) -> torch.Tensor:
        shard, row = self._index[key]
        handle = self._handles.get(shard)
        if handle is None:
            path = self.folder / shard
            handle = self._handles[shard] = safe_open(str(path), framework="pt")
        return handle.get_slice("embeddings")[row : row + 1][0]

    def flush(self) -> None:
        """Write the buffered entries as one new shard (atomically)."""
        if not self._pending:
            return
        keys = list(self._pending)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(-1, 32),
            "embeddings": torch.stack([self._pending[k] for k in keys]).contiguous(),
        }
        shard = f"shard-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        path = self.folder / shard
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        _fsync_rename(tmp, path)
        for row, k in enumerate(keys):
            self._index[k] = (shard, row)
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._handles.clear()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_rename(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    _fsync_rename(tmp, path)
