"""The training demo's generated "language": a class-based Markov chain over a Zipfian vocabulary.

Nothing is downloaded. The vocabulary ``[0, V)`` is split into ``K`` classes of near-equal size by
a seeded permutation (so every class has members in every rank's vocabulary shard). A hidden
class sequence follows a sparse Markov chain (each class moves to ``branching`` successor classes,
plus a little uniform mixing so the chain is ergodic); each position emits a member of its class,
Zipf-distributed within the class. Because the classes are disjoint, the previous token reveals
the previous class, and the source's entropy rate and its unigram entropy have closed forms:

    H(unigram)    = H(pi) + H(zipf)                      pi: stationary distribution of the classes
    entropy rate  = sum_k pi_k H(T_k) + H(zipf)          T_k: successor distribution of class k

A model that only learns token frequencies stops at the unigram entropy; one that learns which
class follows which goes below it, towards the entropy rate (the best any model can do).
"""

from __future__ import annotations

import numpy as np
import torch


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class MarkovCorpus:
    """Seeded class-Markov language over ``vocab_size`` tokens; `batch` draws identical batches
    for identical ``(seed, step)`` on every rank and every run."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 64,
        branching: int = 4,
        zipf_exponent: float = 1.1,
        mixing: float = 0.02,
        seed: int = 0,
    ):
        if not 1 <= num_classes <= vocab_size:
            raise ValueError(
                f"num_classes must be in [1, vocab_size={vocab_size}], got {num_classes}"
            )
        if not 1 <= branching <= num_classes:
            raise ValueError(
                f"branching must be in [1, num_classes={num_classes}], got {branching}"
            )
        if not 0.0 <= mixing <= 1.0:
            raise ValueError(f"mixing must be in [0, 1], got {mixing}")
        rng = np.random.default_rng(seed)
        self.vocab_size, self.num_classes = vocab_size, num_classes
        # class k owns members[k, :sizes[k]], its Zipf rank order; padding entries are never drawn
        sizes = np.full(num_classes, vocab_size // num_classes)
        sizes[: vocab_size % num_classes] += 1
        perm = rng.permutation(vocab_size)
        self.sizes = sizes
        self.members = np.zeros((num_classes, sizes.max()), dtype=np.int64)
        self.emission_cdf = np.ones((num_classes, sizes.max()))
        self.emission_entropy = np.zeros(num_classes)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for k in range(num_classes):
            self.members[k, : sizes[k]] = perm[offsets[k] : offsets[k + 1]]
            weights = np.arange(1, sizes[k] + 1, dtype=np.float64) ** -zipf_exponent
            weights /= weights.sum()
            self.emission_cdf[k, : sizes[k]] = np.cumsum(weights)
            self.emission_entropy[k] = _entropy(weights)
        # sparse successor distributions with random (Dirichlet) weights, then uniform mixing
        transition = np.zeros((num_classes, num_classes))
        for k in range(num_classes):
            successors = rng.choice(num_classes, size=branching, replace=False)
            transition[k, successors] = rng.dirichlet(np.ones(branching))
        self.transition = (1.0 - mixing) * transition + mixing / num_classes
        self.transition_cdf = np.cumsum(self.transition, axis=1)
        pi = np.full(num_classes, 1.0 / num_classes)
        for _ in range(10_000):  # power iteration; the mixing makes the chain ergodic
            nxt = pi @ self.transition
            if np.abs(nxt - pi).max() < 1e-13:
                break
            pi = nxt
        self.stationary = nxt / nxt.sum()
        self.stationary_cdf = np.cumsum(self.stationary)
        self.seed = seed

    @property
    def unigram_entropy(self) -> float:
        """Nats per token of the best context-free predictor."""
        return _entropy(self.stationary) + float(self.stationary @ self.emission_entropy)

    @property
    def entropy_rate(self) -> float:
        """Nats per token of the best possible predictor (the chain's conditional entropy)."""
        h_next = np.array([_entropy(row) for row in self.transition])
        return float(self.stationary @ h_next + self.stationary @ self.emission_entropy)

    @staticmethod
    def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Row-wise inverse-CDF sampling: index of the first ``cdf[i, j] > u[i]``."""
        return np.minimum((cdf <= u[:, None]).sum(axis=1), cdf.shape[1] - 1)

    def batch(self, batch_size: int, seq_len: int, step: int, seed: int = 0) -> torch.Tensor:
        """``[batch_size, seq_len]`` int64 tokens: independent chains started from ``pi``."""
        rng = np.random.default_rng((self.seed, seed, step))
        states = np.empty((batch_size, seq_len), dtype=np.int64)
        states[:, 0] = np.searchsorted(self.stationary_cdf, rng.random(batch_size), side="right")
        states[:, 0] = np.minimum(states[:, 0], self.num_classes - 1)
        for t in range(1, seq_len):
            states[:, t] = self._draw(self.transition_cdf[states[:, t - 1]], rng.random(batch_size))
        u = rng.random(states.shape)
        tokens = np.empty_like(states)
        for k in np.unique(states):  # per class: one shared CDF, so no [tokens, class size] array
            at = states == k
            ranks = np.searchsorted(self.emission_cdf[k], u[at], side="right")
            tokens[at] = self.members[k, np.minimum(ranks, self.sizes[k] - 1)]
        return torch.from_numpy(tokens)
