"""From jsonl records to batches: reading records, tokenizers and chat templates, MiniMind's examples
and masks, the packing pipeline, the demo corpus."""
