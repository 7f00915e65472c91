"""What a training objective supplies to the one loop, and the plain diffusion objective.

The loop (training.train) owns everything every objective shares: device placement, bf16
autocast, ``compile``, gradient checkpointing, DDP/FSDP, the optimizer and LR schedule, gradient
clipping, the EMA, metrics, TensorBoard, validation grids, checkpoints and exact resume. An
objective supplies only what differs (DiT's ``main`` + small pieces, not one loop per method):

1. ``check`` / ``open_data``: its inputs, checked at start-up (feature shards, edges, photos);
2. ``prepare``: one-time work on the device, cached in the stage folder (DreamBooth's encodings);
3. ``build``: the trainable module around the base transformer, and any frozen extra model
   (LCM's teacher); the loop's EMA copy is LCM's target network;
4. ``batches``: the stream of batches (feature shards for all but DreamBooth);
5. ``loss``: the scalar loss of one batch, its randomness drawn from the step's generator;
6. ``sample``: the validation sampler (4-step LCM, the control image, the instance prompt);
7. ``files`` / ``load``: what its checkpoint holds beyond ``state.json`` and ``optimizer.pt``.

LoRA is an option of every objective (``[stage] lora``): ``build`` injects adapters into the
transformer, and the checkpoint keeps only adapter files with ``lora_base``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.cli import UserError
from training import checkpoint as ck
from training.data import DataPosition, FeatureBatches, FeatureSet, make_loader, open_features
from training.diffusion import Diffusion, sample_latents
from training.lora import LoraOptions, add_lora, load_lora_state, lora_header, lora_state_dict
from training.model import load_weights, micro_conditions

if TYPE_CHECKING:
    from training.config import RunConfig, StageConfig
    from training.distributed import DistContext

# A function giving a module's full state dict on CPU (gathered from FSDP shards when sharded).
Gather = Callable[[nn.Module], dict[str, torch.Tensor]]


def step_generator(
    seed: int, rank: int, step: int, device: torch.device, stream: int = 0
) -> torch.Generator:
    """The generator of one step on one rank, on the training device: noise, timesteps and every
    other draw of a step come from it, so resuming needs no saved generator state. ``stream``
    gives an independent generator of the same step (e.g. DreamBooth's batch picks)."""
    entropy = [seed, rank, step] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def cast_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch onto the device (text embeddings as float32, the autocast input); the
    loader position ``pos`` stays on the CPU (the loop reads it every step: no device sync)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k != "pos":
            v = v.to(device, non_blocking=True)
            if k == "t5":
                v = v.float()
        out[k] = v
    return out


class Objective:
    """Plain diffusion (PixArt's ε + learned-variance loss); the base of every objective."""

    name = "diffusion"
    init_weights = "model"  # which weights of an init checkpoint the stage starts from

    def __init__(self, cfg: RunConfig, stage: StageConfig, device: torch.device):
        self.cfg, self.stage, self.device = cfg, stage, device
        self.settings = stage.settings
        self.lora = LoraOptions.from_dict(stage.lora) if stage.lora else None
        self.diffusion = Diffusion(cfg.learned_sigma, device)

    # 1. inputs --------------------------------------------------------------------------------
    @classmethod
    def open_data(cls, cfg: RunConfig, stage: StageConfig) -> FeatureSet:
        """The stage's data, checked before any model is built (one-line errors)."""
        return open_features(
            cfg.store, stage.features, resolution=stage.resolution,
            multi_scale=stage.multi_scale, view=stage.view, stage=stage.name,
        )  # fmt: skip

    def prepare(self, fset: FeatureSet, sdir: str, init: str, dist: DistContext) -> FeatureSet:
        """One-time inputs (on the device, cached in ``sdir``; ``init``: the stage's base);
        returns the data description the loop samples validation grids with."""
        return fset

    # 2. model ---------------------------------------------------------------------------------
    def build(self, base: nn.Module) -> nn.Module:
        """The trainable module around ``base`` (init weights loaded): here the transformer
        itself, with LoRA adapters when the stage has ``lora`` (base frozen)."""
        if self.lora is not None:
            add_lora(base, self.lora)  # adapters start at zero (B = 0)
        return base

    def frozen(self) -> list[nn.Module]:
        """Extra frozen models the loss uses (moved to the device by the loop)."""
        return []

    def make_ema(self, model: nn.Module, share_frozen: bool) -> nn.Module:
        """The EMA copy of the trainable module; frozen weights are shared, not copied, unless
        the model will be sharded (FSDP shards each copy itself)."""
        memo: dict[int, Any] = {}
        if share_frozen:
            memo = {id(p): p for p in model.parameters() if not p.requires_grad}
        return copy.deepcopy(model, memo).requires_grad_(False).eval()

    @property
    def ema_decay(self) -> float:
        return self.stage.ema

    @property
    def resume_replaces_base(self) -> bool:
        """Whether a checkpoint holds every weight (so resuming needs no init weights)."""
        return self.lora is None

    # 3. data and loss -------------------------------------------------------------------------
    def batches(
        self, fset: FeatureSet, position: DataPosition | None, start_step: int, dist: DistContext
    ) -> tuple[Iterator[dict[str, Any]], DataPosition | None]:
        """This rank's batches from ``position`` (the checkpoint's) and the live position."""
        dataset = FeatureBatches(
            fset, self.stage.batch_size, seed=self.cfg.seed, rank=dist.rank,
            world_size=dist.world_size, num_workers=self.cfg.num_workers,
            shuffle_buffer=self.stage.shuffle_buffer, caption_dropout=self.stage.caption_dropout,
            position=position,
        )  # fmt: skip
        loader = make_loader(dataset, pin_memory=self.device.type == "cuda")
        return (cast_batch(b, self.device) for b in loader), dataset.position

    def added(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Resolution/aspect micro-conditions of a multi-scale stage: by default PixArt's, the
        source image's (height, width) and the bucket's ratio key; ``micro_conditions =
        "bucket"``: the bucket's pixel size and its h / w."""
        if not self.stage.multi_scale:
            return None
        if self.stage.micro_conditions == "original" and "orig_hw" in batch:
            return micro_conditions(batch["orig_hw"], torch.float32, batch["ratio"])
        return micro_conditions(batch["hw"], torch.float32)

    def per_sample_loss(
        self, net: nn.Module, batch: dict[str, Any], gen: torch.Generator, **extra: Any
    ) -> torch.Tensor:
        """The diffusion loss of each sample (N,): noise x0 at a random t, predict, compare."""
        x0 = batch["latents"]  # (N, C, h, w) scaled posterior sample
        t = self.diffusion.sample_timesteps(x0.shape[0], gen, self.device)  # (N,)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)  # (N, C, h, w)
        x_t = self.diffusion.add_noise(x0, noise, t)
        out = net(
            x_t,
            encoder_hidden_states=batch["t5"],
            encoder_attention_mask=batch["mask"],
            timestep=t,
            added_cond_kwargs=self.added(batch),
            **extra,
        ).sample  # (N, C or 2C, h, w)
        return self.diffusion.loss(out, x0, x_t, t, noise)

    def loss(
        self, net: nn.Module, ema: nn.Module, batch: dict[str, Any], gen: torch.Generator
    ) -> torch.Tensor:
        return self.per_sample_loss(net, batch, gen).mean()

    # 4. validation ----------------------------------------------------------------------------
    def sample(self, ema: nn.Module, v: Any, gen: torch.Generator) -> torch.Tensor:
        """Validation latents (P, C, h, w) of the prompts in ``v`` (training.train.Validation)."""
        return sample_latents(
            ema, v.embeds, v.mask, v.null, v.null_mask, v.latent_hw, self.stage.sample_steps,
            self.stage.guidance_scale, gen, v.micro, v.latent_channels,
        )  # fmt: skip

    # 5. checkpoint ----------------------------------------------------------------------------
    def files(
        self, model: nn.Module, ema: nn.Module, gather: Gather, info: dict[str, Any]
    ) -> ck.Files:
        """The weight files of a checkpoint: full weights, or adapters only for LoRA."""
        if self.lora is not None:
            header = lora_header(self.lora, **info)
            return {
                ck.LORA_MODEL_FILE: (lora_state_dict(model), header),
                ck.LORA_FILE: (lora_state_dict(ema), header),
            }
        return {ck.MODEL_FILE: (gather(model), {}), ck.EMA_FILE: (gather(ema), {})}

    def state(self, init: str) -> dict[str, Any]:
        """What ``state.json`` records about the weights' base (LoRA: the frozen base)."""
        return {"objective": self.name, "lora_base": init if self.lora is not None else None}

    def load(self, model: nn.Module, ema: nn.Module, ckpt: str) -> None:
        """Put a checkpoint's weights (resume) into the built trainable module and its EMA."""
        if self.lora is not None:
            load_lora_state(
                model, ck.load_safetensors(os.path.join(ckpt, ck.LORA_MODEL_FILE)), ckpt
            )
            load_lora_state(ema, ck.load_safetensors(os.path.join(ckpt, ck.LORA_FILE)), ckpt)
            return
        for module, name in ((model, ck.MODEL_FILE), (ema, ck.EMA_FILE)):
            try:
                load_weights(module, ck.load_safetensors(os.path.join(ckpt, name)), ckpt)
            except ValueError as e:  # load_weights' "do not fit": not this stage's checkpoint
                raise UserError(str(e)) from e
