"""Built-in synthetic workloads: token batches of mixed difficulty, made on the fly."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SyntheticBatch(NamedTuple):
    """A batch of hidden states with the difficulty each token was drawn with.

    Attributes:
        hidden_states: float32[batch, seq, D].
        difficulty: float32[batch, seq] in [0, 1]: 0 is a token near a cluster centre,
            1 a token of pure noise at a larger scale.
    """

    hidden_states: torch.Tensor
    difficulty: torch.Tensor


def mixed_difficulty_batch(
    batch: int,
    seq: int,
    hidden_size: int,
    *,
    num_clusters: int = 8,
    generator: torch.Generator | None = None,
) -> SyntheticBatch:
    """Draws tokens that interpolate between easy (clustered) and hard (isotropic noise).

    Each token picks a cluster centre and a difficulty d ~ Beta(0.7, 0.7) (many easy and
    many hard tokens, fewer in between) and is ``(1 - d) * centre + d * 2 * noise``.

    Args:
        batch: number of sequences.
        seq: tokens per sequence.
        hidden_size: D.
        num_clusters: number of cluster centres of easy tokens.
        generator: random generator (a fixed seed gives a fixed batch).

    Returns:
        A SyntheticBatch on the CPU; move it with ``.to(device)``.
    """
    for name, value in (("batch", batch), ("seq", seq), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {name}={value!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    centres = torch.randn(num_clusters, hidden_size, generator=gen)
    assignment = torch.randint(num_clusters, (batch, seq), generator=gen)
    difficulty = _beta(batch, seq, gen)
    noise = torch.randn(batch, seq, hidden_size, generator=gen)
    d = difficulty.unsqueeze(-1)
    hidden = (1 - d) * centres[assignment] + d * 2.0 * noise  # [batch, seq, D]
    return SyntheticBatch(hidden, difficulty)


def _beta(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Beta(0.7, 0.7) samples drawn from ``gen`` (torch.distributions takes no generator)."""
    # Johnk's method: x = u1^(1/a), y = u2^(1/b), accept when x + y <= 1, return x / (x + y).
    out = torch.empty(batch * seq)
    filled = 0
    while filled < out.numel():
        u = torch.rand(2, out.numel(), generator=gen)
        x, y = u[0] ** (1 / 0.7), u[1] ** (1 / 0.7)
        ok = (x + y) <= 1
        accepted = (x / (x + y))[ok]
        take = min(accepted.numel(), out.numel() - filled)
        out[filled : filled + take] = accepted[:take]
        filled += take
    return out.reshape(batch, seq)
