"""vpcce as the loss of a Megatron-Core GPTModel, against Megatron's own loss (CPU, gloo, TP = 2).

Each megatron-core version is one spawned group of 2 ranks that runs every case of
tests/megatron_ranks.py: the same fp32 model and inputs go through Megatron's
``vocab_parallel_cross_entropy`` path and through vpcce's (``patch(model)``, the
``output_processor`` hook of megatron-core >= 0.18, or both), with sequence parallelism on and
off, tied and untied output weights, a padded vocabulary, one MTP layer, MuP's output multiplier,
gradient-accumulation fusion into ``main_grad``, eval and ``labels=None`` (logits). Every rank
compares its own per-token loss, logits, parameter gradients (its shards), decoder-output gradient
and MTP logging with Megatron's; the parent holds them to the tolerances below.

Versions: every ``.megatron/<version>/`` directory (``pip install --target``, made by .ci/run)
is tested with that directory first on the ranks' ``sys.path``; without any, an importable
megatron-core is tested; without that, the test is skipped.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from tests_megatron_paths import megatron_installs  # noqa: F401  (see conftest-free import below)
