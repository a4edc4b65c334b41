"""Helpers of the fault-injection suite: a consumer process and the code that drives it."""
