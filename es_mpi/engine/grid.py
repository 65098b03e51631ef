"""The work grid of a generation: N members x P prompts, cut into tiles.

Row (m, p) is member m scored on the generation's p-th prompt; rows are
numbered member-major, r = m * P + p.  A *tile* is a run of consecutive rows
decoded as one batch.  Tiles are defined by (N, P, tile size) alone, never by
the rank count, and each tile is decoded the same way wherever it runs: that
is what makes rewards, and so weights, bit-identical on 1, 2 or 32 ranks
(a row's logits depend on which rows share its batch: the batch shape picks
the matmul kernel).  Ranks take balanced contiguous runs of tiles, so any N
runs on any R, R > N included, as long as there are at least R tiles.

With full-rank noise a tile never spans two members (a batch has one set of
weights); with low-rank noise it may, since members share the base weights.

Pure functions, no MPI.
"""
from __future__ import annotations

from dataclasses import dataclass


def balanced(n: int, size: int, rank: int) -> range:
    """Contiguous share of `rank` in 0..n-1: the first n % size ranks get one extra."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class Tile:
    start: int   # first row (member-major)
    stop: int    # one past the last row


@dataclass(frozen=True)
class Grid:
    members: int
    prompts: int
    tiles: tuple[Tile, ...]

    def member_of(self, row: int) -> int:
        return row // self.prompts

    def prompt_of(self, row: int) -> int:
        return row % self.prompts

    def rank_tiles(self, size: int, rank: int) -> tuple[Tile, ...]:
        share = balanced(len(self.tiles), size, rank)
        return self.tiles[share.start:share.stop]

    def rank_rows(self, size: int, rank: int) -> range:
        """The rows of `rank` (its tiles are contiguous, so are its rows)."""
        t = self.rank_tiles(size, rank)
        return range(t[0].start, t[-1].stop) if t else range(0)

    def max_rank_rows(self, size: int) -> int:
        return max(len(self.rank_rows(size, r)) for r in range(size))


def make_grid(members: int, prompts: int, tile_rows: int, per_member: bool) -> Grid:
    """Tiles of `tile_rows` rows (0: one member's prompts).  `per_member`: a
    tile never crosses a member boundary (full-rank noise)."""
    t = tile_rows or prompts
    if per_member:
        t = min(t, prompts)
        tiles = [Tile(m * prompts + s, m * prompts + min(s + t, prompts))
                 for m in range(members) for s in range(0, prompts, t)]
    else:
        total = members * prompts
        tiles = [Tile(s, min(s + t, total)) for s in range(0, total, t)]
    return Grid(members, prompts, tuple(tiles))
