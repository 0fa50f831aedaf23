"""``spliteasy convert``: a tf_keras model and its cut layers -> a verified bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Cut a tf_keras model into device/server slices and write a verified bundle."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="digits-cnn",
        help="built-in 'digits-cnn', an application name (see 'spliteasy cuts'), or a saved tf_keras model path",
    )
    p.add_argument(
        "--cuts",
        nargs="+",
        metavar="LAYER",
        help="cut layer names: two for a double split (labels stay on the device), one for a single split; "
        "digits-cnn defaults to 'a_out b_out'",
    )
    p.add_argument(
        "--split",
        choices=["double", "single"],
        help="with digits-cnn and no --cuts: which default cuts to use",
    )
    p.add_argument("--out", type=Path, help="bundle directory (default bundles/<model>-<split>)")
    p.add_argument("--input-size", type=int, help="square input size for application models")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 0.01 sgd, 0.001 adam)"
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--epsilon", type=float, default=1e-7, help="Adam epsilon (Keras 'epsilon hat')")
    p.add_argument("--runtimes", default="tf", help="comma list of device runtimes: tf,tfjs,tflite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--grad-tol", type=float, default=1e-4, help="largest relative gradient error accepted"
    )
    p.add_argument("--forward-tol", type=float, default=1e-4)
    p.add_argument(
        "--loss",
        default=None,
        help="loss of the label holder: sparse_categorical_crossentropy (class indices), "
        "categorical_crossentropy (one-hot), binary_crossentropy (binary / multi-label), "
        "mean_squared_error (mse), mean_absolute_error (mae). Default: the loss a saved model "
        "was compiled with, else sparse_categorical_crossentropy",
    )
    p.add_argument(
        "--from-logits",
        choices=["true", "false"],
        default=None,
        help="whether the cross-entropy reads the output as logits (default: true unless "
        "the last layer applies softmax or sigmoid; a compiled model's own setting)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")


def optimizer_from_args(args: argparse.Namespace):
    from shared_schema import AdamSpec, SGDSpec

    if args.optimizer == "sgd":
        return SGDSpec(
            learning_rate=args.lr or 0.01, momentum=args.momentum, nesterov=args.nesterov
        )
    return AdamSpec(
        learning_rate=args.lr or 0.001, beta_1=args.beta1, beta_2=args.beta2, epsilon=args.epsilon
    )


def _loss_from_args(args: argparse.Namespace, model, default_from_logits: bool):
    """--loss (and --from-logits) if given, else a saved model's compiled loss, else the
    sparse categorical cross-entropy (from_logits unless the output applies softmax)."""
    from converters.losses import compiled_loss, loss_spec

    from_logits = None if args.from_logits is None else args.from_logits == "true"
    if args.loss is not None:
        return loss_spec(args.loss, model, from_logits)
    if Path(args.model).exists():
        compiled = compiled_loss(args.model)
        if compiled is not None:
            if from_logits is not None and from_logits != compiled.from_logits:
                return compiled.model_copy(update={"from_logits": from_logits})
            return compiled
    from shared_schema import LossSpec

    return LossSpec(from_logits=default_from_logits if from_logits is None else from_logits)


def loss_origin(args: argparse.Namespace) -> str:
    if args.loss is not None:
        return "--loss"
    return "as compiled, or the default" if Path(args.model).exists() else "the default"


def run(args: argparse.Namespace) -> int:
    import json

    from converters.bundle import write_bundle
    from converters.models import BUILTIN, DIGITS_CUTS, load_model
    from shared_schema import SpliteasyError
    from shared_schema.manifest import SCORE_LOSSES as SCORE

    cuts = args.cuts
    if not cuts:
        if args.model != BUILTIN:
            raise SpliteasyError(
                "--cuts is required for this model (list valid cuts with 'spliteasy cuts MODEL')"
            )
        cuts = list(DIGITS_CUTS) if args.split != "single" else [DIGITS_CUTS[0]]
    model, from_logits = load_model(
        args.model, input_size=args.input_size, num_classes=args.num_classes, seed=args.seed
    )
    loss = _loss_from_args(args, model, from_logits)
    split = "double" if len(cuts) == 2 else "single"
    name = Path(args.model).stem if Path(args.model).exists() else args.model
    out = args.out or Path("bundles") / f"{name}-{split}"
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    manifest = write_bundle(
        model,
        cuts,
        out,
        model_name=name,
        optimizer=optimizer_from_args(args),
        from_logits=from_logits,
        loss=loss,
        runtimes=runtimes,
        overwrite=args.force,
        seed=args.seed,
        forward_tol=args.forward_tol,
        grad_tol=args.grad_tol,
    )
    report = json.loads((out / "report.json").read_text())["verification"]
    print(f"wrote {out} ({manifest.split_mode} split, cuts {', '.join(cuts)})")
    logits = f", from_logits={manifest.loss.from_logits}" if manifest.loss.name in SCORE else ""
    print(
        f"  loss {manifest.loss.name}{logits} ({loss_origin(args)}), held by the {manifest.label_holder}"
    )
    for s in manifest.slices:
        print(
            f"  {s.name} on the {s.side}: {s.first_layer} .. {s.last_layer}, {s.num_params:,} params"
        )
    print(
        f"  B verified: forward rel err {report['forward_train_rel_err']:.2e}, "
        f"max gradient rel err {report['max_param_grad_rel_err']:.2e}, "
        f"input gradient {report['input_grad_rel_err']:.2e}"
    )
    return 0
