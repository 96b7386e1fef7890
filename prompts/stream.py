"""Stream prompts into the training loop: per-rank, epoch after epoch, with exact resume.

The order of one epoch is a pure function of (seed, epoch, rank, world_size, data):

* shards are permuted by a generator seeded with (seed, epoch), identically on all ranks;
* when the shard count is a multiple of world_size, rank r takes shards r, r + W, ... of
  that order (the assignment `datasets.distributed.split_dataset_by_node` makes);
  otherwise every rank reads all shards and keeps every W-th prompt (with a warning:
  all ranks then read all the data);
* the rows a rank takes from one shard are permuted by (seed, epoch, shard) — the whole
  shard is the shuffle buffer (a curated shard is ~30k prompts, a few MB).

The position is then just (epoch, prompts consumed in the epoch). A `datasets` shuffle
buffer's contents would be lost on resume; here resuming regenerates the order, skips
the consumed shards without reading them and re-permutes the current one, so no prompt
of an epoch is lost or seen twice. Shards are read with `datasets` streaming.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

STATE_VERSION = 1


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


class PromptStream:
    """Batches of prompts for one rank, from a curated folder or a list of prompts.

    source: a folder written by `prompts.curate.curate` (its train split is streamed) or a
    list of prompt strings. batch_size: prompts per `next_batch` on this rank. rank,
    world_size: this process's data-parallel position. seed: base seed of all
    permutations. shuffle: False streams shards and rows in stored order.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world {world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        if isinstance(source, (str, Path)):
            from prompts.curate import load_manifest

            self._folder = Path(source)
            shards = load_manifest(self._folder)["splits"]["train"]["shards"]
            self._files = [str(self._folder / s["file"]) for s in shards]
            self._rows = np.array([s["rows"] for s in shards], dtype=np.int64)
            self._list: list[str] | None = None
            fingerprint = "".join(s["sha256"] for s in shards)
            if len(shards) % world_size:
                warnings.warn(
                    f"{len(shards)} shards in {self._folder} are not a multiple of world size "
                    f"{world_size}: every rank reads all shards and keeps 1 prompt in "
                    f"{world_size}; curate with --shards a multiple of the world size",
                    stacklevel=2,
                )
        else:
            if isinstance(source, str) or not all(isinstance(p, str) for p in source):
                raise TypeError("source must be a curated folder path or a list of strings")
            self._folder, self._files, self._list = None, [], list(source)
            self._rows = np.array([len(self._list)], dtype=np.int64)
            fingerprint = "\n".join(self._list)
        self._fingerprint = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:32]
        self._epoch, self._offset = 0, 0
        self._epoch_len = self._plan(0)[1].sum()
        if self._epoch_len == 0:
            raise ValueError(
                f"rank {rank} of {world_size} gets no prompts from a source of "
                f"{int(self._rows.sum())} prompts"
            )
        self._iter = self._epoch_iter(0, 0)

    # -- the order of an epoch -------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids in this epoch's read order, this rank's row count in each)."""
        n, w, r = len(self._rows), self.world_size, self.rank
        if self._list is not None:
            # One list is one shard that is permuted as a whole, then dealt to ranks.
            return np.zeros(1, dtype=np.int64), np.array([len(range(r, len(self._list), w))])
        order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        if n % w == 0:
            mine = order[r::w]
            return mine, self._rows[mine]
        # Every rank reads everything and keeps global positions i with i % w == r.
        ends = np.cumsum(self._rows[order])
        starts = ends - self._rows[order]
        return order, (ends - r + w - 1) // w - (starts - r + w - 1) // w

    def _rows_of(self, shard_ids: np.ndarray, first_global: int) -> Iterator[str]:
        """Rows of this rank from the given shards in order; first_global is the global
        position of the first row (for the 1-in-W selection when shards do not divide)."""
        import datasets

        files = [self._files[i] for i in shard_ids if self._rows[i] > 0]
        if not files:
            return
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        ds = ds.select_columns(["prompt"])
        modulo = len(self._rows) % self.world_size != 0
        pos = first_global
        for batch in ds.iter(batch_size=4096):
            col = batch["prompt"]
            if modulo:
                start = (self.rank - pos) % self.world_size
                yield from col[start :: self.world_size]
            else:
                yield from col
            pos += len(col)

    def _epoch_iter(self, epoch: int, offset: int) -> Iterator[str]:
        """This rank's prompts of `epoch` in order, from position `offset` on."""
        if self._list is not None:
            n = len(self._list)
            order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
            mine = order[self.rank :: self.world_size][offset:]
            yield from (self._list[i] for i in mine.tolist())
            return
        ids, counts = self._plan(epoch)
        ends = np.cumsum(counts)
        first = int(np.searchsorted(ends, offset, side="right"))
        skip = offset - (int(ends[first - 1]) if first else 0)
        modulo = len(self._rows) % self.world_size != 0
        first_global = int(self._rows[ids[:first]].sum()) if modulo else 0
        rows = self._rows_of(ids[first:], first_global)
        for sid, n in zip(ids[first:].tolist(), counts[first:].tolist()):
            group = [next(rows) for _ in range(n)]
            if self.shuffle:
                perm = _rng(self.seed, epoch, sid + 1).permutation(n)
                group = [group[j] for j in perm]
            yield from group[skip:]
            skip = 0

    # -- public API -----------------------------------------------------------------
    def next_batch(self) -> list[str]:
        """The next batch_size prompts of this rank; an exhausted epoch rolls to the next."""
        out: list[str] = []
        while len(out) < self.batch_size:
            if self._offset == self._epoch_len:
                self._epoch, self._offset = self._epoch + 1, 0
                self._epoch_len = int(self._plan(self._epoch)[1].sum())
                self._iter = self._epoch_iter(self._epoch, 0)
            take = min(self.batch_size - len(out), self._epoch_len - self._offset)
            for _ in range(take):
                out.append(next(self._iter))
            self._offset += take
        return out

    @property
    def epoch(self) -> int:
        """Epoch of the next prompt (0-based)."""
        return self._epoch if self._offset < self._epoch_len else self._epoch + 1

    def __len__(self) -> int:
        """Prompts this rank sees per epoch."""
        return int(self._epoch_len)

    def state_dict(self) -> dict:
        """JSON-serializable position, to store in the training checkpoint."""
        return {
            "version": STATE_VERSION,
            "epoch": int(self._epoch),
            "offset": int(self._offset),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "rank": self.rank,
            "world_size": self.world_size,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly at the stored position; the data and layout must be the same."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"prompt stream state version {state.get('version')!r}, expected 1")
        for key in ("seed", "shuffle", "rank", "world_size", "fingerprint"):
            if state[key] != getattr(self, key if key != "fingerprint" else "_fingerprint"):
                raise ValueError(
                    f"prompt stream state has {key}={state[key]!r} but this stream has "
                    f"{getattr(self, key if key != 'fingerprint' else '_fingerprint')!r}; "
                    "resume with the same data, seed and ranks"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        length = int(self._plan(epoch)[1].sum())
        if not 0 <= offset <= length:
            raise ValueError(f"offset {offset} outside epoch {epoch} of {length} prompts")
        self._epoch, self._offset, self._epoch_len = epoch, offset, length
        self._iter = self._epoch_iter(epoch, offset)
