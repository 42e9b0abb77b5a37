"""Evaluation: the digits classifier for the demo (FID and friends arrive with the evaluation issue)."""
