"""Worked examples of user models for `model.factory=examples.<module>:<function>`."""
