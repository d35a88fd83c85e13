"""pytest: the doctests of an integration module run only where its framework is installed (the
module imports it; `make test` installs every extra, so CI runs them all)."""

import importlib.util


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


collect_ignore = []
if not (_installed("lightning") or _installed("pytorch_lightning")):
    collect_ignore.append("src/mixprec/integrations/lightning.py")
if not _installed("transformers", "accelerate"):
    collect_ignore.append("src/mixprec/integrations/hf.py")
