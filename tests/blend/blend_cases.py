"""Short real passages and helpers shared by the blend tests."""

from __future__ import annotations

import torch

PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 as the entrance arch "
    "for the World's Fair. It was designed by the engineering company of Gustave Eiffel.",
    "Mount Fuji is the highest mountain in Japan, about 3,776 metres tall. It is an active stratovolcano "
    "that last erupted in 1707 and is one of Japan's three holy mountains.",
    "The Great Wall of China is a series of fortifications built across the historical northern borders "
    "of ancient Chinese states to protect against nomadic groups from the Eurasian Steppe.",
]
QUESTION = "When was the Eiffel Tower completed, and who designed it?"
LOGIT_ATOL = 1e-3


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two next-token distributions given as logits."""
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())
