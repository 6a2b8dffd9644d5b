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

from baseline_hf import load_model, log_callbacks, peer_arguments, training_options


def main(argv: list[str] | None = None) -> None:
    """Fine-tune with TRL's SFTTrainer, padding-free."""
    args = peer_arguments(__doc__.splitlines()[0]).parse_args(argv)
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, args.full)
    dataset = load_dataset("json", data_files=args.tokens, split="train")
    config = SFTConfig(
        **training_options(args),
        padding_free=True,
        max_length=None,  # the rows are already within bench/compare.py's max_length
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=log_callbacks(args),
    )
    trainer.train()


if __name__ == "__main__":
    main()
