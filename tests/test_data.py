"""The benchmarks' synthetic data (`vpcce.launch.data`): reproducible from its seed, and as
peaked as asked. (Across processes on CUDA: CUDA's ``multinomial`` once made the Zipf draws differ
from run to run with one seed; they are drawn on the CPU now. Checked on the H200 with two
processes, docs/perf.md 2026-12-02 session 15.) And `kernel_check.checksum`, which prints
them for comparing two runs."""

from __future__ import annotations

import pytest
import torch

from vpcce.launch.data import flat, lm_like, sample_stats


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.e, b.e), (a.c, b.c), (a.targets, b.targets)))


@pytest.mark.parametrize("make", [lm_like, flat])
def test_one_seed_gives_one_batch(make):
    kw = dict(entropy=3.0) if make is lm_like else {}
    first, again = make(96, 32, 700, seed=4, **kw), make(96, 32, 700, seed=4, **kw)
    assert _same(first, again)
    assert not _same(first, make(96, 32, 700, seed=5, **kw))


@pytest.mark.parametrize("entropy", [1.0, 5.0])
def test_lm_like_has_the_mean_entropy_asked(entropy):
    b = lm_like(512, 64, 4000, entropy=entropy, dtype=torch.float32)
    h, nll = sample_stats(b.e, b.c, b.targets, sample=512)
    assert abs(h - entropy) < 0.15 * entropy, h  # the bisection sets it on the first 256 tokens
    assert (b.mean_entropy, b.mean_nll) == pytest.approx(sample_stats(b.e, b.c, b.targets))
    assert nll > 0 and b.targets.min() >= 0 and b.targets.max() < 4000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.bool])
def test_checksum_sees_one_changed_word(dtype):
    from vpcce.launch.kernel_check import checksum

    x = (torch.arange(5000) % 7).to(dtype)
    assert checksum(x) == checksum(x.clone())
    for i in (0, 1234, 4999):
        y = x.clone()
        y.view(torch.uint8)[i * x.element_size()] ^= 1  # the word's lowest bit
        assert checksum(y) != checksum(x), i
    assert checksum(x) != checksum(x.flip(0))


def test_kernel_check_row_and_report(monkeypatch, capsys):
    """`kernel_check.check` on CPU (the exact mode's kernels in the interpreter); the CUDA-only
    memory and synchronization probes replaced."""
    from types import SimpleNamespace

    from vpcce.launch import kernel_check

    monkeypatch.setattr(kernel_check, "extra_memory_mb", lambda *a, **k: 0.0)
    monkeypatch.setattr(kernel_check, "no_host_sync", lambda *a, **k: True)
    batch = lm_like(64, 32, 500, entropy=2.0, dtype=torch.float32)
    row = kernel_check.check("peaked", batch, SimpleNamespace(time=False))
    assert row["bitwise_deterministic"]
    for label in ("baseline", "exact", "default"):  # fp32 inputs: all near the fp64 truth
        assert max(row[label].values()) < 1e-5, (label, row[label])
    again = kernel_check.check("peaked", batch, SimpleNamespace(time=False))
    assert again["checksums"] == row["checksums"]
    kernel_check.report([row], (64, 32, 500), "cpu")
    out = capsys.readouterr().out
    assert row["checksums"]["default loss, dE, dC"] in out and "| peaked | True | True |" in out
