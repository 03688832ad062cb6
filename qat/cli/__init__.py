"""Command-line entry points (Hydra apps): qat-train, qat-export, qat-eval, qat-report."""
