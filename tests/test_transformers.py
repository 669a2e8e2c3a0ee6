"""`vpcce.integrations.transformers.patch` against the unpatched models, on the CPU.

Tiny randomly initialised fp32 models built from configs (no downloads) for the acceptance
architectures (llama, mistral, gemma2 with final-logit softcapping, qwen2, phi3), the other
config-driven logit transforms (cohere ``logit_scale``, granite ``logits_scaling``) and an MoE
(mixtral: the router's auxiliary loss is added by the model's own forward). The output
embedding is scaled so logits are O(3): softcapping and scaling change the loss, which the test
checks before comparing. A patched copy and the original see the same inputs; compared:

- loss and every parameter's gradient (relative error ``max |x - ref| / max |ref|`` <= `TOL`),
  for the mean loss and for gradient accumulation over two micro-batches with
  ``num_items_in_batch`` (transformers: sum of token losses / num_items_in_batch);
- logits: none after a patched training forward; the model's own without labels, and in eval
  with ``eval_logits=True``;
- ``shift_labels``, ``return_dict=False``, patching by class / model_type / config, `unpatch`,
  and the refusals (unknown options, an unknown logit transform, a custom loss function).

Versions: the installed transformers here; every ``.transformers/<version>/`` directory
(``pip install --target``, made by .ci/run; 4.48, the oldest supported) runs this file again in
a subprocess with that directory first on ``sys.path``.
"""

from __future__ import annotations

import copy
import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from vpcce.integrations.transformers import logit_transform, patch, unpatch  # noqa: E402

# set by test_installed_versions for the subprocess that runs this file on another version
_EXPECTED_VERSION = os.environ.get("VPCCE_TRANSFORMERS_VERSION")
if _EXPECTED_VERSION is not None:
    assert transformers.__version__.startswith(_EXPECTED_VERSION), transformers.__version__
ROOT = pathlib.Path(__file__).resolve().parents[1]

VOCAB = 512
TOL = 2e-5  # fp32: loss and gradients against the unpatched model
LOGIT_SCALE_UP = 30.0  # output embedding x 30: logits ~ N(0, 3^2) instead of N(0, 0.1^2)
_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=3.0)),
    "qwen2": ("Qwen2Config", {}),
    "phi3": ("Phi3Config", {}),
    "cohere": ("CohereConfig", dict(logit_scale=0.5)),
    "granite": ("GraniteConfig", dict(logits_scaling=2.0)),
    "mixtral": (
        "MixtralConfig",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.1,
        ),
    ),
}
ACCEPTANCE = ["llama", "mistral", "gemma2", "qwen2", "phi3"]


