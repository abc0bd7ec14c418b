#!/usr/bin/env python
"""Pretrain a classifier while an agent masks its inputs; write the run folder and ``heated.pt``.

    python scripts/pretrain.py --algo reinforce --max-steps 30
    python scripts/pretrain.py --algo ppo --dataset imagefolder:/data/radimagenet --classifier resnet50 \
        --image-size 224 --grid 64 --epochs 90
    torchrun --nproc_per_node=8 scripts/pretrain.py --algo reinforce ...   # several GPUs
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agents.registry import AGENTS, algo_names
from agents.runner import PretrainConfig, pretrain
from classifiers.cli import add_common_arguments, fail_cleanly
from classifiers.distributed import launch_rank
from classifiers.models import ARCHITECTURES
from envs.core import REWARD_FORWARDS, REWARD_REFERENCES, REWARDS, EnvConfig
from envs.masks import MASK_OPS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="reinforce", help=f"agent: {', '.join(algo_names())}")
    add_common_arguments(p, default_dataset="synthrad", classifiers=ARCHITECTURES)
    p.set_defaults(epochs=None)  # 1 for a new run; a resumed run keeps its own length unless told otherwise
    p.add_argument("--grid", type=int, default=16, help="side G of the noise-mask grid")
    p.add_argument("--blur-kernel", type=int, default=13, help="odd Gaussian kernel size of the mask blur")
    p.add_argument("--blur-sigma", type=float, default=6.0, help="Gaussian sigma of the mask blur (pixels)")
    p.add_argument("--lr", type=float, default=0.1, help="classifier SGD learning rate")
    p.add_argument("--lr-step-epochs", type=int, default=30, help="classifier StepLR period (factor 0.1)")
    p.add_argument("--reward", default=None, choices=REWARDS, help="per-image reward (default: classifiable; the "
                   "*-budget algos: adversarial; reinforce-lff*: biased)")
    p.add_argument("--mask-op", default=None, choices=MASK_OPS, help="how the mask acts: multiply the image (default, "
                   "the paper's) or blend it with a random restyling of itself (uniform-blend, reinforce-lff-blend)")
    p.add_argument("--bias-q", type=float, default=None, help="biased reward: the generalised cross-entropy's q of the "
                   "biased classifier (default 0.7)")
    p.add_argument("--bias-weight", type=float, default=None, help="biased reward: weight of the classifier's own "
                   "cross-entropy, subtracted from the biased classifier's (default 0)")
    p.add_argument("--mask-budget", type=float, default=None, help="hold each mask's mean value at this budget in "
                   "(0, 1) (the *-budget algos: 0.5)")
    p.add_argument("--reward-forward", default=None, choices=REWARD_FORWARDS,
                   help="the forward pass the reward is read from: the training step's (default) or an extra "
                        "eval-mode one, free of the BatchNorm coupling between images (the *-budget algos: eval)")
    p.add_argument("--reward-reference", default=None, choices=REWARD_REFERENCES,
                   help="subtract each image's reward under the constant mask at the budget (constant) or not "
                        "(none, default; the *-budget algos: constant)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many classifier steps")
    p.add_argument("--log-every", type=int, default=10, help="steps between scalar logs")
    p.add_argument("--image-every", type=int, default=100, help="steps between mask image grids")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation passes, clean and perturbed "
                   "as in training (default: at every epoch end only; a pass always runs there)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: SyncBatchNorm in the classifier")
    p.add_argument("--agent-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the chosen agent that no flag below sets (a plugin's: docs/agents.md); the value "
                        "is read as JSON (0.5, true, \"text\") or else as text; repeatable")

    r = p.add_argument_group("reinforce (our agent)")
    r.add_argument("--policy-lr", type=float, default=None, help="policy SGD lr (default: --lr / 10)")
    r.add_argument("--objective", choices=("reinforce", "official"), default=None,
                   help="REINFORCE estimator (default) or the reference code's objective")
    r.add_argument("--param", choices=("exp", "softplus"), default=None, help="Beta parameterisation")
    r.add_argument("--entropy-coef", type=float, default=None, help="entropy bonus weight")
    r.add_argument("--baseline", choices=("moving", "batch"), default=None,
                   help="reward baseline: moving average (default) or leave-one-out batch mean")
    r.add_argument("--budget-concentration", type=float, default=None,
                   help="with a mask budget: the policy sets cell means held at the budget, each cell "
                   "Beta(k mu, k(1-mu)) (reinforce-budget: 2)")
    r.add_argument("--normalize-advantage", action=argparse.BooleanOptionalAction, default=None,
                   help="normalise advantages by the batch's standard deviation (reinforce-budget: on)")
    r.add_argument("--max-grad-norm", type=float, default=None, help="policy gradient clipping (0: off)")
    r.add_argument("--scale-classifier-loss", action="store_true", default=None,
                   help="with the official objective: multiply the classifier's loss by its log-sum-exp factor, "
                        "as the reference code does (--algo reinforce-official-scaled sets it)")

    b = p.add_argument_group("non-learned agents")
    b.add_argument("--noise-std", type=float, default=None, help="gaussian-noise: std on the normalised image")
    b.add_argument("--loss-scale", type=float, default=None,
                   help="none-scaled: factor on the classifier's loss (default: log(grid * grid))")

    s = p.add_argument_group("ppo and a2c (stable-baselines3)")
    s.add_argument("--n-steps", type=int, default=None, help="rollout length per slot")
    s.add_argument("--n-epochs", type=int, default=None, help="ppo: optimisation epochs per rollout")
    s.add_argument("--sb3-batch-size", type=int, default=None, help="ppo: minibatch size")
    s.add_argument("--ent-coef", type=float, default=None, help="entropy coefficient")
    s.add_argument("--vf-coef", type=float, default=None, help="value-function coefficient")
    s.add_argument("--gamma", type=float, default=None, help="discount factor")
    s.add_argument("--gae-lambda", type=float, default=None, help="GAE lambda")
    s.add_argument("--clip-range", type=float, default=None,
                   help="ppo: clip the probability ratio of a whole mask to 1 +- this (default: no clipping; the KL "
                        "stop bounds an update instead)")
    s.add_argument("--target-kl-per-cell", type=float, default=None,
                   help="ppo: stop an update's epochs once the approximate KL from the rollout's policy passes "
                        "1.5 x this x G x G (default 0.002; 0: never, with --clip-range 0.2: stable-baselines3's PPO)")
    return p.parse_args(argv)


CHOSEN_ENV = tuple(sorted({k for entry in AGENTS.values() for k, _ in entry.env}))
"""Environment settings an algo registers (``agents.registry``): a value given on the command line stays."""


def chosen_env(a: argparse.Namespace) -> frozenset[str]:
    """The :data:`CHOSEN_ENV` settings given on the command line."""
    return frozenset(k for k in CHOSEN_ENV if getattr(a, k) is not None)


def agent_options(a: argparse.Namespace) -> dict[str, Any]:
    """The ``--agent-option KEY=VALUE`` pairs; a key the chosen agent does not take is refused, naming the ones it
    takes."""
    out: dict[str, Any] = {}
    for pair in a.agent_option:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--agent-option {pair!r} is not KEY=VALUE; write it as, for example, elite=0.25")
        taken = AGENTS[a.algo].options if a.algo in AGENTS else ()
        if key not in taken:
            raise ValueError(f"--agent-option {key}: the agent {a.algo!r} takes no option {key!r}; it takes "
                             f"{', '.join(taken) or 'none'}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def config_from_args(a: argparse.Namespace) -> PretrainConfig:
    given = {k: getattr(a, k) for k in chosen_env(a)}
    env = EnvConfig(dataset=a.dataset, classifier=a.classifier, batch_size=a.batch_size, image_size=a.image_size,
                    grid=a.grid, blur_kernel=a.blur_kernel, blur_sigma=a.blur_sigma, lr=a.lr,
                    lr_step_epochs=a.lr_step_epochs, seed=a.seed, device=a.device, precision=a.precision,
                    workers=a.workers, sync_bn=a.sync_bn,
                    **{k: getattr(a, k) for k in ("bias_q", "bias_weight") if getattr(a, k) is not None}, **given)
    agent = {k: getattr(a, k) for k in (
        "policy_lr", "objective", "param", "baseline", "budget_concentration", "entropy_coef", "normalize_advantage",
        "max_grad_norm", "scale_classifier_loss", "noise_std", "loss_scale", "n_steps", "n_epochs", "sb3_batch_size",
        "ent_coef", "vf_coef", "gamma", "gae_lambda", "clip_range", "target_kl_per_cell")}
    agent = {k: v for k, v in agent.items() if v is not None} | agent_options(a)
    return PretrainConfig(algo=a.algo, env=env, agent=agent,
                          epochs=1 if a.epochs is None else a.epochs, max_steps=a.max_steps, run_dir=a.run_dir or "",
                          log_every=a.log_every, image_every=a.image_every, ckpt_every=a.ckpt_every,
                          eval_every=a.eval_every)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_length = args.epochs is None and args.max_steps is None
    run_dir = pretrain(config_from_args(args), resume=args.resume, keep_saved_length=keep_length,
                       chosen_env=chosen_env(args))
    if launch_rank() == 0:
        print(f"run folder: {run_dir}\nheated model: {run_dir / 'heated.pt'}\n"
              f"TensorBoard: tensorboard --logdir {run_dir.parent} (start at CUSTOM SCALARS; the Text tab's legend "
              "names every tag)")
    return 0


if __name__ == "__main__":
    sys.exit(fail_cleanly(main))
