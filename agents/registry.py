"""One registry maps an ``--algo`` name to an agent, so swapping algorithms is one flag."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents.base import Agent
from agents.baselines import GaussianNoise, NoMask, ScaledNoMask, UniformMask
from agents.reinforce import Reinforce, ReinforceConfig


@dataclass(frozen=True)
class AgentEntry:
    factory: Callable[..., Agent]
    options: tuple[str, ...]
    """Keyword arguments the factory accepts."""
    description: str
    fixed: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments this name always sets."""


AGENTS: dict[str, AgentEntry] = {}


def register(name: str, factory: Callable[..., Agent], options: tuple[str, ...], description: str,
             **fixed: Any) -> None:
    """Make ``name`` selectable with ``--algo``; ``fixed`` keyword arguments are always passed."""
    AGENTS[name] = AgentEntry(factory, options, description, tuple(fixed.items()))


_REINFORCE_OPTIONS = tuple(f.name for f in dataclasses.fields(ReinforceConfig))
register("none", NoMask, (), "plain training, no mask")
register("none-scaled", ScaledNoMask, ("loss_scale",),
         "plain training with the classifier's loss times loss_scale (default log(G*G)): the control for "
         "reinforce-official-scaled's larger step")
register("uniform-mask", UniformMask, ("alpha", "beta"), "fixed Beta(1, 1) blurred mask (non-learned)")
register("gaussian-noise", GaussianNoise, ("noise_std",), "additive Gaussian noise on the normalised image")
register("reinforce", Reinforce, _REINFORCE_OPTIONS, "our REINFORCE with a Beta mask policy")
register("reinforce-official", Reinforce,
         tuple(o for o in _REINFORCE_OPTIONS if o != "objective"),
         "the reference code's policy objective; the classifier's loss unscaled unless scale_classifier_loss",
         objective="official")
register("reinforce-official-scaled", Reinforce,
         tuple(o for o in _REINFORCE_OPTIONS if o not in ("objective", "scale_classifier_loss")),
         "the reference recipe whole: its policy objective, and the classifier's loss times its log-sum-exp "
         "factor (about 8.5 at G = 64)", objective="official", scale_classifier_loss=True)
for _module in ("agents.sb3",):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise


def algo_names() -> list[str]:
    return sorted(AGENTS)


def make_agent(name: str, options: dict[str, Any] | None = None) -> Agent:
    """Build the agent registered as ``name`` from the options it accepts (None values keep defaults)."""
    if name not in AGENTS:
        raise ValueError(f"unknown algo {name!r}; use one of {', '.join(algo_names())}")
    entry = AGENTS[name]
    kwargs = {k: v for k, v in (options or {}).items() if k in entry.options and v is not None}
    return entry.factory(**kwargs, **dict(entry.fixed))
