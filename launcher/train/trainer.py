"""The transformers Trainer with atomic, verified checkpoints and perplexity in every evaluation."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
)

from launcher.train.checkpoint import hash_share, rotate_checkpoints, seal_checkpoint
from launcher.train.metrics import perplexity
from launcher.train.target_logits import select_target_positions

BOOKKEEPING_COLUMNS = ("full_length", "length")
#: A term added to the training loss, from the model being trained (FedProx's proximal term).
LossTerm = Callable[[torch.nn.Module], torch.Tensor]


class FlotillaTrainer(Trainer):
    """Checkpoints are staged, sealed with a hash manifest, then published by one rename; extra
    ``loss_terms`` join the training loss (so they go through the optimizer with it);
    ``target_only_logits``: training computes logits only where the loss has a target."""

    def __init__(
        self,
        *args: Any,
        keep_checkpoints: int = 3,
        report_perplexity: bool = True,
        target_only_logits: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.report_perplexity = report_perplexity
        self.target_only_logits = target_only_logits
        self.loss_terms: list[LossTerm] = []
        self._staging_root: str | None = None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.target_only_logits and model.training and "labels" in inputs:
            inputs = select_target_positions(inputs)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.loss_terms or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        extra = sum(term(model) for term in self.loss_terms)
        # Once per optimizer step: the Trainer divides the loss by the accumulation steps itself
        # unless the loss was already normalised over the whole accumulated batch (its own rule).
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        loss = loss + (extra / self.current_gradient_accumulation_steps if scaled else extra)
        return (loss, outputs) if return_outputs else loss

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        root = Path(self.args.output_dir)
        step = self.state.global_step
        staging_root = root / f".staging-{step}"
        name = f"checkpoint-{step}"
        if self.args.should_save and staging_root.exists():
            shutil.rmtree(staging_root)
        self._barrier()
        self._staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self._barrier()
        # Every rank hashes its share of the written files; rank 0 seals from all the shares.
        shares = self.gather(hash_share(staging_root / name, self.args.process_index, self.args.world_size))
        best = self._published_best()
        if self.args.should_save:
            seal_checkpoint(
                staging_root / name, root / name, step, {k: v for h in shares for k, v in h.items()}
            )
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(root, self.keep_checkpoints, also=Path(best) if best else None)
        self._barrier()

    def _published_best(self) -> str | None:
        """The best checkpoint's published path: the Trainer records the staging folder it saved
        into (``.staging-N/checkpoint-N``), which sealing renames to ``checkpoint-N``."""
        best = self.state.best_model_checkpoint
        if best and Path(best).parent.name.startswith(".staging-"):
            best = str(Path(best).parent.parent / Path(best).name)
            self.state.best_model_checkpoint = best
        return best

    def _load_best_model(self) -> None:
        self._published_best()  # also after a resume, whose trainer_state.json holds the staging path
        super()._load_best_model()

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (one process: its own)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [value]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None and self.report_perplexity:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


class BatchCollator:
    """Drops bookkeeping columns, then pads (or flattens, for padding-free packing)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, task: str, packing: bool) -> None:
        if task == "sequence_classification":
            self.inner: Any = DataCollatorWithPadding(tokenizer)
        elif packing:
            # cu_seq_lens_*: the document bounds per-document and flash attention read
            self.inner = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        else:
            self.inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        cleaned = [{k: v for k, v in f.items() if k not in BOOKKEEPING_COLUMNS} for f in features]
        return self.inner(cleaned)
