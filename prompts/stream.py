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

Another world size on resume (`PromptStream.load_resharded`, from the states of all the
old ranks): the old ranks' orders are regenerated as prompt ids (a prompt's row in the
whole data; no data is read for this), what they had not consumed of their open epochs
is interleaved rank by rank and dealt to the new ranks ("carry"), and whole epochs at the
new world size follow. So within every epoch no prompt is lost or seen twice. A carried
stream's state holds the old states it was dealt from until its carry is consumed.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

STATE_VERSION = 1
RESHARD_KEYS = ("seed", "shuffle", "fingerprint")


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
            from prompts.curate import load_manifest, verify_shards

            verify_shards(source)  # hashes every shard once: a damaged one fails here
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
        # prompts dealt from the open epochs of another world size (load_resharded)
        self._carry: dict | None = None
        self._carry_items: list[tuple[int, int]] = []
        self._carry_taken = 0

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

    # -- prompt ids: a prompt's row in the whole data (manifest order), for resharding --
    def rank_ids(self, epoch: int, rank: int, world_size: int) -> np.ndarray:
        """Ids of the prompts that ``rank`` of ``world_size`` reads in ``epoch``, in its
        order (the order ``_epoch_iter`` yields them; computed without reading data)."""
        if self._list is not None:
            n = len(self._list)
            order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
            return order[rank::world_size]
        n, w = len(self._rows), world_size
        base = np.concatenate([[0], np.cumsum(self._rows)[:-1]])
        order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        shards = order[rank::w] if n % w == 0 else order
        start, parts = 0, []
        for sid in shards.tolist():
            rows = np.arange(self._rows[sid])
            if n % w:  # every rank reads all shards and keeps global positions = rank mod w
                rows = rows[(start + rows) % w == rank]
                start += int(self._rows[sid])
            if self.shuffle:
                rows = rows[_rng(self.seed, epoch, sid + 1).permutation(len(rows))]
            parts.append(base[sid] + rows)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _prompts_of(self, ids: list[int]) -> list[str]:
        """The prompts with these ids. A curated folder's shards that hold any of them are
        read whole (a carry can span every shard: ~100 MB of text at 1.7M prompts)."""
        if self._list is not None:
            return [self._list[i] for i in ids]
        import pyarrow.parquet as pq

        base = np.concatenate([[0], np.cumsum(self._rows)])
        shard_of = np.searchsorted(base, ids, side="right") - 1
        text = {}
        for sid in sorted(set(shard_of.tolist())):
            table = pq.read_table(self._files[sid], columns=["prompt"])
            text[sid] = table.column(0).to_pylist()
        return [text[s][i - base[s]] for s, i in zip(shard_of.tolist(), ids)]

    def _open_ids(self, state: dict) -> tuple[int, dict[int, list[int]]]:
        """(epoch of the state's normal position, {epoch: ids the state's rank was dealt
        there and has not consumed}) for the open epochs of a saved state."""
        rank, world = state["rank"], state["world_size"]
        left: dict[int, list[int]] = {}
        if state.get("carry") is not None:
            items, _ = self._dealt(state["carry"]["from"], rank, world)
            for e, i in items[state["carry"]["taken"] :]:
                left.setdefault(e, []).append(i)
        epoch = int(state["epoch"])
        left.setdefault(epoch, []).extend(
            self.rank_ids(epoch, rank, world)[state["offset"] :].tolist()
        )
        return epoch, left

    def _dealt(
        self, old_states: list[dict], rank: int, world_size: int
    ) -> tuple[list[tuple[int, int]], int]:
        """(epoch, id) of the prompts that the old ranks left in their open epochs and that
        go to ``rank`` of ``world_size``: each epoch's rest, interleaved over old ranks in
        their order, then dealt round robin; epochs in order. Also the first epoch after
        them (whole epochs of the new layout start there)."""
        old_world = len(old_states)
        for r, st in enumerate(old_states):
            if st["rank"] != r or st["world_size"] != old_world:
                raise ValueError(
                    f"prompt stream states: entry {r} is rank {st['rank']} of "
                    f"{st['world_size']}, expected rank {r} of {old_world}"
                )
        opened = [self._open_ids(st) for st in old_states]
        lo = min(min(left) for _, left in opened)
        hi = max(epoch for epoch, _ in opened)
        items: list[tuple[int, int]] = []
        for e in range(lo, hi + 1):
            rests = []
            for r, (epoch, left) in enumerate(opened):
                if e in left:
                    rests.append(left[e])
                elif e > epoch:  # not started by this old rank
                    rests.append(self.rank_ids(e, r, old_world).tolist())
                else:  # finished by this old rank
                    rests.append([])
            longest = max(len(x) for x in rests)
            items += [(e, x[j]) for j in range(longest) for x in rests if j < len(x)]
        return items[rank::world_size], hi + 1

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the saved states of every rank of another world size (index =
        old rank): what they left of their open epochs is dealt over the ranks of this
        layout, then whole epochs follow. No prompt of an epoch is lost or repeated."""
        for key in RESHARD_KEYS:
            mine = getattr(self, "_fingerprint" if key == "fingerprint" else key)
            if any(st[key] != mine for st in states):
                raise ValueError(
                    f"prompt stream states have another {key} than this stream ({mine!r}); "
                    "resume with the same data and seed"
                )
        self._carry_items, next_epoch = self._dealt(states, self.rank, self.world_size)
        self._carry = {"from": states, "taken": 0, "next_epoch": next_epoch}
        self._carry_taken = 0
        if not self._carry_items:  # the old ranks stopped exactly at an epoch's end
            self._carry = None
        self._epoch, self._offset = next_epoch, 0
        self._epoch_len = int(self._plan(self._epoch)[1].sum())
        self._iter = self._epoch_iter(self._epoch, 0)

    # -- public API -----------------------------------------------------------------
    def next_batch(self) -> list[str]:
        """The next batch_size prompts of this rank; an exhausted epoch rolls to the next."""
        out: list[str] = []
        if self._carry is not None:
            end = min(self._carry_taken + self.batch_size, len(self._carry_items))
            ids = [i for _, i in self._carry_items[self._carry_taken : end]]
            out += self._prompts_of(ids)
            self._carry_taken = end
            if end == len(self._carry_items):
                self._carry, self._carry_items = None, []
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
        if self._carry is not None:
            return self._carry_items[self._carry_taken][0]
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
            "carry": None if self._carry is None else {**self._carry, "taken": self._carry_taken},
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
        self._carry, self._carry_items, self._carry_taken = None, [], 0
        if state.get("carry") is not None:
            carry = state["carry"]
            self._carry_items, _ = self._dealt(carry["from"], self.rank, self.world_size)
            self._carry, self._carry_taken = dict(carry), int(carry["taken"])
