"""The reuse of large CPU tensors' memory (cmfast/memory.py, csrc/cpu_memory.cpp): which requests it serves and
from where, the scope's nesting and threads, the cap, idle blocks given back, the environment variable, and the
U-Net's results the same bits whether its memory is reused or fresh."""

import threading

import pytest
import torch

import cmfast
from cmfast import memory
from cmfast.models import PRESETS

pytestmark = pytest.mark.skipif(memory.compiled is None, reason="cmfast._C (the allocator) is not built")
MiB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.delenv(memory.KEEP_ENV, raising=False)
    memory.release()
    yield
    memory.release()


def large(mib: float = 6) -> torch.Tensor:
    return torch.empty(int(mib * MiB), dtype=torch.uint8)


def test_a_freed_large_block_serves_the_next_request_of_its_size():
    with memory.reusing():
        assert memory.stats()["active"] == 1
        a = large()
        where = a.data_ptr()
        before = memory.stats()
        del a
        assert memory.stats()["kept_blocks"] == before["kept_blocks"] + 1
        b = large(6 - 0.1)  # the same size class (256 KiB steps)
        assert b.data_ptr() == where
        assert memory.stats()["reused"] == before["reused"] + 1
        c = large(7)  # another class: a new block, 2 MiB aligned
        assert c.data_ptr() != where and c.data_ptr() % (2 * MiB) == 0
        c.fill_(7)
        assert int(c.sum()) == 7 * c.numel()


def test_small_requests_and_requests_outside_a_scope_are_torchs():
    with memory.reusing():
        before = memory.stats()
        small = torch.ones(1000)
        small.add_(1)
        del small
        after = memory.stats()
        assert (after["fresh"], after["reused"], after["live_blocks"]) == \
            (before["fresh"], before["reused"], before["live_blocks"])
    outside = memory.stats()
    a = large()
    del a
    assert memory.stats() == {**outside, "active": 0}


def test_scopes_nest_and_end_with_the_outermost():
    with memory.reusing():
        with memory.reusing():
            assert memory.stats()["active"] == 1
        assert memory.stats()["active"] == 1
        before = memory.stats()["fresh"]
        a = large()
        assert memory.stats()["fresh"] == before + 1
    assert memory.stats()["active"] == 0
    del a  # made in the scope, dies after it: its block is kept all the same
    assert memory.stats()["kept_blocks"] == 1


def test_an_exception_ends_the_scope():
    with pytest.raises(RuntimeError, match="inside"), memory.reusing():
        raise RuntimeError("inside")
    assert memory.stats()["active"] == 0


def test_the_cap_bounds_the_kept_blocks(monkeypatch):
    monkeypatch.setenv(memory.KEEP_ENV, "13")
    with memory.reusing():
        blocks = [large(6) for _ in range(3)]
        del blocks
        stats = memory.stats()
    assert stats["cap_bytes"] == 13 * MiB
    assert stats["kept_blocks"] == 2 and stats["kept_bytes"] == 12 * MiB


def test_a_block_no_request_took_for_a_whole_scope_is_given_back():
    with memory.reusing():
        a, b = large(6), large(8)
        del a, b
    assert memory.stats()["kept_blocks"] == 2
    with memory.reusing():
        c = large(6)  # takes one; the other stays unused through this scope
        del c
    assert memory.stats()["kept_bytes"] == 6 * MiB
    memory.release()
    assert memory.stats()["kept_blocks"] == 0


def test_keep_zero_means_no_scope(monkeypatch):
    monkeypatch.setenv(memory.KEEP_ENV, "0")
    with memory.reusing():
        assert memory.stats()["active"] == 0


