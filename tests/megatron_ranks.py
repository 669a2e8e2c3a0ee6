"""Rank-side half of tests/test_megatron.py: a small Megatron GPTModel on CPU gloo, run once with
Megatron's own loss and once with vpcce's, on the same parameters and inputs.

`run_cases(rank, world, megatron_path, names)` puts ``megatron_path`` first on ``sys.path`` (one
megatron-core version per spawned group), applies the CPU stand-ins below, initializes Megatron's
model parallelism with TP = ``world`` and returns, per case, the errors of vpcce's path against
Megatron's on this rank (loss, logits, every parameter gradient, the decoder-output gradient,
main_grad, MTP logging) plus whatever the parent checks exactly.

CPU stand-ins, applied in these test processes only (the library patches nothing):
- ``torch.cuda.current_device()`` returns ``"cpu"`` (Megatron allocates its sequence-parallel and
  dummy-gradient buffers there);
- the CUDA RNG tracker's ``fork()`` is a no-op context (dropout is off in every case);
- ``WrappedTorchNorm`` builds a plain ``torch.nn.LayerNorm`` under sequence parallelism too
  (Megatron refuses it because torch's LayerNorm does not mark its weights for the sequence-parallel
  gradient all-reduce; both paths compared here share the same norms, so it cannot matter);
- gradient-accumulation fusion's ``fused_weight_gradient_mlp_cuda`` is a matmul into ``main_grad``;
- HybridModel's final norm (Transformer Engine's ``TENorm``, absent here) is ``torch.nn.LayerNorm``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import sys
import types
import warnings

import torch

B, S, H, HEADS = 2, 8, 32, 4  # batch, sequence (divisible by TP for sequence parallel), hidden
SEED = 1234

# name -> settings. vocab: the model's (padded) vocabulary; labels lie in [0, true_vocab), so the
# padded rows take part in the softmax only. path: "patch" (patch(model)), "hook"
# (output_processor), "hook+patch". tied: the embedding weight is the output weight.
_BASE = dict(sp=False, tied=False, mtp=0, vocab=256, true_vocab=250, path="patch", mup=False,
             fusion=None, logits=False, eval=False, gather=None, model="gpt")
CASES = {
    "plain": {},
    "sp": dict(sp=True),
    "tied": dict(tied=True),
    "sp_tied": dict(sp=True, tied=True),
    "mtp": dict(mtp=1),
    "sp_mtp": dict(sp=True, mtp=1),
    "tied_mtp": dict(tied=True, mtp=1),
    "sp_tied_mtp": dict(sp=True, tied=True, mtp=1),
    "odd_vocab": dict(vocab=130, true_vocab=127, sp=True, tied=True),  # 65 rows per rank
    "eval": dict(eval=True, sp=True, mtp=1),
    "logits": dict(logits=True, sp=True, tied=True),
    "logits_gathered": dict(logits=True, gather=True),
    # gradient-accumulation fusion: main_grad with grad_added_to_main_grad (dummy .grad), with
    # zero_out_wgrad (zero .grad), and a main_grad without the flag (no .grad)
    "fusion": dict(fusion="flag", sp=True, mtp=1),
    "fusion_zero_out": dict(fusion="zero_out"),
    "fusion_no_flag": dict(fusion="no_flag", sp=True),
    # tied: the fused output-layer gradient goes to the embedding weight's main_grad
    "tied_fusion": dict(fusion="flag", sp=True, tied=True),
}
# megatron-core >= 0.19: HybridModel (no output_processor hook): attention-only layers here
HYBRID_CASES = {
    "hybrid_sp_tied": dict(model="hybrid", sp=True, tied=True),
    "hybrid_logits": dict(model="hybrid", logits=True),
}
# megatron-core >= 0.18: the output_processor hook and MuP's output multiplier
HOOK_CASES = {
    "hook": dict(path="hook"),
    "hook_sp_tied": dict(path="hook", sp=True, tied=True),
    "hook_patch_sp_tied_mtp": dict(path="hook+patch", sp=True, tied=True, mtp=1),
    "hook_logits": dict(path="hook", logits=True, sp=True),
    "hook_mup": dict(path="hook", mup=True, sp=True),
    "mup_mtp": dict(mup=True, tied=True, mtp=1),
}


def _quiet() -> None:
    """megatron-core warns about every missing optional dependency and deprecation on import."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def _cpu_stand_ins() -> None:
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.tensor_parallel import layers, random
    from megatron.core.transformer import torch_norm

    random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

    def torch_layer_norm(cls, config, hidden_size, eps=1e-5, **_):
        return torch.nn.LayerNorm(hidden_size, eps=eps)

    torch_norm.WrappedTorchNorm.__new__ = torch_layer_norm
    try:
        from megatron.core.models.hybrid import hybrid_block
    except ImportError:  # megatron-core < 0.19
        pass
    else:
        hybrid_block.TENorm = lambda config, hidden_size, eps=1e-5, **_: torch.nn.LayerNorm(
            hidden_size, eps=eps
        )

    def wgrad_accum(total_input, grad_output, main_grad):
        x = total_input.reshape(-1, total_input.shape[-1])
        g = grad_output.reshape(-1, grad_output.shape[-1])
        main_grad.add_(g.t() @ x)

    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=wgrad_accum, wgrad_gemm_accum_fp16=wgrad_accum
    )


