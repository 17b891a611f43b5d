"""Layer 1, the MoE-LoRA itself: routing, losses, statistics, experts, the wrapping modules, injection and
merging. Imports `moetune.config` only (the rule: tests/test_layers.py)."""