@pytest.mark.parametrize("value", ["lots", "-5", "1.5", "1e3"])
def test_a_bad_keep_value_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(memory.KEEP_ENV, value)
    with pytest.raises(ValueError, match=memory.KEEP_ENV):
        with memory.reusing():
            pass
    unet = cmfast.UNet(PRESETS["test_lsun"].unet).eval()
    with pytest.raises(ValueError, match=memory.KEEP_ENV), torch.no_grad():
        unet(torch.randn(1, 3, 16, 16), torch.ones(1))
    assert memory.stats()["active"] == 0


def test_threads_get_their_own_blocks():
    errors = []

    def work(k):
        try:
            for i in range(20):
                with memory.reusing():
                    t = large(4 + (i + k) % 3).fill_(k)
                    if not bool((t == k).all()):
                        errors.append(f"thread {k}: block shared")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    live = memory.stats()["live_blocks"]
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = memory.stats()
    assert stats["active"] == 0 and stats["live_blocks"] == live


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_unet_gives_the_same_bits_on_reused_memory(monkeypatch, precision, gen):
    """Activations of 4-16 MiB: the second forward runs on blocks the first one left (filled with its values), the
    last one on fresh memory only; a kernel that read memory it did not write would differ."""
    unet = cmfast.UNet(PRESETS["test_lsun"].unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))
    unet = unet.eval().set_precision(precision).set_channels_last(precision == "bf16")
    x1, x2 = torch.randn(2, 4, 3, 128, 128, generator=gen)
    t = torch.full((4,), 1.5)
    with torch.no_grad():
        unet(x1, t)
        before = memory.stats()["reused"]
        reused = unet(x2, t)
        assert memory.stats()["reused"] > before + 10
        monkeypatch.setenv(memory.KEEP_ENV, "0")
        memory.release()
        fresh = unet(x2, t)
    assert torch.equal(reused, fresh)


def test_the_denoiser_opens_a_scope_for_cpu_inference_only():
    """Around any U-Net callable (a torch.compile'd one runs outside the eager forward's scope): CPU inference calls
    only, not under autograd."""
    seen = []

    def unet(x, t, y=None):
        seen.append(memory.stats()["active"])
        return x * 1.0

    denoise = cmfast.Denoiser(unet)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        denoise(x, 1.0)
    denoise(x, 1.0)  # gradients on
    assert seen == [1, 0] and memory.stats()["active"] == 0


def test_a_compiled_unet_in_the_denoiser_reuses_memory(gen):
    unet = cmfast.UNet(PRESETS["test_lsun"].unet).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    denoise = cmfast.Denoiser(torch.compile(unet, fullgraph=True, backend="aot_eager"))
    x = torch.randn(2, 3, 128, 128, generator=gen)  # activations of 4 MiB and more
    with torch.no_grad():
        denoise(x, 5.0)
        before = memory.stats()["reused"]
        denoise(x, 5.0)
    assert memory.stats()["reused"] > before + 5


def test_info_says_what_is_kept(monkeypatch):
    from cmfast import info

    assert "MiB kept now, at most 12 MiB" in (monkeypatch.setenv(memory.KEEP_ENV, "12") or info._memory_reuse())
    monkeypatch.setenv(memory.KEEP_ENV, "0")
    assert "not reused" in info._memory_reuse()
    monkeypatch.setenv(memory.KEEP_ENV, "many")
    assert "refused" in info._memory_reuse() and memory.KEEP_ENV in info._memory_reuse()


def test_a_forked_child_allocates_while_a_scope_is_open():
    """fork() inside a scope (a DataLoader's workers): the child's large tensors are served, nothing hangs. The child
    runs one thread, as DataLoader workers do (OpenMP's threads do not survive a fork)."""
    import os

    with memory.reusing():
        keep = large()
        pid = os.fork()
        if pid == 0:  # the child: allocate, free, leave without running the parent's cleanup
            try:
                torch.set_num_threads(1)
                t = large()
                t[-1] = 3
                del t
                t = large(9)
                t[0] = 1
                os._exit(0 if int(t[0]) == 1 else 1)
            except BaseException:  # noqa: BLE001
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        del keep
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
