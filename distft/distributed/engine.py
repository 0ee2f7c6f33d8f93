"""One optimised model for loops that are not a HF Trainer (PPO): DDP or a DeepSpeed engine, same calls.

`TrainEngine.backward(loss)` then `.step()` once per micro-batch, DeepSpeed-style: the
loss is scaled by 1 / accumulation, and the optimizer (clipping, scheduler) runs at the
accumulation boundary. `prepare_frozen(...)` prepares a model that never trains (PPO's
reference and reward models): under ZeRO-3 it is partitioned too, otherwise each rank
holds it as is. The DeepSpeed dict comes from the same `build_deepspeed_config` as the
Trainer stages, so a PPO run shards exactly like an SFT run with the same section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distft.config.schema import StrategyConfig, TrainConfig
from distft.distributed.deepspeed import build_deepspeed_config


@dataclass
class TrainEngine:
    module: object  # the bare model: generate, save, no-grad forwards
    model: object  # what training forwards go through: DDP wrapper, DeepSpeed engine, or the module
    optimizer: object
    scheduler: object
    accum: int
    max_grad_norm: float
    is_deepspeed: bool
    micro_steps: int = 0

    def backward(self, loss) -> None:
        if self.is_deepspeed:
            self.model.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        else:
            (loss / self.accum).backward()

    def step(self) -> bool:
        """After each micro-batch; True when the optimizer stepped (an accumulation boundary)."""
        self.micro_steps += 1
        if self.is_deepspeed:
            boundary = self.model.is_gradient_accumulation_boundary()
            self.model.step()
            return boundary
        if self.micro_steps % self.accum:
            return False
        import torch

        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                           self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---- checkpoints: every rank calls save/load (DeepSpeed writes per-rank shards)

    def save(self, out_dir: Path, is_main: bool) -> None:
        import torch
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_deepspeed:
            self.model.save_checkpoint(str(out_dir), tag="engine")
            return
        if is_main:  # DDP: every rank holds the same state
            trainable = {n: p.detach().contiguous().clone() for n, p in self.module.named_parameters()
                         if p.requires_grad}
            save_file(trainable, str(out_dir / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "micro_steps": self.micro_steps}, out_dir / "optimizer.pt")

    def load(self, in_dir: Path) -> None:
        import torch
        from safetensors.torch import load_file

        if self.is_deepspeed:
            path, _ = self.model.load_checkpoint(str(in_dir), tag="engine")
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {in_dir}")
            return
        state = load_file(str(in_dir / "trainable.safetensors"))
        params = dict(self.module.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"checkpoint {in_dir} holds parameters this model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        # weights_only: optimizer and scheduler states are tensors and plain containers.
        opt = torch.load(in_dir / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.micro_steps = opt["micro_steps"]



def hidden_of(model) -> int | None:
    """The hidden size DeepSpeed's buffers are sized from (see build_deepspeed_config), or None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def frozen_deepspeed_config(strategy: StrategyConfig, train: TrainConfig, precision: str, world_size: int,
                            hidden: int | None = None) -> dict:
    """ZeRO-3 inference: parameters partitioned, no optimizer (DeepSpeed-Chat / OpenRLHF's eval config)."""
    config = build_deepspeed_config(strategy, train, precision, world_size, hidden)
    zero = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    config["zero_optimization"] = zero
    return config


def build_engine(model, strategy: StrategyConfig, train: TrainConfig, lr: float, precision: str, world_size: int,
                 total_optimizer_steps: int, use_gpu: bool) -> TrainEngine:
    """AdamW + the configured schedule over the trainable parameters, wrapped for the strategy."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if strategy.name == "deepspeed" and strategy.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=lr, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    warmup = int(train.warmup_ratio * total_optimizer_steps)
    scheduler = get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=max(total_optimizer_steps, 1))
    accum = train.grad_accum(world_size)
    if strategy.name == "deepspeed":
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=build_deepspeed_config(strategy, train, precision, world_size, hidden_of(model)),
        )
        return TrainEngine(engine.module, engine, optimizer, scheduler, accum, train.max_grad_norm, True)
    wrapped = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if use_gpu else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    return TrainEngine(model, wrapped, optimizer, scheduler, accum, train.max_grad_norm, False)


def prepare_frozen(model, strategy: StrategyConfig, train: TrainConfig, precision: str, world_size: int):
    """A model that only runs no-grad forwards: a ZeRO-3 inference engine's module, else `model`."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if strategy.name == "deepspeed" and strategy.zero_stage == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model,
                                          config=frozen_deepspeed_config(strategy, train, precision, world_size,
                                                                        hidden_of(model)))
        engine.eval()
        return engine.module
    return model
