"""One registry maps an ``--algo`` name to an agent, so swapping algorithms is one flag.

Agents of other packages join it through the entry-point group ``noisemask.agents``: a package that declares
``[project.entry-points."noisemask.agents"] my-agent = "mypkg:register"`` has ``mypkg.register()`` called once, when
this module is first imported, and registers its agents with :func:`register`; ``--algo my-agent`` then works in
``scripts/pretrain.py`` and ``scripts/compare.py``. A plugin that fails to load is named in one line on stderr, and
the other agents still work (docs/agents.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from agents.base import Agent
from agents.baselines import (
    GaussianNoise,
    NoMask,
    RandomErasing,
    SaliencyMask,
    ScaledNoMask,
    TrivialAugment,
    UniformMask,
)
from agents.reinforce import Reinforce, ReinforceConfig
from envs.core import EnvConfig


@dataclass(frozen=True)
class AgentEntry:
    factory: Callable[..., Agent]
    options: tuple[str, ...]
    """Keyword arguments the factory accepts."""
    description: str
    fixed: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments this name always sets."""
    env: tuple[tuple[str, Any], ...] = ()
    """Environment settings (``EnvConfig`` fields) this name uses where the configuration keeps the field's default."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments this name passes unless the options give them."""


AGENTS: dict[str, AgentEntry] = {}


def register(name: str, factory: Callable[..., Agent], options: tuple[str, ...], description: str,
             env: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None, **fixed: Any) -> None:
    """Make ``name`` selectable with ``--algo``; ``fixed`` keyword arguments are always passed, ``defaults`` unless the
    options give them, and ``env`` settings replace the environment's defaults (see :func:`environment_for`)."""
    AGENTS[name] = AgentEntry(factory, options, description, tuple(fixed.items()), tuple((env or {}).items()),
                              tuple((defaults or {}).items()))