def make_model(arch: str, seed: int = 0, **overrides):
    name, extra = ARCHS[arch]
    config = getattr(transformers, name)(**{**_TINY, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE_UP)
    return model.train()


def batch(seed: int, b: int = 2, t: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, : t // 3] = -100  # a prompt that is not trained on
    labels[-1, -2:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def rel_err(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    scale = ref.abs().max()
    return float((x - ref).abs().max() / scale) if scale > 0 else float((x - ref).abs().max())


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(model, ref, what: str):
    got, want = grads(model), grads(ref)
    assert got.keys() == want.keys()
    worst = max(want, key=lambda n: rel_err(got[n], want[n]))
    assert rel_err(got[worst], want[worst]) <= TOL, f"{what}: gradient of {worst}"


def pair(arch: str, **options):
    ref = make_model(arch)
    return patch(copy.deepcopy(ref), impl=options.pop("impl", "torch"), **options), ref


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_and_gradients_match(arch):
    model, ref = pair(arch)
    data = batch(1)
    out, want = model(**data), ref(**data)
    assert out.logits is None and want.logits is not None
    assert rel_err(out.loss, want.loss) <= TOL, (out.loss, want.loss)
    out.loss.backward()
    want.loss.backward()
    assert_grads_match(model, ref, arch)
    softcap, scale = logit_transform(ref.config)
    if softcap is not None or scale != 1.0:  # the transform must matter for this to test it
        with torch.no_grad():
            raw = ref.lm_head(ref.model(input_ids=data["input_ids"]).last_hidden_state)
        untransformed = F.cross_entropy(raw[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten())
        assert rel_err(untransformed, want.loss) > 1e-3


@pytest.mark.parametrize("arch", ACCEPTANCE)
def test_gradient_accumulation_num_items_in_batch(arch):
    model, ref = pair(arch)
    micro = [batch(2), batch(3, b=3, t=7)]
    num_items = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    for i, m in enumerate(micro):
        # the Trainer passes a tensor; an int is accepted too
        n = torch.tensor(num_items) if i == 0 else num_items
        out, want = model(**m, num_items_in_batch=n), ref(**m, num_items_in_batch=n)
        assert rel_err(out.loss, want.loss) <= TOL, (i, out.loss, want.loss)
        out.loss.backward()
        want.loss.backward()
    assert_grads_match(model, ref, f"{arch} accumulated")


def test_triton_kernels():
    """impl="triton" (the interpreter on CPU): the patch passes vpcce options through."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    model, ref = pair("gemma2", impl="triton")
    data = batch(4)
    out, want = model(**data), ref(**data)
    assert rel_err(out.loss, want.loss) <= TOL
    out.loss.backward()
    want.loss.backward()
    assert_grads_match(model, ref, "triton")


def test_autocast():
    """Under autocast the head's operands are cast as nn.Linear would cast them."""
    model, ref = pair("llama")
    data = batch(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = model(**data), ref(**data)
    # transformers rounds the logits to bf16 before its fp32 loss; vpcce keeps them in fp32
    assert out.loss.dtype == torch.float32 and rel_err(out.loss, want.loss) <= 1e-2
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_logits_paths():
    model, ref = pair("llama")
    data = batch(5)
    no_labels = {k: v for k, v in data.items() if k != "labels"}
    torch.testing.assert_close(model(**no_labels).logits, ref(**no_labels).logits)
    model.eval()
    ref.eval()
    with torch.no_grad():
        out = model(**data)
        assert out.logits is None and rel_err(out.loss, ref(**data).loss) <= TOL
        patch(model, eval_logits=True, impl="torch")
        out, want = model(**data), ref(**data)
        torch.testing.assert_close(out.logits, want.logits)
        torch.testing.assert_close(out.loss, want.loss)
    model.train()
    assert model(**data).logits is None


def test_shift_labels():
    model, ref = pair("qwen2")
    data = batch(6)
    labels = data.pop("labels")
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    out, want = model(**data, shift_labels=shifted, labels=labels), ref(**data, labels=labels)
    assert rel_err(out.loss, want.loss) <= TOL


@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_tuple_output(arch):
    """``return_dict=False``: the model's tuple without its logits, wherever they are in it
    (mixtral: ``(loss, aux_loss, logits, ...)``)."""
    model, ref = pair(arch)
    data = batch(6)
    got, full = model(**data, return_dict=False), ref(**data, return_dict=False)
    logits = [i for i, x in enumerate(full) if torch.is_tensor(x) and x.shape[-1:] == (VOCAB,)]
    assert len(logits) == 1 and len(got) == len(full) - 1
    rest = [x for i, x in enumerate(full) if i != logits[0]]
    for g, f in zip(got, rest, strict=True):
        assert type(g) is type(f)
        if torch.is_tensor(f):
            assert g.shape == f.shape and rel_err(g, f) <= TOL


def test_a_transform_the_forward_does_not_apply_is_refused():
    """A config key that names a transform the forward ignores (MPT's ``logit_scale``) is found
    at the first training call; one that is not a number is not a transform."""
    model = patch(make_model("llama", logit_scale=0.5), impl="torch")
    with pytest.raises(ValueError, match=r"transforms .* 8\.0 into 8\.0 .* config says 4\.0"):
        model(**batch(3))
    assert logit_transform(transformers.LlamaConfig(logit_scale="inv_sqrt_d_model")) == (None, 1.0)
    ref = make_model("llama", logit_scale=0.5)
    model = copy.deepcopy(ref)
    model.config.logit_scale = None  # as the error message suggests
    patch(model, impl="torch")
    assert rel_err(model(**batch(3)).loss, ref(**batch(3)).loss) <= TOL


def test_a_loss_that_is_not_finite_stays_so():
    model, ref = pair("llama")
    with torch.no_grad():
        for m in (model, ref):
            m.lm_head.weight[3, 0] = float("nan")
    assert torch.isnan(model(**batch(4)).loss) and torch.isnan(ref(**batch(4)).loss)


def test_compiled_whole_graph():
    """``torch.compile(fullgraph=True)`` of a patched model (the transform check is eager-only)."""
    model, ref = pair("gemma2")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    data = batch(2)
    out, want = compiled(**data), ref(**data)
    assert out.logits is None and rel_err(out.loss, want.loss) <= TOL
    out.loss.backward()
    want.loss.backward()
    assert_grads_match(model, ref, "compiled")


def test_data_parallel_replicas_are_refused():
    model, _ = pair("llama")
    with pytest.raises(RuntimeError, match="cannot be replicated by nn.DataParallel"):
        model._replicate_for_data_parallel()  # what torch.nn.parallel.replicate calls
    unpatch(model)._replicate_for_data_parallel()


def test_a_forward_computing_its_loss_inline_is_refused():
    class InlineLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)

    model = patch(InlineLoss(make_model("llama").config), impl="torch")
    data = batch(5)
    with pytest.raises(RuntimeError, match="did not compute its loss through") as info:
        model(input_ids=data["input_ids"], labels=data["labels"])
    assert info.value.__cause__ is not None  # the model's own error on the stand-in, chained


def test_patch_by_class_type_and_config():
    cls = transformers.LlamaForCausalLM
    try:
        for target in (cls, "llama", transformers.LlamaConfig()):
            assert patch(target, impl="torch") is cls
            assert getattr(make_model("llama"), "_vpcce_state", None) is not None
            assert getattr(make_model("qwen2"), "_vpcce_state", None) is None
            unpatch(cls)
            assert getattr(make_model("llama"), "_vpcce_state", None) is None
    finally:
        unpatch(cls)


def test_unpatch_instance():
    model, ref = pair("llama")
    unpatch(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    assert "_loss_function" not in vars(model)
    data = batch(7)
    out = model(**data)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref(**data).loss)


def test_deepcopy_of_a_patched_model():
    """A copy (an EMA model, a reference policy) is patched on its own, not through the original."""
    model, ref = pair("llama")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(0.5)
        ref_twin = copy.deepcopy(ref)
        ref_twin.lm_head.weight.mul_(0.5)
    data = batch(9)
    for m, r in ((twin, ref_twin), (model, ref)):
        out = m(**data)
        assert out.logits is None and rel_err(out.loss, r(**data).loss) <= TOL


def test_trainer_sees_the_original_signature():
    """The Trainer passes num_items_in_batch only to a forward that takes **kwargs."""
    model, _ = pair("llama")
    params = inspect.signature(model.forward).parameters
    assert "labels" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_refusals():
    with pytest.raises(TypeError, match="unknown vpcce options.*reduction"):
        patch(make_model("llama"), reduction="sum")
    with pytest.raises(TypeError, match="patch takes a model"):
        patch(3)
    with pytest.raises(ValueError, match="no \\*ForCausalLM class"):
        patch("no-such-model")
    # the forward softcaps, but the config did not say so when the model was patched
    model = patch(make_model("gemma2", final_logit_softcapping=None), impl="torch")
    model.config.final_logit_softcapping = 3.0
    with pytest.raises(ValueError, match="transforms the output embedding's output"):
        model(**batch(8))
    custom = make_model("llama")
    if inspect.getattr_static(type(custom), "loss_function").fset is not None:  # >= 4.50
        custom.loss_function = lambda *a, **k: 0.0
        with pytest.raises(ValueError, match="custom loss_function"):
            patch(custom)


_VERSION_DIRS = sorted(
    p for p in (ROOT / ".transformers").glob("*") if (p / "transformers").is_dir()
)


@pytest.mark.skipif(_EXPECTED_VERSION is not None, reason="already on another version")
@pytest.mark.parametrize("path", _VERSION_DIRS or [None], ids=lambda p: getattr(p, "name", "none"))
def test_installed_versions(path):
    if path is None:
        pytest.skip("no .transformers/<version>/ install (made by .ci/run)")
    env = dict(os.environ, VPCCE_TRANSFORMERS_VERSION=path.name)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           str(pathlib.Path(__file__))]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout, done.stdout[-2000:]
