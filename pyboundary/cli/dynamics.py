"""``pyboundary track``: margins of fixed samples while a network trains (standard or adversarial)."""

from __future__ import annotations

from .args import nonnegative_int, positive_int

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser(
        "track", help="train a model and track its DeepFool margins per epoch",
        description="Train --arch on --data (standard or adversarial) and measure the L2 and L-inf "
                    "DeepFool margins of fixed train/test subsets at every epoch (0 = init).")
    p.add_argument("--arch", default="lenet", help="architecture to train: lenet, lenet-smooth, mlp, resnet-small")
    p.add_argument("--data", default="fashion-mnist", help="dataset name with train and test splits (default fashion-mnist)")
    p.add_argument("--epochs", type=nonnegative_int, default=10, help="training epochs (default 10)")
    p.add_argument("--adversarial", default=None,
                   help="e.g. pgd-linf:eps=0.1,steps=7,frac=0.5 or pgd-l2:eps=1.0,steps=7,frac=1")
    p.add_argument("--n-track", type=positive_int, default=1000, help="tracked samples per split (default 1000)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="train on a seeded random subset of N training samples (--seed; default: all)")
    p.add_argument("--out", default=None, help="folder for track.sqlite and the plots")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, shuffling and subsets (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--train-batch-size", type=positive_int, default=128,
                   help="training minibatch (samples per optimisation step; default 128)")
    p.add_argument("--max-iter", type=positive_int, default=50, help="DeepFool iterations per sample (default 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_track)


def cmd_track(args) -> int:
    from ..experiments.tracking_run import track

    run = track(args.arch, args.data, epochs=args.epochs, adversarial=args.adversarial, n_track=args.n_track,
                n_train=args.limit, out=args.out, seed=args.seed, lr=args.lr,
                train_batch_size=args.train_batch_size, deepfool_kwargs={"max_iter": args.max_iter},
                progress=not args.no_progress)
    print(run.format_summary())
    if args.out:
        print(f"results and plots in {args.out}")
    return 0