def _build(case: dict, world: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = dict(use_mup=True, mup_base_hidden_size=H // 2) if case["mup"] else {}
    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=HEADS, use_cpu_initialization=True,
        tensor_model_parallel_size=world, sequence_parallel=case["sp"],
        mtp_num_layers=case["mtp"] or None, hidden_dropout=0.0, attention_dropout=0.0, **extra,
    )
    spec = get_gpt_layer_local_spec()
    mtp = None
    if case["mtp"]:
        mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    torch.manual_seed(SEED)
    if case["model"] == "hybrid":
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
        from megatron.core.models.hybrid.hybrid_model import HybridModel
        from megatron.core.transformer.spec_utils import ModuleSpec

        stack = ModuleSpec(
            module=HybridStack, submodules=HybridStackSubmodules(attention_layer=spec)
        )
        return HybridModel(
            config, stack, vocab_size=case["vocab"], max_sequence_length=S,
            hybrid_layer_pattern="*", share_embeddings_and_output_weights=case["tied"],
            position_embedding_type="learned_absolute",
        )
    return GPTModel(
        config, spec, vocab_size=case["vocab"], max_sequence_length=S,
        share_embeddings_and_output_weights=case["tied"], mtp_block_spec=mtp,
    )


def _output_weight(model):
    layer = model.output_layer
    return layer.weight if layer.weight is not None else model.shared_embedding_or_output_weight()


def _set_main_grad(model, mode):
    """Megatron DDP's view of the output weight under gradient-accumulation fusion."""
    model.output_layer.gradient_accumulation_fusion = True
    w = _output_weight(model)
    w.main_grad = torch.zeros(w.shape, dtype=torch.float32)
    if mode in ("flag", "zero_out"):
        w.grad_added_to_main_grad = False
    elif hasattr(w, "grad_added_to_main_grad"):
        del w.grad_added_to_main_grad
    w.zero_out_wgrad = mode == "zero_out"


def _mtp_tracker():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    return MTPLossLoggingHelper.tracker


def _step(model, case, inputs, kwargs):
    """One forward (+ backward with fixed per-token weights); what the comparison needs."""
    ids, pos, mask, labels, weights = inputs
    tracker = _mtp_tracker()
    for value in tracker.values():  # Megatron accumulates into it until its logging step
        if isinstance(value, torch.Tensor):
            value.zero_()
    model.zero_grad(set_to_none=True)
    if case["fusion"]:
        _set_main_grad(model, case["fusion"])
    captured = {}

    def keep_grad(_module, _args, out):
        if out.requires_grad:
            out.register_hook(lambda g: captured.__setitem__("hidden", g.clone()))

    w = _output_weight(model)
    handle = model.decoder.register_forward_hook(keep_grad)
    try:
        if case["logits"]:
            with torch.no_grad():
                out = model(ids, pos, mask, labels=None, runtime_gather_output=case["gather"],
                            **kwargs)
            return {"logits": out}
        if case["eval"]:
            model.eval()
            with torch.no_grad():
                out = model(ids, pos, mask, labels=labels, **kwargs)
            model.train()
            return {"loss": out}
        out = model(ids, pos, mask, labels=labels, **kwargs)
        (out * weights).sum().backward()
    finally:
        handle.remove()
    result = {
        "loss": out.detach(),
        # under fusion the output weight's .grad is Megatron's dummy; main_grad is compared instead
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                  if p.grad is not None and not (case["fusion"] and p is w)},
        "hidden": captured["hidden"],
        "mtp": {k: v.clone() for k, v in tracker.items() if isinstance(v, torch.Tensor)},
    }
    if case["fusion"]:
        result["main_grad"] = w.main_grad.clone()
        result["flag"] = getattr(w, "grad_added_to_main_grad", None)
        result["out_grad"] = None if w.grad is None else w.grad.clone()
    return result


