"""The embedded demo model: a small Qwen3-MoE trained here on Shakespeare (see docs/demo-model.md)."""
