"""`python -m fer_model.train`: train one configuration, print the study's epoch lines, evaluate on test.

    python -m fer_model.train --preset seed-best --data ../shared/data/fer2013/fer2013-msambare.tar.gz

Writes ``checkpoint.pt`` after every epoch (``--resume`` continues from it), then the test
evaluation (metrics.json, classification report, confusion matrix, ROC and learning curves).
"""

from __future__ import annotations

import sys
from typing import Sequence

from fer_model.cli import Parser, add_train_flags, given, run_cli
from fer_model.config import DEFAULT_CACHE_MAX, TrainConfig
from fer_model.presets import PRESETS, STUDY_TEST_ACC

FLAG_HELP = {
    "optimizer": "adam, adamw, sgd (momentum 0.9, Nesterov) or rmsprop",
    "schedule": "none, step (StepLR 7 epochs x0.1, the study's), cosine, onecycle, or plateau "
                "(lr x0.5 after 2 epochs without a higher validation accuracy)",
    "warmup": "epochs of linear lr warm-up, per step from 1/steps to 1, times the schedule (0 = off)",
    "label_smoothing": "cross-entropy label smoothing",
    "flip": "random horizontal flips (on the device, per batch)",
    "translate": "random shifts of up to N pixels, zero padded",
    "rotate": "random rotation by up to +-N degrees (on the device, per batch)",
    "scale": "random zoom by a factor in [1-F, 1+F]",
    "erase": "probability of zeroing one random rectangle per image",
    "ema": "decay of an exponential moving average of the weights, validated beside them each epoch; the better "
           "of the two is kept (0 = off)",
    "width": "channel width multiplier (cnn-bn, vgg, resnet)",
    "depth": "layers per stage (vgg) or basic blocks per stage (resnet)",
    "seed": "model init, shuffling and dropout seed",
    "bf16": "bfloat16 autocast where native (CUDA; CPUs with AVX512-BF16 or AMX)",
    "channels_last": "channels_last memory format",
}


def build_parser() -> Parser:
    p = Parser(prog="python -m fer_model.train", description="Train one FER2013 configuration and evaluate it on test.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the study's configurations; other flags override")
    p.add_argument("--data", help="FER2013 folder, .zip, .tar.gz or .csv (else $FER2013_DATA, ./data/fer2013, kagglehub)")
    p.add_argument("--max-samples", type=int, help="train on a stratified subset of this many Training images")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of Training held out (default 0.1)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the validation split and subsets (default 0)")
    p.add_argument("--cache-dir", help="decoded-data cache (default $FER2013_CACHE or ~/.cache/fer2013)")
    p.add_argument("--cache-max", type=int, metavar="N",
                   help=f"keep at most N decoded sources in the cache, least recently used dropped (default {DEFAULT_CACHE_MAX})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", help="output folder (default outputs/train-<preset>-<time>)")
    p.add_argument("--resume", help="a checkpoint.pt to continue from")
    add_train_flags(p, help_for=FLAG_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fer_model.config import DataConfig, flat_keys

    values = dict(PRESETS.get(args.preset, {}))
    values.update(given(args, flat_keys()))
    cfg = TrainConfig.from_dict(values)
    cache_max = DEFAULT_CACHE_MAX if args.cache_max is None else args.cache_max
    data_cfg = DataConfig(args.data, args.val_fraction, args.max_samples, args.data_seed, args.cache_dir, cache_max)
    return _train(args, cfg, data_cfg)


def _train(args, cfg: TrainConfig, data_cfg) -> int:
    # Imported after parsing: --help and a bad flag answer before torch loads (about 2 s).
    import dataclasses
    import json
    import time
    from pathlib import Path

    import torch

    from fer_model import data as fdata
    from fer_model import metrics as M
    from fer_model.device import resolve_device, training_bf16
    from fer_model.evaluate import describe_test, evaluate, save_evaluation
    from fer_model.model import build_model, count_parameters, forward_flops
    from fer_model.training import EpochResult, fit, load_checkpoint, save_checkpoint

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    resume = load_checkpoint(args.resume) if args.resume else None
    out = Path(args.out or f"outputs/train-{args.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    data = fdata.load(data_cfg)
    net = build_model(cfg.model)
    print(f"data: {fdata.describe(data)}")
    print(f"config: {json.dumps(cfg.to_dict())}")
    print(f"model: {cfg.model.describe()}: {count_parameters(net):,} parameters, "
          f"{forward_flops(net) / 1e6:.1f} MFLOP per image forward; device {device}, "
          f"threads {torch.get_num_threads()}, training bf16 {'on' if training_bf16(device.type, cfg.bf16) else 'off'}")

    def on_epoch(r: EpochResult) -> None:
        m = r.metrics
        print(f"Epoch {r.epoch - 1}/{cfg.epochs - 1}, Loss: {m[M.TRAIN_LOSS]:.4f}, Accuracy: {100 * m[M.TRAIN_ACC]:.2f}%, "
              f"Val Loss: {m[M.VAL_LOSS]:.4f}, Val Accuracy: {100 * m[M.VAL_ACC]:.2f}% "
              f"({m[M.EPOCH_SECONDS]:.1f} s, {m[M.IMAGES_PER_SECOND]:.0f} img/s)", flush=True)
        save_checkpoint(r.state(), out / "checkpoint.pt")

    t0 = time.perf_counter()
    result = fit(cfg, data, on_epoch=on_epoch, device=device, resume=resume)
    train_seconds = time.perf_counter() - t0
    ev = evaluate(result.model, cfg.model, data.test, device)
    save_evaluation(ev, out, result.history, title=args.preset or cfg.model.arch)
    summary = {"status": result.status, "config": cfg.to_dict(), "data": dataclasses.asdict(data_cfg),
               "sizes": data.sizes(), "train_seconds": train_seconds, "device": str(device),
               "history": result.history, "test": ev.metrics}
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    # The study's figure is a comparison only on the same data: the full test set.
    study = STUDY_TEST_ACC.get(args.preset or "") if data_cfg.max_samples is None else None
    print(f"{result.status}: {result.epochs_completed} epochs in {train_seconds:.0f} s")
    print(describe_test(ev.metrics) + (f"; the study: {100 * study:.2f}%" if study else ""))
    print(ev.report_text)
    print(f"wrote {out}/ (run.json, metrics.json, figures, checkpoint.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
