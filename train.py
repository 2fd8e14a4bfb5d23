#!/usr/bin/env python
"""Pretrain OneR (Jang et al., AAAI 2023) with Accelerate.

    accelerate launch train.py                      # the embedded default: tiny preset, Twemoji pairs, ~10 min on 2 CPU cores
    python train.py --config configs/base-patch16-224-cc3m.yaml   # the paper's setup (launch it on GPUs)
    python train.py --help                          # every flag (docs/training.md explains them)

The recipe, step by step (`oner.training.setup` builds the run, `oner.training.loop` trains it,
`oner.training.finish` ends it):

1. flags and `--config` -> `parse_args`; every input is validated before anything is written;
2. model: `OneRModel` of `--preset` (or transformers' `CLIPModel` behind `oner.baseline.CLIPAsOneR`,
   `--architecture clip`) wrapped in `oner.training.pretrainer.OneRPretrainer`, which adds only
   the training-side MLM head (the sigmoid loss's bias is the model's own `logit_bias`, saved with it);
3. data: `oner.data.load_image_text_dataset(--train_data)` with per-sample seeded augmentation and
   the damage-counting collator;
4. objective: `oner.objectives` (ITC, XMC, CIC, CMC, MLM; softmax or sigmoid; optional EMA target),
   negatives gathered across processes with gradient (`oner.losses`);
5. loop: AdamW, warmup + cosine, feature-cached accumulation, NaN/inf guard, logit scale clamped to
   [0, ln 100], checkpoints every `--checkpointing_steps` (the same command again resumes from the
   latest), optional evaluation during training (`--eval_steps`);
6. end: the model folder (model, processor, remote code), loss curve, training log, evaluation
   (`oner.evaluation.run_benchmark`), model card, optional push to the Hub.
"""

import sys

from oner.training import main

if __name__ == "__main__":
    sys.exit(main())
