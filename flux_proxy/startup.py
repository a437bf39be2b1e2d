"""What a gateway tells its operator as it starts: unset provider keys, and a summary.

A missing key would otherwise show only on the first request that needs it, as
a 502. So each unset key variable gets one warning when the gateway is built,
naming the models it leaves without that provider, and one INFO line sums up
what is served: ``serving 3 models (flux1.1-pro -> bfl > fal, ...), middlewares: ...``.
Only variable names are logged, never a value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flux_proxy.routing import ModelRoute
from flux_proxy.schema import Target

logger = logging.getLogger("flux_proxy")


def unset_keys(
    models: Iterable[ModelRoute], secret: Callable[[str], str | None]
) -> dict[str, list[Target]]:
    """Each key variable that is unset, with the entries that read their key from it."""
    unset: dict[str, list[Target]] = {}
    for model in models:
        for target in model.targets:
            variable = target.key_env
            if variable and secret(variable) is None:
                unset.setdefault(variable, []).append(target)
    return unset


def summary(models: list[ModelRoute], middlewares: Iterable[str]) -> str:
    """One line: every model with its providers in failover order, and the stack."""
    served = ", ".join(
        f"{model.name} -> {' > '.join(target.provider.name for target in model.targets)}"
        for model in models
    )
    count = f"{len(models)} model{'' if len(models) == 1 else 's'}"
    return f"serving {count} ({served}), middlewares: {', '.join(middlewares) or 'none'}"


def announce(
    models: list[ModelRoute], middlewares: Iterable[str], secret: Callable[[str], str | None]
) -> None:
    for variable, targets in unset_keys(models, secret).items():
        logger.warning(
            "provider key variable %s is not set: %s cannot serve %s; those requests fail "
            "over to the next provider, if any, or get a 502",
            variable,
            ", ".join(dict.fromkeys(target.provider.name for target in targets)),
            ", ".join(dict.fromkeys(target.model for target in targets)),
        )
    logger.info("%s", summary(models, middlewares))
