"""Vocabulary-parallel NLL on 2 and 3 gloo ranks against the unsharded float64 definition."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lmloss import vocab_parallel_token_nll


def _shard_bounds(V: int, world: int) -> list[int]:
    # uneven on purpose: V not divisible by the rank count
    base, extra = divmod(V, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    return [sum(sizes[:r]) for r in range(world + 1)]


def _worker(rank, world, port, N, V, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(1234)  # every rank builds the same full problem
        logits = torch.randn(N, V, generator=g) * 10
        targets = torch.randint(0, V, (N,), generator=g)
        targets[::5] = -100
        grad_out = torch.rand(N, generator=g)
        bounds = _shard_bounds(V, world)
        lo, hi = bounds[rank], bounds[rank + 1]
        local = logits[:, lo:hi].clone().requires_grad_(True)
        before = local.detach().clone()
        nll = vocab_parallel_token_nll(local, targets, vocab_start=lo)
        (nll * grad_out).sum().backward()
        assert torch.equal(local.detach(), before)
        torch.save({"nll": nll.detach(), "grad": local.grad, "lo": lo, "hi": hi}, f"{out_dir}/r{rank}.pt")
        # an out-of-range target is refused on every rank
        bad = targets.clone()
        bad[3] = V + 7
        try:
            vocab_parallel_token_nll(local.detach(), bad, vocab_start=lo)
        except ValueError as e:
            assert "owned by 0 ranks" in str(e)
        else:
            raise AssertionError("out-of-range target accepted")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_matches_unsharded(world, tmp_path, free_port):
    N, V = 37, 1001
    mp.spawn(_worker, args=(world, free_port, N, V, str(tmp_path)), nprocs=world, join=True)
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(N, V, generator=g) * 10
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    grad_out = torch.rand(N, generator=g)
    x64 = logits.double().requires_grad_(True)
    ref = F.cross_entropy(x64, targets, reduction="none")
    (ref * grad_out.double()).sum().backward()
    grads = []
    for r in range(world):
        res = torch.load(tmp_path / f"r{r}.pt")
        torch.testing.assert_close(res["nll"].double(), ref.detach(), rtol=1e-5, atol=1e-5)
        grads.append(res["grad"])
    torch.testing.assert_close(torch.cat(grads, dim=1).double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_needs_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        vocab_parallel_token_nll(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), vocab_start=0)
