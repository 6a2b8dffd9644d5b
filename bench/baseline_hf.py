"""The baseline: what a user writes instead of Flotilla (transformers Trainer + peft LoRA).

Plain and idiomatic on purpose: the chat template, default dynamic padding (each batch padded to its
longest row by ``DataCollatorForSeq2Seq``), random batches, Trainer defaults for everything else.
The same LoRA settings as Flotilla's defaults (r 8, alpha 16, dropout 0.05, all linear layers).

The one addition is ``--log-jsonl``: a callback that appends each log record with a timestamp, the same
thing Flotilla's metrics.jsonl does, so that bench/compare.py times both sides the same way.

    python bench/baseline_hf.py --model DIR --data rows.jsonl --max-length 1024 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--data", required=True, help="JSONL with prompt/response rows")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default="baseline-out")
    parser.add_argument("--log-jsonl", help="append every log record with a timestamp to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Fine-tune with LoRA the way the transformers and peft docs show."""
    args = parse_args(argv)
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class LogJsonl(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, truncation=True, max_length=args.max_length
        )
        return {"input_ids": encoded["input_ids"], "labels": list(encoded["input_ids"])}

    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        report_to="none",
    )
    log_path = Path(args.log_jsonl) if args.log_jsonl else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[LogJsonl()] if log_path else None,
    )
    trainer.train()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
