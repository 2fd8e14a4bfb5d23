"""The end of a run: the model folder, its training summary and loss curve, then
`oner.model_folder.complete_folder` (evaluation and the model card) and `oner.hub.publish`, the same
calls `oner-push` makes on a folder, so a folder published by hand gets the same card and the same
upload as one published by `train.py --push_to_hub`.
"""

from __future__ import annotations

import json
from pathlib import Path

from modeling_oner import OneRModel
from oner.baseline import CLIPAsOneR, save_clip_folder
from oner.hub import publish
from oner.model_folder import SUMMARY_FILE, complete_folder, save_model_folder

from .tracking import PLOT_NAME, plot_loss_curve


def save_trained_folder(model: OneRModel | CLIPAsOneR, processor, output_dir: Path) -> Path:
    """The folder users load: OneR with its remote code, or the baseline as a plain CLIPModel."""
    if isinstance(model, CLIPAsOneR):
        return save_clip_folder(model, processor, output_dir)
    return save_model_folder(model, processor, output_dir)


def training_summary(run, model, records: list[dict], data_stats: dict) -> dict:
    """What ran, for `training_summary.json` and the model card (unset entries left out)."""
    args, state, objective = run.args, run.state, run.objective.config
    streamed = run.data.streamed
    terms = objective.weights
    summary = {
        "architecture": args.architecture,
        "preset": run.source.preset,
        # --model_name_or_path: what this run continued from; a Hub id is also the card's base_model.
        "continued_from": run.source.continued_from,
        "base_model": run.source.base_model,
        "objective": args.objective,
        "xmc_form": objective.xmc_form if "xmc" in terms else None,
        "cmc_context": objective.cmc_context if "cmc" in terms else None,
        "cmc_fraction": objective.cmc_fraction if "cmc" in terms else None,
        "cmc_target": objective.cmc_target if "cmc" in terms else None,
        "joint_negatives": objective.joint_negatives if "cmc" in terms else None,
        "joint_margin": objective.joint_margin if "cmc" in terms else None,
        "quad_pooling": objective.quad_pooling if "quad" in terms else None,
        "temperature": objective.temperature,
        "pooling": getattr(model.config, "pooling", None),
        "pairwise_loss": objective.pairwise,
        "train_data": args.train_data,
        "pairs": None if streamed else len(run.data.dataset),
        "streamed": streamed or None,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_minutes": round(state.train_seconds / 60, 2),
        "global_batch_size": run.global_batch,
        "per_device_batch_size": args.per_device_batch_size,
        "accum_freq": args.accum_freq,
        "learning_rate": args.learning_rate,
        "mixed_precision": run.compute.mixed_precision,
        "attn_implementation": run.compute.attn_implementation,
        "seed": args.seed,
        "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),  # not an evaluation's line
        "data_stats": data_stats,
    }
    return {k: v for k, v in summary.items() if v is not None}


def finish_run(run, model, data_stats: dict) -> int:
    """Main process only, after training: save `model` (the trained weights, gathered), summarise,
    evaluate, write the card, push."""
    args, output_dir = run.args, run.output_dir
    save_trained_folder(model.float().eval(), run.processor, output_dir)
    records = run.log.read()
    plot = plot_loss_curve(records, output_dir / PLOT_NAME, f"{args.architecture} {run.source.preset}: {args.objective}")
    training = training_summary(run, model, records, data_stats)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(training, indent=2) + "\n")
    print(run.data.dataset.stats.summary(data_stats))
    print(f"trained {run.state.step} steps in {training['train_minutes']} min; final loss {training.get('final_loss')}")
    if plot:
        print(f"loss curve: {plot}")

    complete_folder(output_dir, training, evaluate=args.do_eval, max_items=args.eval_max_items)
    if args.push_to_hub:
        publish(output_dir, args.hub_model_id, private=args.hub_private)
    print(f"\nmodel folder: {output_dir.resolve()}")
    print(f"open the demo on it:  python space/app.py --model {output_dir}")
    return 0
