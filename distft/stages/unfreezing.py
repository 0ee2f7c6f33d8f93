"""Gradual unfreezing (Howard and Ruder, 2018): blocks join training top-down on a schedule.

`method.freeze.trainable_layers` blocks (and the head) train from the start; every
`unfreeze_every` steps (or epochs) the next block below joins. Under DDP the set of parameters
that get gradients must be fixed when the model is wrapped, so every block gets them from the
start (`apply_partial`) and the optimizer holds them all; this callback keeps the blocks not yet
unfrozen still: a gradient hook zeroes their gradients (so gradient clipping and DDP's all-reduce
see zeros), and before each optimizer step their `.grad` is dropped, so AdamW skips them entirely
(no moments, no weight decay). The backward pass still computes their gradients: gradual
unfreezing changes the training dynamics, not the compute.
"""

from __future__ import annotations

from transformers import TrainerCallback

from distft.config.schema import FreezeSettings
from distft.models.methods import transformer_blocks


class GradualUnfreezing(TrainerCallback):
    def __init__(self, settings: FreezeSettings, log=print, label: str = "stage"):
        self.settings, self.log, self.label = settings, log, label
        self.blocks: list = []
        self.trainable = settings.trainable_layers  # blocks training now, counted from the top
        self._hooks = []

    def phase(self, state) -> int:
        done = state.global_step if self.settings.unfreeze_unit == "steps" else int(state.epoch or 0)
        return done // self.settings.unfreeze_every

    def frozen_params(self) -> list:
        still = self.blocks[: max(0, len(self.blocks) - self.trainable)]
        return [p for block in still for p in block.parameters()]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.blocks = transformer_blocks(model)
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                self._hooks.append(p.register_hook(lambda g, i=i: g * 0 if self._frozen(i) else g))
        self._advance(state)

    def _frozen(self, i: int) -> bool:
        return i < len(self.blocks) - self.trainable

    def _advance(self, state) -> None:
        target = min(len(self.blocks), self.settings.trainable_layers + self.phase(state))
        if target != self.trainable or state.global_step == 0:
            self.trainable = target
            self.log(f"[{self.label}] gradual unfreezing: the top {target} of {len(self.blocks)} blocks train "
                     f"(step {state.global_step})")

    def on_step_begin(self, args, state, control, **kwargs):
        self._advance(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.frozen_params():
            p.grad = None

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
