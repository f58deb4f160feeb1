"""One training step of a pass of K ≥ 1 runs (``train.fit``), in the phases that ``bench train`` times:

1. batch: each run's rows ([K, B] indices) gathered from the training tensors already on the device
   (``train.data``): no collation, no copy to the device;
2. forward: the stacked heads (``RunStack``);
3. loss: each run's loss step, a pure function (terms, statistics and its moved loss state: the
   state stays on the device, replaced, never read back by the host);
4. backward: one backward pass of the runs' summed losses (runs share no parameter: each gets its
   own loss's gradient);
5. check: whether each run's loss and gradient are finite (a [K] flag on the device);
6. optimiser: each run's gradient clipped to its norm, then one fused AdamW step for all runs.

``compile`` runs phases 1–3 as one ``torch.compile`` graph, their backward included (AOTAutograd):
on the CPU inductor fuses the many small element-wise operations of the head and the loss; on a GPU
``mode="reduce-overhead"`` replays the step's kernels as CUDA graphs, since a head this small at
batch 16 is bound by kernel launches. Compiling costs its time once per pass (see ``bench train``).
"""

from __future__ import annotations

import torch

from raml.train.data import PixelData, TrainingData
from raml.train.run_stack import RunStack, over_runs


def compile_mode(device: torch.device) -> str | None:
    """The ``torch.compile`` mode for a step on ``device``: CUDA graphs on a GPU (launch-bound), inductor's
    default on the CPU (CUDA graphs do not exist there)."""
    return "reduce-overhead" if device.type == "cuda" else None


class PassStep:
    """The step of one pass: ``step(rows, state)`` runs phases 1–5, ``update()`` phase 6.

    ``loss_step`` is one run's loss step (``train.loss.loss_step``, with ``with_pixel_loss`` when
    ``pixels``); ``penalty`` [K, N] each run's resolution penalty of every training image; ``hp``
    the runs' stacked loss scalars.
    """

    def __init__(
        self,
        stack: RunStack,
        loss_step,
        data: TrainingData,
        pixels: PixelData | None,
        penalty: torch.Tensor,
        hp: dict,
        lr: float,
        compile: bool = False,
    ):
        self.stack, self.data, self.pixels, self.penalty, self.hp = stack, data, pixels, penalty, hp
        self.loss_step = over_runs(loss_step, stack.runs)
        self.optimizer = torch.optim.AdamW(stack.param_groups(), lr=lr, fused=True)
        device = penalty.device
        self.cuda_graphs = compile and compile_mode(device) == "reduce-overhead"
        if self.cuda_graphs:  # read in place by every replay: not copied into the graph's own inputs each step
            resident = [data.crops, data.labels, data.category, data.text_bank, penalty, *hp.values()]
            resident += [*vars(pixels).values()] if pixels is not None else []
            for tensor in resident + [leaf for leaves in stack.leaves for leaf in leaves.values()]:
                torch._dynamo.mark_static_address(tensor)
        self.losses = (
            torch.compile(self.forward_loss, mode=compile_mode(device), dynamic=False) if compile else self.forward_loss
        )

    def batch(self, rows: torch.Tensor) -> tuple:
        """The inputs of ``rows`` [K, B]: crops [K, B, 21, D], labels, categories and penalties [K, B];
        with a pixel head also tokens [K, B, P, D] (float32), targets and weights [K, B, P]."""
        data, crops = self.data, self.data.crops
        batch = (
            crops.index_select(0, rows.reshape(-1)).view(*rows.shape, *crops.shape[1:]),
            data.labels[rows],
            data.category[rows],
            self.penalty.gather(1, rows),
        )
        if self.pixels is None:
            return batch
        tokens = self.pixels.tokens
        selected = tokens.index_select(0, rows.reshape(-1)).view(*rows.shape, *tokens.shape[1:]).float()
        return (*batch, selected, self.pixels.targets[rows], self.pixels.weights[rows])

    def forward(self, batch: tuple) -> tuple:
        """The heads' outputs: features and logits [K, B, ...], with a pixel head also the tokens'."""
        crops, _, category, _, *tokens = batch
        return self.stack.forward(crops, self.data.text_bank, category, *tokens[:1])

    def loss(self, outputs: tuple, batch: tuple, state: dict) -> tuple:
        """``(losses [K], stats [K, S], new_state)`` of each run's loss step."""
        _, labels, category, penalty, *pixel_inputs = batch
        pixel = (*outputs[2:], *pixel_inputs[1:]) if pixel_inputs else ()
        return self.loss_step(*outputs[:2], labels, category, penalty, *pixel, state, self.hp)

    def forward_loss(self, rows: torch.Tensor, state: dict) -> tuple:
        """Phases 1–3: what ``compile`` turns into one graph."""
        batch = self.batch(rows)
        return self.loss(self.forward(batch), batch, state)

    def step(self, rows: torch.Tensor, state: dict) -> tuple:
        """Phases 1–5 on ``rows`` [K, B]: ``(finite [K] bool, stats [K, S], new_state)``; the gradients
        wait in the leaves for ``update``."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last replay's outputs have been read
        losses, stats, state = self.losses(rows, state)
        if self.cuda_graphs:  # the next replay overwrites its outputs; the state lives on, so it is copied
            state = {name: value.clone() for name, value in state.items()}
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        return self.finite(losses), stats.detach(), state

    def finite(self, losses: torch.Tensor) -> torch.Tensor:
        """Phase 5: [K] bool, whether each run's loss and gradient are finite (``train.divergence``)."""
        return torch.isfinite(losses.detach()) & self.stack.finite_gradients()

    def update(self) -> None:
        """Phase 6: clip each run's gradient, then one AdamW step for all runs."""
        self.stack.clip_gradients()
        self.optimizer.step()
