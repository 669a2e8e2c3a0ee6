"""Hugging Face transformers: vpcce's fused loss as the loss of any ``*ForCausalLM``.

``patch(model)`` changes one model; ``patch(LlamaForCausalLM)``, ``patch("llama")`` or
``patch(config)`` patch every model of that class constructed afterwards. No forward code is
copied; three hooks, all on the instance:

- ``model.forward`` is wrapped. A call with ``labels`` (in training, and in eval unless
  ``eval_logits=True``) runs the model's own forward with the same arguments while
- the output embedding (``get_output_embeddings()``, an ``nn.Linear``), called by that forward
  with the hidden states, computes the vpcce loss instead of the logits and returns a
  ``[1, 1, 1]`` stand-in that carries its gradient, and
- ``model.loss_function``, called by that forward with the stand-in, returns the loss.

So the model's code around the head runs unchanged: the decoder, scaling of the hidden states
before the head, ``logits_to_keep``, auxiliary losses added to the loss (MoE router losses). The
output has ``logits=None`` (``return_dict=False``: the model's tuple without the logits). Without
labels, or in eval with ``eval_logits=True``, the original forward runs untouched (real logits,
transformers' own loss).

The loss is transformers' ``ForCausalLMLoss``: labels shifted by one (``shift_labels`` taken as
given), ``ignore_index`` (-100) excluded, the mean over the other tokens, or their sum divided by
``num_items_in_batch`` when the caller passes it (gradient accumulation, as the Trainer does).
vpcce computes the logits in fp32 from the head's operands; transformers rounds them to the model
dtype first, so bf16 models differ by that rounding. Where every label is ignored the loss is 0
with zero gradients (transformers: NaN). ``shift_labels`` is honoured also on versions whose
loss ignores it (4.48).

Logit transformations that forwards apply after the head are read from the (text) config:
``final_logit_softcapping`` / ``logits_soft_cap`` (Gemma 2/3 and others: ``s * tanh(z / s)``),
``logit_scale`` (Cohere: ``z * scale``), ``logits_scaling`` (Granite: ``z / scaling``). When the
config names none of them, the forward must hand the head's output to its loss function
unchanged. The stand-in holds a fixed probe value, and at a model's first training call (two
host reads) the forward must have made of it what the config's transform makes of it: a model
that transforms it some other way, or not at all where the config names a transform (MPT
ignores its ``logit_scale``), is refused. Not detected: a forward that changes the logits
depending on their shape (the stand-in is ``[1, 1, 1]``), such as one that drops padded
vocabulary columns.

Not supported: ``nn.DataParallel`` (the replicas would share the hooks; refused). On
transformers < 4.50 the instance's class is swapped for a same-named subclass, so pickling the
whole module (``torch.save(model)``) fails; save its ``state_dict``, or `unpatch` first.

FSDP2: the loss is computed inside the head's forward, where FSDP2 has gathered the weight (a
plain tensor); the stand-in is the head's output, which FSDP2 hooks to gather the weight again
for backward and reshard the gradient. A DTensor weight (tensor parallelism, ``Shard(0)`` over
the vocabulary) goes through `vpcce.integrations.dtensor`: vocab parallel over its mesh.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from vpcce.api import linear_cross_entropy
from vpcce.validation import is_number

__all__ = ["logit_transform", "patch", "unpatch"]

# vpcce options a caller may set (everything else is fixed by transformers' loss contract)
_LOSS_OPTIONS = frozenset(
    {
        "impl",
        "filter_eps",
        "accum_e_fp32",
        "accum_c_fp32",
        "filter_e_grad",
        "filter_c_grad",
        "chunk_bytes",
        "validate",
    }
)
_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap")


def logit_transform(config) -> tuple[float | None, float]:
    """``(softcap, logit_scale)`` that the model's forward applies to the head's output."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = next((getattr(text, k) for k in _SOFTCAP_KEYS if getattr(text, k, None)), None)
    scale = 1.0
    # numbers only: MPT's config takes logit_scale="inv_sqrt_d_model", which its forward ignores
    if is_number(getattr(text, "logit_scale", None)):  # Cohere: logits * logit_scale
        scale *= float(text.logit_scale)
    if is_number(getattr(text, "logits_scaling", None)):  # Granite: logits / logits_scaling
        scale /= float(text.logits_scaling)
    return (None if softcap is None else float(softcap)), scale


