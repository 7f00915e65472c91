"""The LAION improved aesthetic predictor: an MLP on L2-normalised CLIP image embeddings that
predicts the mean human rating on LAION's 1–10 scale.

The layout matches `christophschuhmann/improved-aesthetic-predictor` exactly (Linear layers with
Dropout between them and no activations), so the user's own copy of
``sac+logos+ava1-l14-linearMSE.pth`` (a plain state_dict with keys ``layers.0.*, layers.2.*,
layers.4.*, layers.6.*, layers.7.*``) loads with ``torch.load(weights_only=True)``. The input width
is read from the file: 768 for ViT-L/14; the tiny test head uses the tiny CLIP's width.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pipeline.errors import UserError

LINEAR_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear layers inside `layers`
HIDDEN = (1024, 128, 64, 16)
EXPECTED_KEYS = {f"layers.{i}.{p}" for i in LINEAR_LAYERS for p in ("weight", "bias")}
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    """768→1024→128→64→16→1 (for ViT-L/14); Dropout is inert at inference but keeps the keys."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, HIDDEN[0]),
            nn.Dropout(0.2),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            nn.Dropout(0.2),
            nn.Linear(HIDDEN[1], HIDDEN[2]),
            nn.Dropout(0.1),
            nn.Linear(HIDDEN[2], HIDDEN[3]),
            nn.Linear(HIDDEN[3], 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised embeddings → (N,) scores."""
        return self.layers(emb).squeeze(-1)


def load_head(path: str, device: str | torch.device = "cpu") -> AestheticHead:
    """Load a head saved as a plain state_dict (the LAION file format); errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--aesthetic {path}: no such file (download {HEAD_FILE} from "
            "christophschuhmann/improved-aesthetic-predictor)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise UserError(
            f"--aesthetic {path}: not a torch state_dict ({type(e).__name__}: {e})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint of the same MLP
    if not isinstance(state, dict) or set(state) != EXPECTED_KEYS:
        got = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"--aesthetic {path}: not the LAION aesthetic MLP (expected keys layers.{{0,2,4,6,7}}."
            f"weight/bias, got {got})"
        )
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"--aesthetic {path}: layer shapes differ from 1024→128→64→16→1 ({e})"
        ) from None
    return head.to(device).eval()


def save_random_head(
    path: str, input_size: int, seed: int = 0, center: float = 5.0, spread: float = 1.0
) -> None:
    """Write a random-weight head in the LAION file format (tests, demo, benchmarks).

    Weights are N(0, 1/fan_in), which keeps a unit input's scale through the linear chain; the last
    layer is scaled by ``spread``·sqrt(input_size) and its bias set to ``center``, so random scores
    spread around mid-scale as real ones do instead of collapsing onto one value.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = AestheticHead(input_size)
        with torch.no_grad():
            for i in LINEAR_LAYERS:
                layer = head.layers[i]
                nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                nn.init.zeros_(layer.bias)
            head.layers[7].weight.mul_(spread * input_size**0.5)
            head.layers[7].bias.fill_(center)
    torch.save(head.state_dict(), path)
