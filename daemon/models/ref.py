"""What a model name means, told from the name alone: a model shipped in the package (`tiny`), a
catalog name (`sd15`, standing for its Hub repo), a Hub repo (`org/name[@revision]`), or a folder.

The filesystem is never asked, so the daemon, a remote worker and the queue read a name the same
way wherever they run. A folder is named as a path (`/…`, `~…`, `./…`, `../…`) or by anything that
is neither an alias nor Hub-shaped; a client turns a folder in its own working directory into an
absolute path before the name leaves it (clients/arguments.py's `model_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import catalog

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
_PATH_PREFIXES = ("/", "~", ".")


@dataclass(frozen=True)
class ModelRef:
    name: str  # as given
    repo: str | None = None  # the Hub repo, for a Hub id or a catalog name
    revision: str | None = None
    path: Path | None = None  # the folder, for a shipped model or a local folder

    @property
    def canonical(self) -> str:
        """The name the store and the downloader know: `org/name[@revision]` for a Hub model (a
        catalog name's repo), the name as given otherwise."""
        if self.repo is None:
            return self.name
        return f"{self.repo}@{self.revision}" if self.revision else self.repo

    @property
    def portable(self) -> bool:
        """Whether another machine resolves the name to the same model (a remote worker may run
        it): a shipped model or a Hub repo, not a folder on this machine."""
        return self.repo is not None or self.name in catalog.ALIASES


def parse(name: str) -> ModelRef:
    if name in catalog.ALIASES:
        return ModelRef(name, path=catalog.ALIASES[name])
    entry = catalog.lookup(name)
    hub_id = entry.repo if entry else name
    if not hub_id.startswith(_PATH_PREFIXES) and HUB_ID.match(hub_id):
        repo, _, revision = hub_id.partition("@")
        return ModelRef(name, repo=repo, revision=revision or None)
    return ModelRef(name, path=Path(name).expanduser())
