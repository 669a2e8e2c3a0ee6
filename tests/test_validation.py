"""Bad inputs: each raises ValueError / TypeError with a message that names the argument."""

from __future__ import annotations

import pytest
import torch

from vpcce import LayoutError, LinearCrossEntropy, VocabParallelOptions, linear_cross_entropy

B, T, D, V = 2, 5, 8, 11


def good():
    """Valid arguments; each case below breaks one of them."""
    g = torch.Generator().manual_seed(0)
    return dict(
        e=torch.randn(B, T, D, generator=g),
        c=torch.randn(V, D, generator=g),
        targets=torch.randint(0, V, (B, T), generator=g),
        bias=torch.randn(V, generator=g),
        impl="torch",
    )


def with_(**changes):
    return lambda: {**good(), **changes}


def targets_with(value):
    def make():
        args = good()
        args["targets"][1, 3] = value
        return args

    return make


# (id, arguments, exception, regex the message must match: the argument's name, and where useful
# the received value)
CASES = [
    # tensors and shapes
    ("e-not-tensor", with_(e=[[0.0] * D]), TypeError, r"^e must be a torch\.Tensor.*list"),
    (
        "c-not-tensor",
        with_(c=torch.randn(V, D).numpy()),
        TypeError,
        r"^c must be a torch\.Tensor.*ndarray",
    ),
    (
        "targets-not-tensor",
        with_(targets=[[0] * T] * B),
        TypeError,
        r"^targets must be a torch\.Tensor",
    ),
    ("bias-not-tensor", with_(bias=[0.0] * V), TypeError, r"^bias must be a torch\.Tensor"),
    (
        "e-0d",
        with_(e=torch.tensor(1.0), targets=torch.tensor(0)),
        ValueError,
        r"^e must have shape",
    ),
    ("c-1d", with_(c=torch.randn(D)), ValueError, r"^c must have shape \(V, D\).*\(8,\)"),
    (
        "c-3d",
        with_(c=torch.randn(1, V, D)),
        ValueError,
        r"^c must have shape \(V, D\).*\(1, 11, 8\)",
    ),
    ("c-no-rows", with_(c=torch.randn(0, D), bias=None), ValueError, r"^c must hold at least one"),
    ("D-mismatch", with_(c=torch.randn(V, D + 1)), ValueError, r"^c has D=9 but e has D=8"),
    (
        "targets-shape",
        with_(targets=torch.randint(0, V, (B, T + 1))),
        ValueError,
        r"^targets must have shape \(2, 5\).*\(2, 6\)",
    ),
    (
        "targets-flat",
        with_(targets=torch.randint(0, V, (B * T,))),
        ValueError,
        r"^targets must have shape",
    ),
    # dtypes
    (
        "e-integer",
        with_(e=torch.ones(B, T, D, dtype=torch.int32), c=torch.ones(V, D, dtype=torch.int32)),
        TypeError,
        r"^e must be a floating-point tensor.*int32",
    ),
    (
        "targets-float",
        with_(targets=torch.zeros(B, T)),
        TypeError,
        r"^targets must be an integer tensor.*float32",
    ),
    (
        "targets-bool",
        with_(targets=torch.zeros(B, T, dtype=torch.bool)),
        TypeError,
        r"^targets must be an integer tensor.*bool",
    ),
    (
        "c-dtype",
        with_(c=torch.randn(V, D, dtype=torch.bfloat16)),
        TypeError,
        r"^c dtype torch\.bfloat16 does not match e dtype torch\.float32",
    ),
    (
        "bias-dtype",
        with_(bias=torch.randn(V, dtype=torch.float64)),
        TypeError,
        r"^bias dtype torch\.float64 does not match e",
    ),
    (
        "bias-shape",
        with_(bias=torch.randn(V + 1)),
        ValueError,
        r"^bias must have shape \(11,\).*\(12,\)",
    ),
    ("bias-2d", with_(bias=torch.randn(1, V)), ValueError, r"^bias must have shape \(11,\)"),
    # devices: "meta" tensors stand in for another device on a CPU-only machine
    (
        "c-device",
        with_(c=torch.randn(V, D, device="meta")),
        ValueError,
        r"^c is on meta but e is on cpu",
    ),
    (
        "targets-device",
        with_(targets=torch.zeros(B, T, dtype=torch.long, device="meta")),
        ValueError,
        r"^targets is on meta but e is on cpu",
    ),
    (
        "bias-device",
        with_(bias=torch.randn(V, device="meta")),
        ValueError,
        r"^bias is on meta but e is on cpu",
    ),
    # shift
    ("shift-negative", with_(shift=-1), ValueError, r"^shift must be in \[0, 5\].*got -1"),
    ("shift-above-T", with_(shift=T + 1), ValueError, r"^shift must be in \[0, 5\].*got 6"),
    (
        "shift-1d-e",
        with_(e=torch.randn(D), targets=torch.tensor(3), shift=1),
        ValueError,
        r"^shift must be in \[0, 0\]",
    ),
    ("shift-float", with_(shift=1.0), TypeError, r"^shift must be an int.*1\.0"),
    ("ignore_index-bool", with_(ignore_index=True), TypeError,
     r"^ignore_index must be an int.*True"),  # fmt: skip
    ("ignore_index-float", with_(ignore_index=-100.0), TypeError, r"^ignore_index must be an int"),
    # options
    ("reduction", with_(reduction="avg"), ValueError, r"^reduction must be one of.*'avg'"),
    ("reduction-None", with_(reduction=None), ValueError, r"^reduction must be one of.*None"),
    ("impl", with_(impl="cuda"), ValueError, r"^impl must be one of.*'cuda'"),
    (
        "label_smoothing-negative",
        with_(label_smoothing=-0.1),
        ValueError,
        r"^label_smoothing must be.*-0\.1",
    ),
    (
        "label_smoothing-above-1",
        with_(label_smoothing=1.5),
        ValueError,
        r"^label_smoothing must be.*1\.5",
    ),
    ("label_smoothing-str", with_(label_smoothing="0.1"), ValueError, r"^label_smoothing must be"),
    (
        "softcap-zero",
        with_(softcap=0.0),
        ValueError,
        r"^softcap must be None or a finite float > 0.*0\.0",
    ),
    ("softcap-inf", with_(softcap=float("inf")), ValueError, r"^softcap must be.*finite.*inf"),
    ("softcap-bool", with_(softcap=True), ValueError, r"^softcap must be.*True"),
    ("label_smoothing-bool", with_(label_smoothing=True), ValueError, r"^label_smoothing.*True"),
    (
        "logit_scale-nan",
        with_(logit_scale=float("nan")),
        ValueError,
        r"^logit_scale must be finite",
    ),
    (
        "logit_scale-inf",
        with_(logit_scale=float("inf")),
        ValueError,
        r"^logit_scale must be finite",
    ),
    ("softcap-negative", with_(softcap=-5.0), ValueError, r"^softcap must be.*-5\.0"),
    ("softcap-str", with_(softcap="5"), ValueError, r"^softcap must be"),
    ("logit_scale-str", with_(logit_scale="2"), TypeError, r"^logit_scale must be a float"),
    ("logit_scale-None", with_(logit_scale=None), TypeError, r"^logit_scale must be a float"),
    (
        "vocab_parallel_options-dict",
        with_(vocab_parallel_options={"start": 0, "stop": V}),
        TypeError,
        r"^vocab_parallel_options must be VocabParallelOptions.*dict",
    ),
    (
        "vocab_parallel_options-shard",
        with_(vocab_parallel_options=VocabParallelOptions(0, V - 1)),
        LayoutError,  # a ValueError raised on every rank alike
        r"^c has 11 rows on rank 0 but its vocab_parallel_options own \[0, 10\)",
    ),
    ("filter_eps-str", with_(filter_eps="fast"), TypeError, r"^filter_eps must be.*'fast'"),
    ("filter_eps-bool", with_(filter_eps=True), TypeError, r"^filter_eps must be.*True"),
    (
        "filter_eps-negative",
        with_(filter_eps=-1e-3),
        ValueError,
        r"^filter_eps must be >= 0.*-0\.001",
    ),
    (
        "filter_eps-nan",
        with_(filter_eps=float("nan")),
        ValueError,
        r"^filter_eps must be >= 0.*nan",
    ),
    # target values (an eager check on the CPU)
    ("targets-equal-V", targets_with(V), ValueError, r"^targets must be in \[0, 11\).*found 11"),
    (
        "targets-negative",
        targets_with(-1),
        ValueError,
        r"^targets must be in \[0, 11\).*ignore_index=-100.*found -1",
    ),
    (
        "targets-other-ignore_index",
        lambda: {**targets_with(-100)(), "ignore_index": -1},
        ValueError,
        r"^targets must be in \[0, 11\) or equal ignore_index=-1; found -100",
    ),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(make, exc, match):
    args = make()
    with pytest.raises(exc, match=match) as info:
        linear_cross_entropy(**args)
    assert type(info.value) is exc  # not a subclass standing in for the documented type


@pytest.mark.parametrize(
    "make",
    [
        with_(shift=T),
        with_(shift=0),
        targets_with(-100),
        lambda: {**targets_with(-1)(), "ignore_index": -1},
        with_(label_smoothing=1.0),
        with_(filter_eps=0.0),
        with_(filter_eps=None),
        with_(shift=True),
    ],
    ids=[
        "shift=T",
        "shift=0",
        "ignored-target",
        "custom-ignore_index",
        "label_smoothing=1",
        "filter_eps=0",
        "filter_eps=None",
        "shift=True",
    ],
)
def test_boundary_values_are_accepted(make):
    loss = linear_cross_entropy(**make())
    assert loss.dtype == torch.float32 and loss.shape == ()


def test_bool_shift_means_one():
    args = good()
    torch.testing.assert_close(
        linear_cross_entropy(**args, shift=True),
        linear_cross_entropy(**args, shift=1),
        rtol=0,
        atol=0,
    )


def test_numpy_scalars_are_python_scalars():
    np = pytest.importorskip("numpy")
    args = good()
    options = dict(shift=1, label_smoothing=0.1, logit_scale=0.5, softcap=3.0)
    numpy_options = dict(
        ignore_index=np.int32(-100),
        shift=np.int64(1),
        label_smoothing=np.float32(0.1),
        logit_scale=np.float64(0.5),
        softcap=np.float32(3.0),
    )
    torch.testing.assert_close(
        linear_cross_entropy(**args, **numpy_options),
        linear_cross_entropy(**args, **{**options, "label_smoothing": float(np.float32(0.1))}),
        rtol=0,
        atol=0,
    )


def test_target_range_check_reads_only_the_shifted_targets():
    """With ``shift=k`` the first k targets are never read: any value there is accepted."""
    args = good()
    reference = linear_cross_entropy(**args, shift=1)
    args["targets"][:, 0] = -1
    torch.testing.assert_close(linear_cross_entropy(**args, shift=1), reference, rtol=0, atol=0)
    args["targets"][:, 1] = V
    with pytest.raises(ValueError, match=r"^targets must be in \[0, 11\).*found 11"):
        linear_cross_entropy(**args, shift=1)


def test_validate_false_skips_the_target_range_check():
    args = targets_with(V)()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(**args)
    linear_cross_entropy(**args, validate=False)  # the caller vouches for the targets


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^impl='triton' runs the Triton kernels.*cpu"):
        linear_cross_entropy(**with_(impl="triton")())


def test_module_checks_options_at_construction():
    with pytest.raises(TypeError, match=r"unknown options \['reductions'\]"):
        LinearCrossEntropy(reductions="sum")
    module = LinearCrossEntropy(
        reduction="avg"
    )  # values are checked at call time, like the function
    args = good()
    with pytest.raises(ValueError, match=r"^reduction must be one of"):
        module(args["e"], args["c"], args["targets"], args["bias"])


@pytest.mark.parametrize(
    "start,stop", [(-1, 4), (5, 4)], ids=["negative-start", "stop-before-start"]
)
def test_vocab_parallel_options_bad_range(start, stop):
    with pytest.raises(ValueError, match=r"^VocabParallelOptions needs 0 <= start <= stop"):
        VocabParallelOptions(start, stop)


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)


