"""Training-demo configuration: flat ``key: value`` pairs in YAML, then ``key=value`` overrides.

Every key is a field of `TrainConfig`; values (in the file and in overrides) are parsed with
``yaml.safe_load``, so ``steps=5``, ``lr=3e-3``, ``chunk_bytes=null`` and
``paths=[vpcce]`` all work. Unknown keys and wrongly typed values raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    name: str = ""  # defaults to the config file's stem
    # what runs where
    model: str = "tiny"  # "tiny" (plain PyTorch, any device) | "megatron_gpt" (Megatron-Core, CUDA)
    backend: str = "gloo"  # torch.distributed backend
    device: str = "cpu"  # "cpu" | "cuda" (one GPU per rank: LOCAL_RANK)
    dtype: str = "float32"  # parameters and activations: float32 | bfloat16
    paths: list = field(default_factory=lambda: ["vpcce", "materialized"])
    # model
    vocab_size: int = 32768
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    # data: a generated class-Markov language (vpcce.launch.corpus)
    seq_len: int = 64
    batch_size: int = 16
    num_classes: int = 64
    branching: int = 4
    zipf_exponent: float = 1.1
    corpus_seed: int = 0
    # optimization (AdamW, linear warmup then cosine decay to min_lr_ratio * lr)
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clipping (0: off); Megatron's default
    seed: int = 0
    # vpcce options
    impl: str = "auto"
    chunk_bytes: int | None = None  # impl="torch" tile budget (None: the library default)
    # output
    log_every: int = 25
    memory_every: int = 50  # CPU: steps between memory measurements (CUDA measures every step)
    out_dir: str | None = None  # default: out/train/<name>

    def __post_init__(self):
        if self.model not in ("tiny", "megatron_gpt"):
            raise ValueError(f"model must be 'tiny' or 'megatron_gpt', got {self.model!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        unknown = set(self.paths) - {"vpcce", "materialized"}
        if not self.paths or unknown or len(set(self.paths)) != len(self.paths):
            raise ValueError(
                f"paths must be distinct names from ['vpcce', 'materialized'], got {self.paths}"
            )
        for key in (
            "steps",
            "batch_size",
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "log_every",
            "memory_every",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.model == "megatron_gpt" and self.device != "cuda":
            raise ValueError(
                "model='megatron_gpt' needs device='cuda' (Megatron allocates on CUDA)"
            )
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (next-token pairs), got {self.seq_len}")

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("out") / "train" / self.name


def _coerce(key: str, value, kind):
    """``value`` as ``kind`` (int, float, str, list, or Optional of one), else ValueError."""
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"{key} must be {kind.__name__}{' or null' if optional else ''}, got {value!r}"
        )
    return value


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` from the command line; the value is parsed as YAML (``n=[1,2]`` is a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"overrides are key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw)


def read_config(path: str | Path | None, overrides=(), fields=()) -> dict:
    """A YAML mapping (``name`` defaults to the file's stem) updated by ``key=value`` overrides.

    Shared by the launchers; keys outside ``fields`` (a dataclass's field names) are an error.
    """
    raw = {}
    if path is not None:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
        raw.setdefault("name", path.stem)
    raw.update(parse_override(o) for o in overrides)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {list(fields)}")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """`TrainConfig` from a YAML file, then ``key=value`` overrides in order."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    raw = read_config(path, overrides, names)
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in raw.items()})
