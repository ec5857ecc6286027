"""Checks of everything lowbit did not make itself, run before any allocation or long work:
artifact headers and their stored tensors (`header`, `stored`), output paths and what `--force`
may replace (`paths`), and the source model's tensors (`finite`). Every refusal is a LowbitError."""
