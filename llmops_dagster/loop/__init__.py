"""Closing the loop: what the sensors read from production, and the drift statistic."""