def options_for(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the defaults the algo ``name`` registers filled in (so a run's ``config.json`` shows them)."""
    defaults = dict(AGENTS[name].defaults) if name in AGENTS else {}
    return {**defaults, **{k: v for k, v in options.items() if v is not None}}


def environment_for(name: str, env: EnvConfig, chosen: Collection[str] = ()) -> EnvConfig:
    """``env`` with the settings the algo ``name`` registers, where ``env`` keeps ``EnvConfig``'s default for them and
    the field is not in ``chosen`` (the fields the user set explicitly, even to the default: ``--reward-forward train``
    with ``reinforce-budget``); a run records the result in its ``config.json``."""
    default = EnvConfig()
    settings = {k: v for k, v in AGENTS[name].env if getattr(env, k) == getattr(default, k) and k not in chosen} \
        if name in AGENTS else {}
    return dataclasses.replace(env, **settings)


BUDGETED_ENV = {"reward": "adversarial", "mask_budget": 0.5, "reward_forward": "eval", "reward_reference": "constant"}
"""The budgeted objective's environment: each image's mask held at a mean of 0.5 (Beta(1, 1)'s), the policy rewarded
for what it hides from the classifier, read from an eval-mode forward (free of the BatchNorm coupling between images)
as the change from the same image under the constant mask at the budget (see docs/budget-notes.md)."""
_REINFORCE_OPTIONS = tuple(f.name for f in dataclasses.fields(ReinforceConfig))
BUDGETED_DEFAULTS = {"param": "softplus", "budget_concentration": 2.0, "policy_lr": 0.03, "normalize_advantage": True}
"""The budgeted policy's options: cell means held at the budget, each cell's Beta at concentration 2."""
register("none", NoMask, (), "plain training, no mask")
register("none-scaled", ScaledNoMask, ("loss_scale",),
         "plain training with the classifier's loss times loss_scale (default log(G*G)): the control for "
         "reinforce-official-scaled's larger step")
register("uniform-mask", UniformMask, ("alpha", "beta"), "fixed Beta(1, 1) blurred mask (non-learned)")
register("uniform-blend", UniformMask, ("alpha", "beta"),
         "fixed Beta(1, 1) blurred field blending each image with a restyled copy of itself (the blend operator's "
         "non-learned control)", env={"mask_op": "blend"})
register("saliency-mask", SaliencyMask, (),
         "hide the cells the current classifier's input gradient marks most (the top half at the budget of 0.5): the "
         "non-learned anchor that knows the model", env={"mask_budget": 0.5})
register("gaussian-noise", GaussianNoise, ("noise_std",), "additive Gaussian noise on the normalised image")
register("random-erasing", RandomErasing, ("erase_p", "erase_scale"),
         "torchvision's RandomErasing per image (occlusion without learning)")
register("trivial-augment", TrivialAugment, (), "torchvision's TrivialAugmentWide per image")
register("reinforce", Reinforce, _REINFORCE_OPTIONS, "our REINFORCE with a Beta mask policy")
register("reinforce-official", Reinforce,
         tuple(o for o in _REINFORCE_OPTIONS if o != "objective"),
         "the reference code's policy objective; the classifier's loss unscaled unless scale_classifier_loss",
         objective="official")
register("reinforce-official-scaled", Reinforce,
         tuple(o for o in _REINFORCE_OPTIONS if o not in ("objective", "scale_classifier_loss")),
         "the reference recipe whole: its policy objective, and the classifier's loss times its log-sum-exp "
         "factor (about 8.5 at G = 64)", objective="official", scale_classifier_loss=True)
register("reinforce-budget", Reinforce, _REINFORCE_OPTIONS,
         "our REINFORCE deciding where the noise goes: each mask held at a budget (mean 0.5), rewarded by the "
         "classifier's cross-entropy (adversarial); the policy sets cell means held at the budget, each cell's Beta at "
         "concentration 2 (Beta(1, 1) at an even spread)", env=BUDGETED_ENV,
         defaults=BUDGETED_DEFAULTS)
LFF_ENV = BUDGETED_ENV | {"reward": "biased", "reward_reference": "sampled"}
"""The shortcut-aimed objective: the budgeted one, rewarded by what a biased classifier (generalised cross-entropy,
Learning from Failure) loses on the masked image (``envs.core.EnvConfig.reward``)."""
register("reinforce-lff", Reinforce, _REINFORCE_OPTIONS,
         "our budgeted REINFORCE aimed at the shortcut: rewarded for hiding what a biased classifier (trained "
         "alongside with the generalised cross-entropy, as in Learning from Failure) reads", env=LFF_ENV,
         defaults=BUDGETED_DEFAULTS)
register("reinforce-lff-blend", Reinforce, _REINFORCE_OPTIONS,
         "reinforce-lff with the blend operator: the policy chooses where each image's style is replaced by a random "
         "restyling", env=LFF_ENV | {"mask_op": "blend"}, defaults=BUDGETED_DEFAULTS)
for _module in ("agents.sb3",):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise


PLUGIN_GROUP = "noisemask.agents"
"""The entry-point group other packages declare their agents in."""
PLUGIN_ERRORS: dict[str, str] = {}
"""Entry point name -> why it failed to load (one line), for the plugins that did."""


def load_plugins() -> None:
    """Call every entry point of :data:`PLUGIN_GROUP` (each registers its agents); a failure is recorded in
    :data:`PLUGIN_ERRORS` and named in one line on stderr, and the rest go on. Called once, when this module is first
    imported; calling it again loads the entry points installed since (a plugin already loaded registers again)."""
    for point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            point.load()()
        except Exception as exc:  # whatever a plugin raises, the other agents must still work
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            PLUGIN_ERRORS[point.name] = reason
            print(f"noisemask: the agent plugin {point.name!r} ({point.value}) failed to load ({reason}); the other "
                  "agents still work", file=sys.stderr)
        else:
            PLUGIN_ERRORS.pop(point.name, None)


def algo_names() -> list[str]:
    return sorted(AGENTS)


def make_agent(name: str, options: dict[str, Any] | None = None) -> Agent:
    """Build the agent registered as ``name`` from the options it accepts (None values keep defaults)."""
    if name not in AGENTS:
        failed = f" (its plugin failed to load: {PLUGIN_ERRORS[name]})" if name in PLUGIN_ERRORS else ""
        raise ValueError(f"unknown algo {name!r}{failed}; use one of {', '.join(algo_names())}")
    entry = AGENTS[name]
    kwargs = {k: v for k, v in options_for(name, options or {}).items() if k in entry.options}
    return entry.factory(**kwargs, **dict(entry.fixed))


load_plugins()
