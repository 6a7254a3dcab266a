"""Document sharding for data-parallel evaluation: a partition, balanced, deterministic; and
LossTotals.all_reduce on 2 gloo ranks equal to the sum written here."""
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmloss import LossTotals
from lmloss.distributed import DistContext, init_from_env, shard_documents


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_partition_documents(world):
    rnd = random.Random(world)
    lengths = [rnd.randint(0, 5000) for _ in range(62)]
    shards = [shard_documents(lengths, r, world) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(62))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths)  # greedy balance bound
    assert shards == [shard_documents(lengths, r, world) for r in range(world)]


def test_more_ranks_than_documents():
    shards = [shard_documents([10, 20], r, 4) for r in range(4)]
    assert sorted(i for s in shards for i in s) == [0, 1]


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_documents([1], 2, 2)


def test_single_process_context(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_from_env()
    assert ctx == DistContext() and ctx.is_main and not ctx.enabled


# Per rank: a fraction that float32 would round, and counts past 2**32 (exact in float64 up to 2**53).
RANK_TOTALS = [LossTotals(1234.5678901234567, 2**33 + 1, 2**40 + 3, 17, 101),
               LossTotals(0.1, 5, 2**35 + 7, 0, 9)]


def _all_reduce_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = RANK_TOTALS[rank]
        summed = mine.all_reduce()
        assert mine == RANK_TOTALS[rank]  # a new LossTotals; the rank's own is unchanged
        torch.save(summed.to_dict(), f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_loss_totals_all_reduce_on_two_gloo_ranks(tmp_path, free_port):
    mp.spawn(_all_reduce_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    a, b = RANK_TOTALS
    want = dict(nll_nats=a.nll_nats + b.nll_nats, n_tokens=2**33 + 6, n_bytes=2**40 + 2**35 + 10, n_words=17,
                n_chars=110)
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt")
        assert got == want  # two float64 addends round the same in either order: equal, on both ranks
        assert all(type(got[k]) is int for k in want if k != "nll_nats")