def _transformed(state: _State, z: float) -> float:
    """What the config's logit transform makes of a logit ``z``."""
    z *= state.logit_scale
    return z if state.softcap is None else state.softcap * math.tanh(z / state.softcap)


@dataclass
class _Request:
    """One training forward's labels and loss arguments, and what the head made of them."""

    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    ignore_index: int
    num_items_in_batch: torch.Tensor | int | None
    loss: torch.Tensor | None = None  # the head's loss
    output: torch.Tensor | None = None  # the head's [1, 1, 1] stand-in (`_stand_in`)
    logits: torch.Tensor | None = None  # what the forward gave its loss function for logits
    loss_called: bool = False  # the forward called its loss function
    loss_taken: bool = False  # ... and it returned vpcce's loss


class _State:
    """What `patch` installed on one model, and the request of the forward in progress."""

    def __init__(self, model, forward, options: dict, eval_logits: bool):
        self.model = model  # a strong reference: copy.deepcopy(model) then copies the state too
        self.forward = forward  # the forward found on the model (bound)
        self.instance_forward = vars(model).get("forward")  # one set on the instance, if any
        self.options = options
        self.eval_logits = eval_logits
        self.request: _Request | None = None
        self.softcap, self.logit_scale = logit_transform(model.config)
        self.transform_checked = False  # `_check_transform` ran (it reads a value on the host)
        params = list(inspect.signature(forward).parameters)
        self.labels_pos = params.index("labels") if "labels" in params else None

    def labels(self, args, kwargs):
        if "labels" in kwargs:
            return kwargs["labels"]
        pos = self.labels_pos
        return args[pos] if pos is not None and len(args) > pos else None


def _head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output embedding's forward: logits, or during a patched forward the loss."""
    state: _State | None = head.__dict__.get("_vpcce_state")
    request = None if state is None else state.request
    if request is None:
        return type(head).forward(head, hidden)
    if request.output is not None:
        raise RuntimeError(
            "the output embedding was called twice in one forward; vpcce's transformers patch "
            "supports models whose forward calls it once"
        )
    weight = head.weight
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # as nn.Linear would run under autocast
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if head.bias is None else head.bias.to(weight.dtype)
    if request.shift_labels is not None:
        targets, shift = request.shift_labels, 0
    else:
        targets, shift = request.labels, 1
    n = request.num_items_in_batch
    loss = linear_cross_entropy(
        hidden,
        weight,
        targets.to(hidden.device),
        bias,
        shift=shift,
        ignore_index=request.ignore_index,
        reduction="mean" if n is None else "sum",
        softcap=state.softcap,
        logit_scale=state.logit_scale,
        **state.options,
    )
    if n is not None:
        loss = loss / (n.to(loss.device) if torch.is_tensor(n) else n)
    request.loss = loss
    request.output = _stand_in(loss)
    return request.output


# The stand-in's value where the loss is finite: the forward's transform of it shows whether that
# is the one the config names (`_check_transform`), whatever the loss.
_PROBE = 8.0


def _stand_in(loss: torch.Tensor) -> torch.Tensor:
    """The head's output: ``[1, 1, 1]``, `_PROBE` with the loss's gradient (the loss itself where
    it is not finite). A fresh tensor, not a view: FSDP2 hooks the module's output, and views of
    it may be changed in place. No host synchronization."""
    probe = (loss - loss.detach()).reshape(1, 1, 1) + _PROBE
    return torch.where(torch.isfinite(loss), probe, loss.reshape(1, 1, 1))


def _loss_of(request: _Request) -> torch.Tensor:
    """The loss, through the stand-in (its gradient reaches the head's output): a fresh scalar,
    since the caller may add to it in place."""
    through = request.output.sum()
    return torch.where(
        torch.isfinite(request.loss), through - _PROBE + request.loss.detach(), through
    )


class _LossFunction:
    """``model.loss_function``: the head's loss during a patched forward, else the original."""

    def __init__(self, state: _State, original):
        self.state = state
        self.original = original

    def __call__(self, *args, **kwargs):
        state = self.state
        request = state.request
        if request is None:
            return self.original(*args, **kwargs)
        request.loss_called = True
        logits = args[0] if args else kwargs.get("logits")
        if request.output is None:
            raise RuntimeError(
                f"{type(state.model).__name__}.forward called its loss function without calling "
                "its output embedding (get_output_embeddings()); vpcce cannot compute that loss"
            )
        if logits is not request.output and state.softcap is None and state.logit_scale == 1.0:
            raise ValueError(
                f"{type(state.model).__name__}.forward transforms the output embedding's "
                "output before its loss, and its config names no transformation vpcce knows "
                "(final_logit_softcapping, logits_soft_cap, logit_scale, logits_scaling); "
                "vpcce would compute a different loss"
            )
        if not state.transform_checked and not torch.compiler.is_compiling():
            _check_transform(state, request, logits)
        request.logits = logits
        request.loss_taken = True
        return _loss_of(request)


