"""The host tier's CUDA copies (pinned runs, CPU-gather fallback, asynchronous backups): exact
round trips, whatever the layout of the host slots. Skipped without a CUDA device."""

import pytest
import torch

from plait.runtime.memory.host_pool import HostKVPool, slot_runs
from plait.runtime.memory.kv_pool import KVPool

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_slot_runs():
    assert slot_runs(torch.tensor([3, 4, 5, 9, 10, 2], dtype=torch.int64)) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert slot_runs(torch.empty(0, dtype=torch.int64)) == []


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("layout", ["one_run", "runs", "scattered"])
def test_cuda_round_trip(dtype, layout):
    torch.manual_seed(0)
    pool = KVPool(num_slots=512, num_layers=3, num_kv_heads=2, head_dim=16, dtype=dtype, device="cuda")
    for b in pool.k_buffers + pool.v_buffers:
        b.copy_(torch.randn(b.shape, device="cuda").to(dtype))
    host = HostKVPool(pool, 600)
    n = 200
    if layout == "one_run":
        host_slots = torch.arange(100, 100 + n)
    elif layout == "runs":
        host_slots = torch.cat([torch.arange(400, 450), torch.arange(1, 101), torch.arange(300, 350)])
    else:
        host_slots = torch.randperm(600)[:n] + 1
    device_slots = (torch.randperm(512)[:n] + 1).cuda()
    expect_k = [b[device_slots].clone() for b in pool.k_buffers]
    expect_v = [b[device_slots].clone() for b in pool.v_buffers]
    host.backup(device_slots, host_slots)
    # the compute stream overwrites the slots right after: the backup must have gathered first
    for b in pool.k_buffers + pool.v_buffers:
        b.view(torch.uint8)[device_slots] = 0
    target = (torch.randperm(512)[:n] + 1).cuda()
    assert host.load(host_slots, target)
    for layer in range(3):
        assert torch.equal(pool.k_buffers[layer][target].view(torch.uint8), expect_k[layer].view(torch.uint8))
        assert torch.equal(pool.v_buffers[layer][target].view(torch.uint8), expect_v[layer].view(torch.uint8))
    rows = host.read(host_slots)  # the file tier's view agrees
    assert rows.shape[:3] == (2, 3, n)


@cuda
def test_cuda_load_cancelled_stops_early():
    pool = KVPool(num_slots=64, num_layers=4, num_kv_heads=1, head_dim=8, dtype=torch.float16, device="cuda")
    host = HostKVPool(pool, 64)
    host.STAGE_BYTES = 8 * host.bytes_per_token  # chunks of 8 tokens: 4 chunks, a question before each
    calls = []
    assert not host.load(torch.arange(1, 33), torch.arange(1, 33).cuda(), cancelled=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3
