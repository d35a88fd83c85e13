"""pytest: the doctests of an integration module run only where its framework is installed (the
module imports it; `make test` installs every extra, so CI runs them all)."""

import importlib.util
import os

# execution=auto emulates on every CPU while testing (AMX-BF16 CPUs would run bf16 natively): the same
# numerics, and the same expected outputs, on every machine; subprocesses inherit it. The decision
# itself is tested with faked CPU features (tests/test_hardware.py).
os.environ["MIXPREC_NATIVE_CPU"] = "0"


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


collect_ignore = []
if not (_installed("lightning") or _installed("pytorch_lightning")):
    collect_ignore.append("src/mixprec/integrations/lightning.py")
if not _installed("transformers", "accelerate"):
    collect_ignore.append("src/mixprec/integrations/hf.py")