def _check_transform(state: _State, request: _Request, logits) -> None:
    """Once per model: the forward transformed the stand-in as the config says vpcce should.
    Two host reads, once (skipped where the loss is not finite: the stand-in is not the probe)."""
    if not bool(torch.isfinite(request.loss)):
        return
    want = _transformed(state, _PROBE)
    if not torch.is_tensor(logits):
        seen = type(logits).__name__
    elif logits.numel() != 1:
        seen = f"a tensor of shape {tuple(logits.shape)}"
    else:
        seen = float(logits.detach().double())
    if not (isinstance(seen, float) and math.isclose(seen, want, rel_tol=1e-5)):
        raise ValueError(
            f"{type(state.model).__name__}.forward transforms the output embedding's output "
            f"{_PROBE} into {seen} before its loss, but its config says {want} (softcap "
            f"{state.softcap}, logit scale {state.logit_scale}, read from "
            "final_logit_softcapping, logits_soft_cap, logit_scale, logits_scaling); vpcce "
            "would compute a different loss. (A config key the forward ignores can be set to "
            "None.)"
        )
    state.transform_checked = True


def _install_loss_function(model, fn) -> None:
    prop = inspect.getattr_static(type(model), "loss_function", None)
    if isinstance(prop, property) and prop.fset is not None:
        model.loss_function = fn  # transformers >= 4.50: a settable property
        return
    # transformers < 4.50: a read-only property; a subclass (same name) reads the instance's
    model.__class__ = _with_loss_function(type(model))
    model._vpcce_loss_function = fn


@functools.cache
def _with_loss_function(cls):
    return type(
        cls.__name__,
        (cls,),
        {
            "loss_function": property(lambda self: self._vpcce_loss_function),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_vpcce_base": cls,
        },
    )


def _hook_head(model, state: _State) -> nn.Linear:
    """The output embedding, with `_head_forward` installed (again after a resize / replace)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.get_output_embeddings() must be an nn.Linear for vpcce, "
            f"got {type(head).__name__}"
        )
    if head.__dict__.get("_vpcce_state") is not state:
        head._vpcce_state = state
        head.forward = functools.partial(_head_forward, head)
    return head


def _replace_logits(out, request: _Request):
    """The model's output without its logits (a ModelOutput cannot drop a key in place)."""
    if isinstance(out, tuple):  # return_dict=False: (loss, aux_loss?, logits, ...)
        drop = [i for i, x in enumerate(out) if x is request.logits or x is request.output]
        drop = drop[:1] or [1]  # the logits as the loss function got them, else after the loss
        return tuple(x for i, x in enumerate(out) if i not in drop)
    return type(out)(**{k: v for k, v in out.items() if k != "logits"})


def _patched_forward(state: _State, *args, **kwargs):
    model = state.model
    labels = state.labels(args, kwargs)
    if labels is None or (state.eval_logits and not model.training):
        return state.forward(*args, **kwargs)
    if state.request is not None:
        raise RuntimeError(f"{type(model).__name__}.forward re-entered during a vpcce loss")
    _hook_head(model, state)
    state.request = request = _Request(
        labels=labels,
        shift_labels=kwargs.get("shift_labels"),
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
    )
    inline = (
        f"{type(model).__name__}.forward did not compute its loss through self.loss_function; "
        "vpcce's transformers patch needs models that do"
    )
    try:
        out = state.forward(*args, **kwargs)
    except Exception as err:
        # a forward that computes its loss itself fails on the head's [1, 1, 1] stand-in
        if request.output is not None and not request.loss_called:
            raise RuntimeError(f"{inline} (it failed on vpcce's stand-in for the logits)") from err
        raise
    finally:
        state.request = None
    if not request.loss_taken:
        raise RuntimeError(inline)
    return _replace_logits(out, request)