def _rel(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _compare(ref: dict, got: dict, case: dict) -> dict:
    if case["logits"]:
        return {"logits": _rel(got["logits"], ref["logits"]),
                "shape": (tuple(got["logits"].shape), tuple(ref["logits"].shape))}
    out = {"loss": _rel(got["loss"], ref["loss"]), "dtype": str(got["loss"].dtype),
           "shape": (tuple(got["loss"].shape), tuple(ref["loss"].shape))}
    if case["eval"]:
        return out
    out["params"] = (sorted(got["grads"]), sorted(ref["grads"]))
    out["grads"] = {n: _rel(got["grads"][n], g) for n, g in ref["grads"].items()
                    if n in got["grads"]}
    out["hidden"] = _rel(got["hidden"], ref["hidden"])
    out["mtp"] = {k: (got["mtp"][k].tolist(), v.tolist()) for k, v in ref["mtp"].items()}
    if case["fusion"]:
        out["main_grad"] = _rel(got["main_grad"], ref["main_grad"])
        out["flag"] = (got["flag"], ref["flag"])
        # the dummy .grad is torch.empty in Megatron and here: only its shape is defined, and
        # its values only under zero_out_wgrad (zeros)
        zero_out = case["fusion"] == "zero_out"
        out["out_grad"] = [
            None if g is None else (tuple(g.shape), bool((g == 0).all()) if zero_out else None)
            for g in (got["out_grad"], ref["out_grad"])
        ]
    return out


def _run_case(case: dict, world: int) -> dict:
    from vpcce.integrations import megatron as vm

    case = {**_BASE, **case}
    model = _build(case, world)
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, case["true_vocab"], (B, S), generator=g)
    labels = torch.randint(0, case["true_vocab"], (B, S), generator=g)
    weights = torch.rand(B, S, generator=g)
    pos = torch.arange(S)[None].expand(B, S)
    mask = torch.ones(1, 1, S, S, dtype=torch.bool).triu(1)
    inputs = (ids, pos, mask, labels, weights)

    ref = _step(model, case, inputs, {})
    keys = sorted(model.state_dict())
    kwargs = {}
    if "patch" in case["path"]:
        vm.patch(model)
    if "hook" in case["path"]:
        kwargs["output_processor"] = vm.output_processor
    before = _MATERIALIZED[0]
    got = _step(model, case, inputs, kwargs)
    result = _compare(ref, got, case)
    result["materialized"] = _MATERIALIZED[0] - before
    result["state_dict_unchanged"] = sorted(model.state_dict()) == keys
    result["layer"] = type(model.output_layer).__name__
    return result


_MATERIALIZED = [0]  # DeferredLogits.materialize calls that built logits, counted in these ranks


def _count_materializations() -> None:
    from vpcce.integrations.megatron import DeferredLogits

    original = DeferredLogits.materialize

    def counted(self):
        if self._logits is None:
            _MATERIALIZED[0] += 1
        return original(self)

    DeferredLogits.materialize = counted


