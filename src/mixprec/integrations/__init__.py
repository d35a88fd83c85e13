"""mixprec inside other training frameworks, one line each (optional extras, imported lazily).

* `mixprec.integrations.lightning` - a Lightning precision plugin (``pip install "mixprec[lightning]"``);
* `mixprec.integrations.hf` - Hugging Face Trainer and Accelerate (``pip install "mixprec[hf]"``).

``import mixprec`` imports none of these; importing one of them needs its framework installed.
See docs/integrations.md.
"""
