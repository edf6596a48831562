"""The exponential moving average of the student's weights (training.ema_decay), as Self-Forcing keeps one.

The EMA is an fp32 copy of each rank's own parameter shards (FSDP2 DTensors, so DCP checkpoints and reshards it
like the model), updated on the device after every optimizer step by one fused lerp: no host sync.
"""

import contextlib

import torch


def local(tensor):
    """This rank's shard of a DTensor (an alias: in-place ops on it change the DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class EMA:
    """ema <- decay * ema + (1 - decay) * weights after each optimizer step past `start_step`; up to and
    including it, the EMA is the weights themselves (Self-Forcing starts its EMA from the weights at its
    ema_start_step)."""

    def __init__(self, model, decay, start_step):
        self.decay, self.start_step = decay, start_step
        with torch.no_grad():
            self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    def state_dict(self):
        """{parameter name: fp32 EMA tensor}, the shards themselves: DCP saves and loads them in place."""
        return self.shadow

    @torch.no_grad()
    def update(self, model, step):
        """Fold in the weights after optimizer step `step` (counted from 1)."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay  # lerp by 1.0 is an exact copy
        torch._foreach_lerp_([local(e) for e in self.shadow.values()],
                             [local(p.detach()) for p in model.parameters()], weight)

    @contextlib.contextmanager
    def weights_in(self, model):
        """`model` holding the EMA weights inside the block, its own weights again after it.

        The two are exchanged in place, tensor by tensor: one tensor of extra memory, not a model's worth.
        """
        reshard = getattr(model, "reshard", lambda: None)  # an eval forward may leave FSDP2's root unsharded
        reshard()
        self._exchange(model)
        try:
            yield model
        finally:
            reshard()
            self._exchange(model)

    @torch.no_grad()
    def _exchange(self, model):
        for e, p in zip(self.shadow.values(), model.parameters()):
            e, p = local(e), local(p.detach())
            held = p.clone()
            p.copy_(e)
            e.copy_(held)
