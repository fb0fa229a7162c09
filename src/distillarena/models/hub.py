"""The hub policy: a hub id is downloaded unless the user set ``HF_HUB_OFFLINE``; a local folder never touches the
network. The library does not set ``HF_HUB_OFFLINE``; the ``distillarena`` command sets it to 1 unless the
environment has it (``cli.main``), so a command line run is offline and reproducible by default."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def hub_offline() -> bool:
    """Whether the user forbade downloads (``HF_HUB_OFFLINE``, as huggingface_hub reads it). The library leaves it
    to the user; the ``distillarena`` command sets it to 1 unless it is set (see ``cli.main``)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:  # the environment as it is now (huggingface_hub read it once, at its import)
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


@contextlib.contextmanager
def no_hub_probes(local: bool) -> Iterator[None]:
    """Loading a local folder must not touch the network: ``from_pretrained`` still probes the hub (for PEFT adapter
    files, transformers 5.24), which hangs ~30 s without network. huggingface_hub reads its offline flag from this
    module attribute at every call, so it is set only for the load (not thread-safe against a concurrent hub
    download in the same process, which this project never does)."""
    if not local:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_hint(is_local: bool) -> str:
    if is_local:
        return "folder"
    if hub_offline():
        return ("hub id (not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it; the distillarena "
                "command sets it unless HF_HUB_OFFLINE is in the environment: set HF_HUB_OFFLINE=0 to download)")
    return "hub id"


__all__ = ["hub_hint", "hub_offline", "no_hub_probes"]