def _patch_instance(model, options: dict, eval_logits: bool):
    existing = getattr(model, "_vpcce_state", None)
    if existing is not None:
        existing.options, existing.eval_logits = options, eval_logits
        return model
    if "_loss_function" in vars(model):
        raise ValueError(
            f"{type(model).__name__} has a custom loss_function; vpcce computes transformers' "
            "causal-LM cross-entropy and would replace it"
        )
    if getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(
            f"{type(model).__name__} has loss_type={model.loss_type!r}; vpcce computes "
            "transformers' causal-LM cross-entropy ('ForCausalLM')"
        )
    state = _State(model, model.forward, options, eval_logits)
    _hook_head(model, state)
    _install_loss_function(model, _LossFunction(state, model.loss_function))
    forward = functools.wraps(state.forward)(functools.partial(_patched_forward, state))
    model._vpcce_state = state
    model.forward = forward
    model._replicate_for_data_parallel = functools.partial(_no_replicas, model)
    return model


def _no_replicas(model):
    """nn.DataParallel's replicas would share the hooks, bound to the original model and head."""
    raise RuntimeError(
        f"a vpcce-patched {type(model).__name__} cannot be replicated by nn.DataParallel (the "
        "replicas would run the original model's hooks); use DistributedDataParallel or FSDP "
        "(torchrun), or unpatch the model"
    )


def _causal_lm_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"no *ForCausalLM class is registered for model_type {model_type!r}")
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _patch_class(cls, options: dict, eval_logits: bool):
    init = cls.__dict__.get("__init__")
    if init is not None and hasattr(init, "_vpcce_patch"):
        init._vpcce_patch.update(options=options, eval_logits=eval_logits)
        return cls
    original = cls.__init__
    settings = {"options": options, "eval_logits": eval_logits}

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "_vpcce_state", None) is None:
            _patch_instance(self, dict(settings["options"]), settings["eval_logits"])

    __init__._vpcce_patch = settings
    cls.__init__ = __init__
    return cls


def patch(model_or_type, *, eval_logits: bool = False, **options):
    """Compute the loss of a ``*ForCausalLM`` with vpcce; returns the model or the patched class.

    Args:
        model_or_type: a model instance (patched now), or its class, its ``model_type``
            (``"llama"``) or a config (models of that class constructed afterwards).
        eval_logits: in eval mode, run the original forward (logits and transformers' loss).
        options: vpcce options (``impl``, ``filter_eps``, ``accum_e_fp32``, ``accum_c_fp32``,
            ``filter_e_grad``, ``filter_c_grad``, ``chunk_bytes``, ``validate``).
    """
    unknown = set(options) - _LOSS_OPTIONS
    if unknown:
        raise TypeError(
            f"unknown vpcce options for transformers {sorted(unknown)}; valid: "
            f"{sorted(_LOSS_OPTIONS)} (reduction, shift, ignore_index, softcap and logit scale "
            "come from the model and the call)"
        )
    if isinstance(model_or_type, nn.Module):
        return _patch_instance(model_or_type, options, eval_logits)
    if isinstance(model_or_type, type) and issubclass(model_or_type, nn.Module):
        return _patch_class(model_or_type, options, eval_logits)
    if isinstance(model_or_type, str):
        return _patch_class(_causal_lm_class(model_or_type), options, eval_logits)
    if hasattr(model_or_type, "model_type"):  # a config
        return _patch_class(_causal_lm_class(model_or_type.model_type), options, eval_logits)
    raise TypeError(
        "patch takes a model, a model class, a model_type string or a config, got "
        f"{type(model_or_type).__name__}"
    )


def unpatch(model_or_class):
    """Undo `patch` on a model instance or a class; returns what it was given."""
    if isinstance(model_or_class, type):
        init = model_or_class.__dict__.get("__init__")
        if init is not None and hasattr(init, "_vpcce_patch"):
            model_or_class.__init__ = init.__wrapped__
        return model_or_class
    model = model_or_class
    state = getattr(model, "_vpcce_state", None)
    if state is None:
        return model
    head = model.get_output_embeddings()
    if head.__dict__.get("_vpcce_state") is state:
        del head.forward, head._vpcce_state
    del model.forward, model._replicate_for_data_parallel
    if state.instance_forward is not None:
        model.forward = state.instance_forward
    if "_vpcce_loss_function" in vars(model):
        model.__class__ = type(model)._vpcce_base
        del model._vpcce_loss_function
    else:
        del model._loss_function
    del model._vpcce_state
    return model
