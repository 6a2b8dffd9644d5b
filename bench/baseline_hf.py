"""The plain Hugging Face peer: what a user writes instead of Flotilla (transformers Trainer + peft).

Two setups a Hugging Face user picks from:

- ``--collator padding``: the default, ``DataCollatorForSeq2Seq`` pads each batch to its longest row;
- ``--collator flatten``: ``DataCollatorWithFlattening``, the documented padding-free setup: the batch's
  rows back to back in one row, ``position_ids`` restarting at each row (transformers builds the
  block-diagonal mask from them).

The rows come pre-tokenized (``input_ids`` and ``labels``, prompt positions -100) from
bench/compare.py, in the order every side trains them: the Trainer reads them with a sequential
sampler, so every side sees the same batches. LoRA r 8, alpha 16, dropout 0.05 on all linear layers
(Flotilla's defaults), or ``--full`` for a full fine-tune. ``--log-jsonl`` appends each log record
with a timestamp, as Flotilla's metrics.jsonl does, so both sides are timed the same way.

    python bench/baseline_hf.py --model DIR --tokens rows.jsonl --batch-size 16 --max-steps 22
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def peer_arguments(description: str) -> argparse.ArgumentParser:
    """The options every peer of bench/compare.py takes (this script and bench/baseline_trl.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument(
        "--tokens", required=True, help="JSONL rows of input_ids and labels, in training order"
    )
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default="peer-out")
    parser.add_argument("--log-jsonl", help="append every log record with a timestamp to this file")
    return parser


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer's arguments every peer shares: one log record per step, no saves, a sequential sampler."""
    return {
        "output_dir": args.output_dir,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "max_steps": args.max_steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": args.seed,
        "report_to": "none",
        "train_sampling_strategy": "sequential",
        "gradient_checkpointing": args.gradient_checkpointing,
        "disable_tqdm": True,
    }


def log_callbacks(args: argparse.Namespace) -> list[Any] | None:
    """With ``--log-jsonl``: a TrainerCallback appending every log record, with ``step`` and ``time``."""
    if not args.log_jsonl:
        return None
    path = Path(args.log_jsonl)
    from transformers import TrainerCallback

    class LogJsonl(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")

    return [LogJsonl()]


def load_model(model_dir: str, full: bool) -> Any:
    """The causal LM, with the LoRA adapter unless ``full``; no KV cache (training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    if full:
        return model
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def main(argv: list[str] | None = None) -> None:
    """Fine-tune the way the transformers and peft docs show."""
    parser = peer_arguments(__doc__.splitlines()[0])
    parser.add_argument("--collator", choices=["padding", "flatten"], default="padding")
    args = parser.parse_args(argv)
    from datasets import load_dataset
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, args.full)
    dataset = load_dataset("json", data_files=args.tokens, split="train")
    collator: Any = (
        DataCollatorWithFlattening()
        if args.collator == "flatten"
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_options(args)),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=log_callbacks(args),
    )
    trainer.train()


if __name__ == "__main__":
    main()
