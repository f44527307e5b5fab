"""Model code: single-device modules that read like the DeepSeek-V3 report."""
