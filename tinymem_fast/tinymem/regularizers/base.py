"""The extension point of the training loop that regularizers plug into."""

from __future__ import annotations

import torch


class TrainHook:
    """Extension point for regularizers: called around each step. ``row_ids`` are the batch's indices into
    ``data.rows`` (duplicate copies share one), ``copy_ids`` number every copy separately."""

    def begin_step(self, step: int, row_ids: torch.Tensor | None, copy_ids: torch.Tensor | None) -> None:
        return None

    def per_sequence_weights(self, step: int, seq_loss: torch.Tensor) -> torch.Tensor | None:
        return None

    def extra_loss(self, model, step: int) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (saved in each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def close(self) -> None:
        """Detach from the model (module hooks)."""
        return None
