"""LossMeter against float64 sums written here (math.fsum over Python floats), independent of lmloss;
its state stays on the input's device and update() never reads a value on the host."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lmloss
from lmloss import LossMeter, LossTotals

V = 97
TOKEN_BYTES = torch.randint(0, 9, (V,), generator=torch.Generator().manual_seed(3))  # some ids 0 bytes
SHAPES = [(3, 17), (1,), (5, 7, 3), (), (0,), (2, 1, 11)]


def make_batches(seed, ignore_index=-100):
    """Per-token NLL of odd shapes and dtypes (bf16, fp16, fp32 from F.cross_entropy, float64), some
    targets ignored, and one batch with every target ignored."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k, shape in enumerate(SHAPES):
        logits = torch.randn(*shape, V, generator=g) * 5
        targets = torch.randint(0, V, shape, generator=g)
        targets[torch.rand(shape, generator=g) < 0.2] = ignore_index
        nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index,
                              reduction="none").reshape(shape)
        nll = nll.to([torch.bfloat16, torch.float32, torch.float16, torch.float64][k % 4])
        batches.append((nll, targets))
    all_ignored = torch.full((4, 5), ignore_index)
    batches.append((torch.rand(4, 5, generator=g).to(torch.bfloat16) * 3, all_ignored))
    return batches


def reference(batches, token_bytes=TOKEN_BYTES, ignore_index=-100):
    """(nll_nats, n_tokens, n_bytes): exactly rounded float64 sum of the scored losses, integer counts."""
    losses, n_tokens, n_bytes = [], 0, 0
    for nll, targets in batches:
        for x, t in zip(nll.double().reshape(-1).tolist(), targets.reshape(-1).tolist()):
            if t != ignore_index:
                losses.append(x)
                n_tokens += 1
                n_bytes += int(token_bytes[t])
    return math.fsum(losses), n_tokens, n_bytes


def test_meter_equals_float64_reference():
    batches = make_batches(0)
    meter = LossMeter(TOKEN_BYTES)
    for nll, targets in batches:
        meter.update(nll, targets)
    nll_nats, n_tokens, n_bytes = reference(batches)
    got = meter.totals()
    assert isinstance(got, LossTotals)
    assert got.nll_nats == pytest.approx(nll_nats, rel=1e-13)
    assert (got.n_tokens, got.n_bytes) == (n_tokens, n_bytes)
    assert n_tokens > 0 and n_bytes > 0
    assert meter.bits_per_byte() == pytest.approx(nll_nats / (math.log(2) * n_bytes), rel=1e-13)
    assert meter.perplexity() == pytest.approx(math.exp(nll_nats / n_tokens), rel=1e-13)
    assert got.bits_per_byte == meter.bits_per_byte()


def test_all_ignored_batch_adds_nothing():
    meter = LossMeter(TOKEN_BYTES)
    meter.update(torch.tensor([1.0, float("nan")]), torch.tensor([-100, -100]))  # ignored NaN: not summed
    assert meter.totals() == LossTotals()


@pytest.mark.parametrize("ignore_index", [0, 7])
def test_custom_ignore_index_and_no_bytes(ignore_index):
    batches = make_batches(1, ignore_index)
    meter = LossMeter(ignore_index=ignore_index)
    for nll, targets in batches:
        meter.update(nll, targets)
    nll_nats, n_tokens, _ = reference(batches, ignore_index=ignore_index)
    got = meter.totals()
    assert got.nll_nats == pytest.approx(nll_nats, rel=1e-13)
    assert (got.n_tokens, got.n_bytes) == (n_tokens, 0)
    with pytest.raises(ValueError, match="counts no bytes.*token_byte_lengths"):
        meter.bits_per_byte()


def test_token_nll_output_and_reset():
    logits = torch.randn(2, 9, V) * 3
    targets = torch.randint(0, V, (2, 9))
    targets[1, :4] = -100
    meter = LossMeter(TOKEN_BYTES)
    meter.update(lmloss.token_nll(logits, targets), targets)
    ref = F.cross_entropy(logits.double().reshape(-1, V), targets.reshape(-1), reduction="sum")
    assert meter.totals().nll_nats == pytest.approx(ref.item(), rel=1e-6)  # token_nll is float32
    meter.reset()
    assert meter.totals() == LossTotals()
    meter.update(torch.tensor([2.0]), torch.tensor([5]))
    assert meter.totals() == LossTotals(2.0, 1, int(TOKEN_BYTES[5]))


def test_state_on_input_device_detached_and_inputs_unchanged():
    logits = (torch.randn(6, V) * 3).requires_grad_()
    targets = torch.randint(0, V, (6,))
    targets[2] = -100
    nll = F.cross_entropy(logits, targets, reduction="none")
    before = (nll.detach().clone(), targets.clone(), TOKEN_BYTES.clone())
    meter = LossMeter(TOKEN_BYTES)
    meter.update(nll, targets)
    state = (meter._nll_nats, meter._counts)
    assert [(s.device.type, s.dtype) for s in state] == [("cpu", torch.float64), ("cpu", torch.int64)]
    assert not any(s.requires_grad or s.grad_fn is not None for s in state)  # never holds the graph
    assert torch.equal(nll.detach(), before[0]) and torch.equal(targets, before[1])
    assert torch.equal(TOKEN_BYTES, before[2])
    nll.sum().backward()  # the graph is the caller's, intact
    assert logits.grad is not None


