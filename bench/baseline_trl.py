"""The TRL peer: ``SFTTrainer`` padding-free, what a TRL user picks for speed (trl pinned in bench/compare.py).

``SFTConfig(padding_free=True)``: TRL's collator puts the batch's rows back to back in one row with
``position_ids`` and ``cu_seq_lens`` (no padding computed); the rows keep their batch, so every side
of bench/compare.py trains the same batches. (TRL's best-fit-decreasing ``packing=True`` re-bins the
rows into ``max_length`` sequences before sampling: different batches, so not this comparison.)
The rows come pre-tokenized (``input_ids`` and ``labels``), which SFTTrainer takes as they are; the
same LoRA and optimizer settings as bench/baseline_hf.py, gradient checkpointing and bf16 off
(CPU, float32), a sequential sampler.

    python bench/baseline_trl.py --model DIR --tokens rows.jsonl --batch-size 16 --max-steps 22
"""

from __future__ import annotations

import argparse
from pathlib import Path

from baseline_hf import load_model, timestamped_log_callback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--output-dir", default="trl-out")
    parser.add_argument("--log-jsonl", help="append every log record with a timestamp to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Fine-tune with TRL's SFTTrainer, padding-free."""
    args = parse_args(argv)
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, args.full)
    dataset = load_dataset("json", data_files=args.tokens, split="train")
    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        report_to="none",
        train_sampling_strategy="sequential",
        padding_free=True,
        max_length=None,  # the rows are already within bench/compare.py's max_length
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=False,
        disable_tqdm=True,
    )
    log = Path(args.log_jsonl) if args.log_jsonl else None
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timestamped_log_callback(log)] if log else None,
    )
    trainer.train()


if __name__ == "__main__":
    main()
