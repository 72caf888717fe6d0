"""KV-cache blocks: reference counts, prefix caching by chained hashes, LRU reuse."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the router imports the hashing here and must not load torch
    from pagedserve.replicas.engine.sequence import Sequence


def block_hash(parent_hash: int | None, tokens: list[int]) -> int:
    """Hash of a full block, chained to its parent so equal blocks in different contexts differ.

    Deterministic across processes (ints and tuples only), so replicas and routers agree.
    """
    return hash((parent_hash if parent_hash is not None else -1, *tokens))


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of a prompt's full blocks, as the block manager would register them."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.parent_hash: int | None = None  # checked with the tokens: a hash collision never matches
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    """Hands out KV blocks to sequences and keeps full, computed blocks findable by hash.

    A freed block that holds a hash stays in the cache until its id is handed out again; free
    blocks are reused least-recently-freed first, so hot prefixes survive longest.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` tokens fit in its block table."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Attach the cached blocks that hold `seq`'s prompt prefix; sets num_computed_tokens.

        A sequence that scores its prompt (`prompt_logprobs`) takes only blocks it has scored
        already (after a preemption); its computed blocks are still registered for others."""
        if not (self.enable_prefix_caching or seq.leader is not None) or seq.block_table:
            return
        parent = None
        usable = (len(seq) - 1) // self.block_size  # keep >= 1 token to compute for logits
        if seq.scores_prompt:  # a cached block skips the forward that scores its tokens
            usable = min(usable, seq.num_scored_positions // self.block_size)
        for i in range(usable):
            tokens = seq.block_tokens(i)
            block_id = self.hash_to_block.get(block_hash(parent, tokens))
            if block_id is None or not self._holds(block_id, parent, tokens):
                break
            parent = self.blocks[block_id].hash
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(parent)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size

    def record_admission(self, seq: Sequence) -> None:
        """Count an admitted sequence's prefix-cache lookup (for the hit rate)."""
        self.num_prefix_queries += len(seq)
        self.num_prefix_hits += seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; False if blocks ran out."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block_id = next(iter(self.free_block_ids))
            self._evict_hash(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Make every full block whose K/V is now computed findable by its hash."""
        full = min(seq.num_computed_tokens, len(seq)) // self.block_size
        for i in range(seq.num_hashed_blocks, full):
            parent = seq.block_hashes[i - 1] if i > 0 else None
            tokens = seq.block_tokens(i)
            h = block_hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            if len(seq.block_hashes) > i:
                seq.block_hashes[i] = h
            else:
                seq.block_hashes.append(h)
            if h not in self.hash_to_block:  # a duplicate keeps the first block findable
                block.hash, block.parent_hash, block.token_ids = h, parent, tuple(tokens)
                self.hash_to_block[h] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks (newest first, so a prefix's head is reused last)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0

    def cached_block_hashes(self) -> set[int]:
        """Hashes of every block the cache can still serve (for the router's affinity)."""
        return set(self.hash_to_block)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _evict_hash(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.parent_hash, block.token_ids = None, None, ()

    def _holds(self, block_id: int, parent: int | None, tokens: list[int]) -> bool:
        block = self.blocks[block_id]
        return block.parent_hash == parent and block.token_ids == tuple(tokens)
