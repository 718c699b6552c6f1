"""Weight-level unlearning methods."""
