"""Paged KV cache: one preallocated pool of fixed-size blocks shared by every sequence (vLLM's layout).

Each layer (the main layers, then the MTP depths) stores every cached entry as one tensor
[num_blocks * block_size, *entry_shape]: for MLA the normalized latent [kv_lora_rank] and the rotated
k_pe [qk_rope_head_dim] (nothing else), for GQA the rotated keys and the values [kv_heads, head_dim].
A sequence owns a list of block ids (its block table); the token at position p lives in slot
`table[p // block_size] * block_size + p % block_size`.

Blocks are reference counted so sequences can share them: the n completions of one prompt share the
prompt's blocks and beam search forks beams without copying. A shared block is copied only when a
sequence is about to write into it (copy-on-write).

Block 0 is never handed out: padding tokens of a ragged batch write there, and reads past the end of
a short sequence read from there. Those reads are always masked out, and the block only ever holds
finite values, so they cannot turn into NaN.

Prefix caching (vLLM's automatic prefix caching): a full block is registered under a key that hashes
every token from position 0 to its end (a sha256 chain over the blocks), so equal keys mean equal
keys/values. A registered block whose last user releases it is not freed but kept, evictable, in LRU
order; allocation takes never-registered blocks first, then evicts the least recently released
cached block. A new sequence whose first blocks' keys are registered reuses those blocks and
computes only the rest (`match_prefix`). Registered blocks never change: a write into one copies it
first, as for a shared block. `reset_prefix_cache` forgets every key (weights changed).

The model sees the cache through the `update(layer_index, positions, kv_length, *entries)` contract of
`nanoseek.model.attention`: before each forward the engine calls `bind` with the write slot of every
input token and the read slots of every row, then `update` scatters the new entries and gathers
[batch, kv_length, ...] views in position order. MLA's fused CPU decode kernel skips the gather:
`write` stores the entries and hands it the pool, which it reads through `read_slots`.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.cache import cache_entry_shapes

NULL_BLOCK = 0
ROOT_KEY = b""  # the parent key of a sequence's first block


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 of the parent block's key and this block's token ids."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def long_tensor(values: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """torch.tensor(values) for a flat list of ints, as int64 [len(values)], through an array: torch.tensor
    converts element by element (a decode step's 320 block ids: 31 -> 4 us)."""
    if not values:
        return torch.zeros(0, dtype=torch.int64, device=device)
    tensor = torch.frombuffer(array("q", values), dtype=torch.int64)  # keeps the array alive
    return tensor if device is None or torch.device(device).type == "cpu" else tensor.to(device)


def salted_root(salt: str | None) -> bytes:
    """The parent key of a sequence's first block: `ROOT_KEY`, or one of its own per cache salt."""
    return ROOT_KEY if salt is None else hashlib.sha256(b"cache_salt:" + salt.encode()).digest()


def chain_keys(tokens: list[int], block_size: int, num_blocks: int, root: bytes = ROOT_KEY) -> list[bytes]:
    """The keys of the first `num_blocks` full blocks of `tokens`, chained from `root`."""
    keys, key = [], root
    for start in range(0, num_blocks * block_size, block_size):
        key = block_key(key, tokens[start : start + block_size])
        keys.append(key)
    return keys


class OutOfBlocks(Exception):
    """The pool has no free block left (the engine preempts a sequence and retries)."""


class PagedKVCache:
    """A block pool plus the slot mapping of the forward being run."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        include_mtp: bool = False,
    ):
        if num_blocks < 2:
            raise ValueError("a paged cache needs at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        num_layers = config.num_hidden_layers + (config.num_mtp_layers if include_mtp else 0)
        slots = num_blocks * block_size
        self.layers = [
            tuple(torch.zeros(slots, *shape, dtype=dtype, device=self.device) for shape in cache_entry_shapes(config))
            for _ in range(num_layers)
        ]
        self.refcounts = [0] * num_blocks
        self.free_blocks = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        # prefix caching: key -> block, block -> key, and the unreferenced cached blocks (oldest first)
        self.cached: dict[bytes, int] = {}
        self.block_keys: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.epoch = 0  # incremented by reset_prefix_cache: sequences admitted before it register nothing
        self.write_slots: torch.Tensor | None = None
        self.read_slots: torch.Tensor | None = None
        self.kv_length: int | None = None  # 1 + the highest bound position, when the caller knew it
        self._read_flat: tuple[int, torch.Tensor] | None = None
        self._block_offsets = torch.arange(block_size, device=self.device)

    # ----- sizes --------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return sum(buffer[0].numel() * buffer.element_size() for layer in self.layers for buffer in layer)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pool can hold (block 0 excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-registered ones plus evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks in use (the `kv_cache_usage_perc` gauge of servers)."""
        return 1 - self.num_free_blocks / (self.num_blocks - 1)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ----- allocation ---------------------------------------------------------------------------
    def allocate(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # the least recently released cached block
            del self.cached[self.block_keys.pop(block)]
        else:
            raise OutOfBlocks
        self.refcounts[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` (and empty it); unreferenced blocks are free again
        (registered ones stay cached, evictable)."""
        for block in table:
            self._unref(block)
        table.clear()

    def _unref(self, block: int) -> None:
        self.refcounts[block] -= 1
        if self.refcounts[block] == 0:
            if block in self.block_keys:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)

    def _shared(self, block: int) -> bool:
        """Not writable in place: another table uses it, or it is registered (cached blocks never change)."""
        return self.refcounts[block] > 1 or block in self.block_keys

    # ----- prefix caching -----------------------------------------------------------------------
    def register(self, block: int, key: bytes) -> None:
        """Offer a full, computed block under `key`; ignored if the key or the block is already registered
        (then this block is freed as usual when released)."""
        if key not in self.cached and block not in self.block_keys:
            self.cached[key] = block
            self.block_keys[block] = key

    def match_prefix(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading `keys` (not claimed: see `claim`)."""
        blocks = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_to_claim(self, blocks: list[int]) -> int:
        """How many of `blocks` are evictable (claiming them takes them out of the free count)."""
        return sum(1 for block in blocks if self.refcounts[block] == 0)

    def claim(self, blocks: list[int]) -> list[int]:
        """Take a reference to each matched block (out of the evictable set); returns a new table."""
        for block in blocks:
            if self.refcounts[block] == 0:
                del self.evictable[block]
            self.refcounts[block] += 1
        return list(blocks)

    def reset_prefix_cache(self) -> None:
        """Forget every key: evictable blocks become free, blocks in use are freed when released."""
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        self.cached.clear()
        self.block_keys.clear()
        self.epoch += 1

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of `table` (copy-on-write)."""
        for block in table:
            self.refcounts[block] += 1
        return list(table)

    def blocks_needed(self, table: list[int], start: int, end: int) -> int:
        """Free blocks a write of positions [start, end) needs: new blocks plus copies of shared ones."""
        needed = max(0, self.blocks_for(end) - len(table))
        first, last = start // self.block_size, min(len(table), self.blocks_for(end))
        return needed + sum(1 for i in range(first, last) if self._shared(table[i]))

    def writable(self, table: list[int], start: int, end: int) -> bool:
        """True when positions [start, end) lie in blocks `table` already owns alone (nothing to prepare)."""
        size, refcounts, registered = self.block_size, self.refcounts, self.block_keys
        first, last = start // size, (end - 1) // size
        if last >= len(table):
            return False
        if first == last:  # one decoded token
            return refcounts[table[first]] == 1 and table[first] not in registered
        return all(refcounts[table[i]] == 1 and table[i] not in registered for i in range(first, last + 1))

    def prepare_write(self, table: list[int], start: int, end: int) -> None:
        """Make positions [start, end) writable in `table`: grow it, copy the shared or registered blocks
        it will write into.

        Raises `OutOfBlocks` (leaving the table valid) when the pool runs dry.
        """
        for index in range(start // self.block_size, min(len(table), self.blocks_for(end))):
            block = table[index]
            if self._shared(block):
                copy = self.allocate()  # never `block` itself: it is referenced, so not evictable
                self._copy_block(block, copy)
                self._unref(block)
                table[index] = copy
        while len(table) < self.blocks_for(end):
            table.append(self.allocate())

    def _copy_block(self, source: int, destination: int) -> None:
        size = self.block_size
        for layer in self.layers:
            for buffer in layer:
                buffer[destination * size : (destination + 1) * size] = buffer[source * size : (source + 1) * size]

    # ----- the forward's slot mapping -------------------------------------------------------------
    def bind(self, tables: list[list[int]], positions: torch.Tensor, valid: torch.Tensor | None = None,
             write: list[int] | None = None, kv_length: int | None = None) -> None:
        """Set the slots of the next forward.

        tables: the block table of each row; positions [batch, seq] the positions of the input tokens
        (on the cache's device); valid [batch, seq] False for padding tokens (they write to block 0).
        write: the write slots, row by row, where the caller has them as ints (`slots_of`: a decode
        step's few, cheaper than three tensor ops); kv_length: 1 + the highest position, if known.
        """
        size = self.block_size
        width = max(len(table) for table in tables)
        flat: list[int] = []
        for table in tables:
            flat += table
            flat += [NULL_BLOCK] * (width - len(table))
        padded = long_tensor(flat, self.device).view(len(tables), width)
        read = torch.add(self._block_offsets, padded[:, :, None], alpha=size).flatten(1)
        if write is not None:
            self.write_slots = long_tensor(write, self.device)
        else:
            slots = read.gather(1, positions.clamp(max=read.shape[1] - 1))
            if valid is not None:
                slots = slots.masked_fill(~valid, NULL_BLOCK * size)
            self.write_slots = slots.flatten()
        self.read_slots = read
        self.kv_length = kv_length
        self._read_flat = None  # (kv_length, read slots flattened), made by the first layer's `update`

    def slots_of(self, table: list[int], start: int, count: int) -> list[int]:
        """The slots of positions start .. start + count - 1 in `table`."""
        size = self.block_size
        return [table[position // size] * size + position % size for position in range(start, start + count)]

    def update(
        self, layer_index: int, positions: torch.Tensor, kv_length: int, *entries: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Store `entries` [batch, seq, ...] at the bound write slots; return [batch, kv_length, ...] per entry."""
        batch = positions.shape[0]
        if self._read_flat is None or self._read_flat[0] != kv_length:
            self._read_flat = (kv_length, self.read_slots[:, :kv_length].flatten())
        read = self._read_flat[1]
        return tuple(
            buffer.index_select(0, read).view(batch, kv_length, *buffer.shape[1:])
            for buffer in self.write(layer_index, *entries)
        )

    def write(self, layer_index: int, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store `entries` [batch, seq, ...] at the bound write slots and return the layer's pool
        buffers [slots, ...], for kernels that read them through `read_slots` rather than a gathered copy."""
        stored = self.layers[layer_index]
        for buffer, entry in zip(stored, entries, strict=True):
            buffer.index_copy_(0, self.write_slots, entry.flatten(0, 1).to(buffer.dtype))
        return stored