def test_update_never_syncs_with_the_host(monkeypatch):
    """No value is read on the host: Tensor.item / tolist / bool / int / float / numpy / cpu raise."""
    batches = make_batches(2)
    meter = LossMeter(TOKEN_BYTES)

    def no_sync(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"LossMeter.update called Tensor.{name}: a host sync on CUDA")
        return refuse

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, no_sync(name))
        for nll, targets in batches:
            meter.update(nll, targets)
        with pytest.raises(AssertionError, match="Tensor.tolist"):
            meter.totals()  # the probe works: totals() is the one sync
    assert meter.totals().n_tokens == reference(batches)[1]


def test_update_runs_on_meta_tensors():
    """A meta tensor has no values: any host read in update() would raise."""
    meter = LossMeter(TOKEN_BYTES)
    for _ in range(2):
        meter.update(torch.empty(4, 5, dtype=torch.bfloat16, device="meta"),
                     torch.empty(4, 5, dtype=torch.int64, device="meta"))
    assert meter._nll_nats.device.type == "meta" and meter._counts.device.type == "meta"
    assert meter.token_bytes.device.type == "meta"  # moved once, with the state
    with pytest.raises(ValueError, match="sums on meta"):
        meter.update(torch.zeros(2), torch.zeros(2, dtype=torch.int64))


def test_non_finite_loss_is_raised_by_totals():
    meter = LossMeter()
    meter.update(torch.tensor([1.0, float("inf")]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="non-finite"):
        meter.totals()


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3), torch.zeros(4, dtype=torch.int64)), ValueError, "nll shape"),
    ((torch.zeros(3), torch.zeros(3)), TypeError, "targets must be an integer tensor"),
    ((torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)), TypeError, "nll must be a floating"),
    (([0.1, 0.2], torch.zeros(2, dtype=torch.int64)), TypeError, "nll must be a floating"),
    ((torch.zeros(2), torch.zeros(2, dtype=torch.int64, device="meta")), ValueError, "one device"),
])
def test_bad_update(args, error, match):
    with pytest.raises(error, match=match):
        LossMeter().update(*args)


def test_bad_construction():
    with pytest.raises(TypeError, match="token_byte_lengths"):
        LossMeter([1, 2, 3])
    with pytest.raises(TypeError, match="token_byte_lengths"):
        LossMeter(torch.ones(3))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LossMeter(ignore_index=None)


def test_all_reduce_without_process_group_is_a_no_op():
    meter = LossMeter(TOKEN_BYTES)
    meter.update(torch.tensor([1.5]), torch.tensor([3]))
    assert meter.all_reduce() is meter
    assert meter.totals() == LossTotals(1.5, 1, int(TOKEN_BYTES[3]))


# ---- two gloo ranks -------------------------------------------------------------------------------------

def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        meter, only_rank0 = LossMeter(TOKEN_BYTES), LossMeter(TOKEN_BYTES)
        for nll, targets in make_batches(10 + rank):
            meter.update(nll, targets)
            if rank == 0:
                only_rank0.update(nll, targets)
        totals = meter.all_reduce().totals()
        totals_rank0 = only_rank0.all_reduce().totals()  # rank 1 never updated: it joins with zeros
        assert meter.all_reduce().totals() == totals + totals  # in place: a second reduce sums again
        meter.reset()
        torch.save({"totals": totals, "only_rank0": totals_rank0, "after_reset": meter.all_reduce().totals()},
                   f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_on_two_gloo_ranks(tmp_path, free_port):
    world = 2
    mp.spawn(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    per_rank = [reference(make_batches(10 + r)) for r in range(world)]
    nll_nats = math.fsum(p[0] for p in per_rank)
    for r in range(world):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=False)
        assert got["totals"].nll_nats == pytest.approx(nll_nats, rel=1e-13)
        assert (got["totals"].n_tokens, got["totals"].n_bytes) == (per_rank[0][1] + per_rank[1][1],
                                                                   per_rank[0][2] + per_rank[1][2])
        assert got["only_rank0"].nll_nats == pytest.approx(per_rank[0][0], rel=1e-13)
        assert (got["only_rank0"].n_tokens, got["only_rank0"].n_bytes) == per_rank[0][1:]
        assert got["after_reset"] == LossTotals()


# ---- CUDA ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_update_makes_no_cuda_sync():
    batches = [(nll.cuda(), targets.cuda()) for nll, targets in make_batches(4)]
    meter = LossMeter(TOKEN_BYTES)
    meter.update(*batches[0])  # the first update moves token_bytes to the GPU (a copy from the host)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for nll, targets in batches[1:]:
            meter.update(nll, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meter._nll_nats.is_cuda and meter._counts.is_cuda
    got, ref = meter.totals(), reference([(n.cpu(), t.cpu()) for n, t in batches])
    assert got.nll_nats == pytest.approx(ref[0], rel=1e-13) and (got.n_tokens, got.n_bytes) == ref[1:]
