"""The training demo's Megatron-Core job: a GPTModel, tensor-parallel over all the ranks.

Imported only for ``model: megatron_gpt`` (the CPU demo never imports Megatron). Both loss paths
train the same GPTModel from the same seed on the same batches; they differ only in how the loss
is computed from the decoder output:

- ``materialized``: GPTModel's own ``compute_language_model_loss`` (``[s, b, V/tp]`` logits from
  the ``ColumnParallelLinear`` output layer, then Megatron's ``vocab_parallel_cross_entropy``);
- ``vpcce``: `vpcce.integrations.megatron` — ``GPTModel.forward(..., output_processor=...)``
  where the hook exists (megatron-core >= 0.18), ``patch(model)`` otherwise.

As Megatron-LM runs it (CUDA only): bf16 modules (``Float16Module``), ``DistributedDataParallel``
with fp32 ``main_grad`` buffers and Megatron's mixed-precision Adam (fp32 master weights, gradient
clipping at 1.0).
"""

from __future__ import annotations

import inspect

import torch

from vpcce.launch.config import TrainConfig
from vpcce.launch.memory import MemoryMeter

_REQUIREMENT = "megatron-core >= 0.16 (pip install -e '.[megatron]')"


def _import_megatron():
    try:
        import megatron.core  # noqa: F401
        from megatron.core import parallel_state
    except ImportError as exc:
        raise SystemExit(f"model: megatron_gpt needs {_REQUIREMENT}; import failed: {exc}") from exc
    return parallel_state


def vpcce_loss_hook(model, forward_accepts_processor: bool, **options) -> dict:
    """The adapter to `vpcce.integrations.megatron`: extra ``forward`` kwargs that route the
    model's loss through vpcce (``patch`` changes ``model`` in place when there is no hook)."""
    from vpcce.integrations import megatron as integration

    if forward_accepts_processor:
        return {"output_processor": integration.OutputProcessor(**options)}
    integration.patch(model, **options)
    return {}


class MegatronGPTJob:
    def __init__(self, cfg: TrainConfig, path: str, device: torch.device):
        parallel_state = _import_megatron()
        from megatron.core import tensor_parallel
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

        world = torch.distributed.get_world_size()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        if cfg.vocab_size % world:
            raise ValueError(
                f"vocab_size {cfg.vocab_size} must be divisible by the {world} ranks "
                "(Megatron pads it to a multiple of 128 * tp)"
            )
        if device.type != "cuda":
            raise ValueError("model: megatron_gpt needs device: cuda (Megatron allocates on CUDA)")
        dtype = cfg.torch_dtype

        # 1. the same initial weights for every path: reseed both RNGs before building
        torch.manual_seed(cfg.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
        config = TransformerConfig(
            num_layers=cfg.n_layers,
            hidden_size=cfg.d_model,
            num_attention_heads=cfg.n_heads,
            ffn_hidden_size=4 * cfg.d_model,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=world,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            pipeline_dtype=dtype,
            use_cpu_initialization=False,
            gradient_accumulation_fusion=False,
        )
        model = GPTModel(
            config,
            get_gpt_layer_local_spec(),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_len - 1,
            share_embeddings_and_output_weights=False,
        ).to(device)

        # 2. the loss path
        self.forward_kwargs = {}
        if path == "vpcce":
            accepts = "output_processor" in inspect.signature(GPTModel.forward).parameters
            options = {"impl": cfg.impl}
            if cfg.chunk_bytes is not None:
                options["chunk_bytes"] = cfg.chunk_bytes
            self.forward_kwargs = vpcce_loss_hook(model, accepts, **options)

        # 3. Megatron-LM's training setup
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        wrapped = model
        if dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            wrapped = Float16Module(config, model)
        self.model = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=wrapped
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=0.9,
                adam_beta2=0.95,
                clip_grad=cfg.grad_clip,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=False,
            ),
            [self.model],
        )
        s = cfg.seq_len - 1
        self.position_ids = torch.arange(s, device=device)[None].expand(cfg.batch_size, s)
        self.causal = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(1)

    def replicated_parameters(self):
        return None  # tensor parallel: the body is sharded too, Megatron keeps it consistent

    def train_step(self, tokens: torch.Tensor, meter: MemoryMeter, lr: float) -> torch.Tensor:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with meter:
            per_token = self.model(
                inputs, self.position_ids, self.causal, labels=labels, **self.forward_kwargs
            )  # [b, s] fp32
            loss = per_token.mean()
            loss.backward()
        self.model.finish_grad_sync()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return loss.detach()