def _top1(world: int) -> dict:
    """The kernel's top-1 through DeferredLogits against the materialized logits' own: the
    queries of Megatron 0.19's MTP acceptance counts (``_vocab_parallel_argmax`` on vocab-sharded
    logits, ``torch.argmax`` on gathered ones), on peaked logits so that top-1 hits are common."""
    from megatron.core import parallel_state

    from vpcce.integrations import megatron as vm

    case = {**_BASE, "sp": True, "mtp": 1}  # patch keeps the top-1 for models with MTP heads
    model = vm.patch(_build(case, world))
    layer, weight = model.output_layer, model.output_layer.weight
    g = torch.Generator().manual_seed(SEED + 2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    labels = torch.randint(0, case["vocab"], (B, S), generator=g)
    # hidden states near 100 x their label's row: the label is usually the top-1
    full_weight = [torch.empty_like(weight) for _ in range(world)]
    torch.distributed.all_gather(full_weight, weight.detach(), group=layer.tp_group)
    hidden = 100 * torch.cat(full_weight)[labels.t()] + torch.randn(S, B, H, generator=g)
    hidden = hidden.chunk(world)[rank].contiguous()  # sequence parallel: this rank's tokens
    out = {}
    for gather in (None, True):
        logits, _ = layer(hidden, runtime_gather_output=gather)
        logits.cross_entropy(labels)
        before = _MATERIALIZED[0]
        if gather:
            top1 = torch.argmax(logits, dim=-1)
        else:
            from megatron.core.transformer import multi_token_prediction as mtp

            if not hasattr(mtp, "_vocab_parallel_argmax"):
                continue  # before 0.19: no acceptance counts
            top1 = mtp._vocab_parallel_argmax(logits, layer.tp_group, world)
        out[f"materialized_{gather}"] = _MATERIALIZED[0] - before
        full = logits.materialize()
        if not gather:
            full = torch.cat([torch.empty_like(full) for _ in range(world)], -1)
            parts = list(full.chunk(world, -1))
            torch.distributed.all_gather(parts, logits.materialize().contiguous(),
                                         group=layer.tp_group)
            full = torch.cat(parts, -1)
        expected = full.argmax(-1)
        out[f"equal_{gather}"] = bool((top1 == expected).all())
        out[f"hits_{gather}"] = int((expected == labels.t()).sum())
    # without MTP heads the loss skips the argmax partials; a top-1 query then builds the logits
    plain = vm.patch(_build({**_BASE, "sp": True}, world)).output_layer
    plain.weight.data.copy_(weight.detach())
    logits, _ = plain(hidden, runtime_gather_output=True)
    logits.cross_entropy(labels)
    before = _MATERIALIZED[0]
    top1 = torch.argmax(logits, dim=-1)
    out["no_mtp_materialized"] = _MATERIALIZED[0] - before
    out["no_mtp_equal"] = bool((top1 == logits.materialize().argmax(-1)).all())
    return out


def _protocol(world: int) -> dict:
    """DeferredLogits as a tensor stand-in: name -> whether it behaved like the logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vpcce.integrations import megatron as vm

    case = {**_BASE, "sp": True}
    layer = vm.patch(_build(case, world)).output_layer
    g = torch.Generator().manual_seed(SEED + 3)
    hidden = torch.randn(S // world, B, H, generator=g)
    labels = torch.randint(0, case["vocab"], (B, S), generator=g)
    deferred, _ = layer(hidden)
    full = deferred.materialize()
    scaled = deferred * 0.5  # MuP's _scale_logits: recorded, still deferred
    ref = vocab_parallel_cross_entropy(full * 0.5, labels.t().contiguous()).t()
    return {
        "shape": deferred.shape == full.shape and deferred.size(-1) == full.size(-1),
        "len": len(deferred) == len(full),
        "dtype_device": (deferred.dtype, deferred.device, deferred.dim()) == (
            full.dtype, full.device, full.dim()),
        "torch_function": torch.equal(torch.softmax(deferred, -1), torch.softmax(full, -1)),
        "method": torch.equal(deferred.float().sum(-1), full.float().sum(-1)),
        "operators": torch.equal(deferred + 1, full + 1) and torch.equal(1 - deferred, 1 - full)
        and torch.equal(deferred[0], full[0]) and torch.equal(-deferred, -full),
        "scaled_stays_deferred": isinstance(scaled, vm.DeferredLogits) and scaled._logits is None,
        "scaled_loss": _rel(scaled.cross_entropy(labels), ref) <= 1e-6,
        "scaled_materialize": _rel(scaled.materialize(), full * 0.5) == 0.0,
    }


def _refusals(world: int) -> dict:
    """Each refused setting -> (exception type, message) raised by the integration."""
    from vpcce.integrations import megatron as vm

    out = {}
    case = {**_BASE}
    model = _build(case, world)
    try:
        vm.patch(model, reduction="sum")
    except Exception as exc:  # noqa: BLE001 - the type is what the parent checks
        out["unknown_option"] = (type(exc).__name__, str(exc))
    model.config.defer_embedding_wgrad_compute = True
    try:
        vm.patch(model)
    except Exception as exc:  # noqa: BLE001
        out["defer_embedding_wgrad_compute"] = (type(exc).__name__, str(exc))
    try:
        vm.patch(torch.nn.Linear(2, 2))
    except Exception as exc:  # noqa: BLE001
        out["not_a_model"] = (type(exc).__name__, str(exc))
    return out


def run_cases(rank: int, world: int, megatron_path: str | None) -> dict:
    """Every case (the hook cases where GPTModel.forward has ``output_processor``) on this rank."""
    if megatron_path is not None:
        sys.path.insert(0, megatron_path)
    _quiet()
    import megatron.core
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    _cpu_stand_ins()
    _count_materializations()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    cases = dict(CASES)
    if "output_processor" in inspect.signature(GPTModel.forward).parameters:
        cases.update(HOOK_CASES)
    if importlib.util.find_spec("megatron.core.models.hybrid") is not None:
        cases.update(HYBRID_CASES)
    try:
        results = {"version": megatron.core.__version__, "file": megatron.core.__file__}
        for name, case in cases.items():
            try:
                results[name] = _run_case(case, world)
            except Exception as exc:
                raise RuntimeError(f"case {name!r} failed") from exc
        results["refusals"] = _refusals(world)
        results["top1"] = _top1(world)
        results["protocol"] = _protocol(world)
        return results
    finally:
        parallel_state.destroy_model_parallel()
