"""Document sharding for data-parallel evaluation: a partition, balanced, deterministic."""
import random

import pytest

from lmloss.distributed import DistContext, gather_rows, init_from_env, shard_documents


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
    assert gather_rows([{"index": 2}, {"index": 0}], ctx) == [{"index": 0}, {"index": 2}]