# One call on CUDA in a fresh process (a device-side assert ends the process's CUDA context):
# argv impl, validate, the bad target's value; prints "ok" once the GPU has run the call.
_CUDA_CALL = """
import sys, torch
from vpcce import linear_cross_entropy
impl, validate, value = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
g = torch.Generator().manual_seed(0)
e = torch.randn(64, 128, generator=g).to("cuda", torch.bfloat16)
c = torch.randn(1000, 128, generator=g).to("cuda", torch.bfloat16)
y = torch.randint(0, 1000, (64,), generator=g).cuda()
y[7] = value
loss = linear_cross_entropy(e, c, y, impl=impl, validate=validate)
torch.cuda.synchronize()
print("ok", float(loss))
"""


def _run_on_cuda(impl: str, validate: bool, value: int):
    import subprocess
    import sys

    args = [sys.executable, "-c", _CUDA_CALL, impl, str(int(validate)), str(value)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.cuda
def test_cuda_target_check_is_a_device_side_assert():
    """On CUDA a bad target fails the call at the next synchronization (the Triton path queues
    the check after the forward's kernels: they index no memory by an out-of-range target, so
    with ``validate=False`` the same call runs)."""
    for impl in ("triton", "torch"):
        for value in (1000, -1):
            bad = _run_on_cuda(impl, True, value)
            assert bad.returncode != 0 and "device-side assert" in bad.stderr, (impl, value)
        good_run = _run_on_cuda(impl, True, 5)
        assert good_run.returncode == 0 and "ok" in good_run.stdout, good_run.stderr[-2000:]
    unchecked = _run_on_cuda("triton", False, 1000)
    assert unchecked.returncode == 0 and "ok" in unchecked.stdout, unchecked.stderr[-2000:]
