"""Tests of callahead.caching."""
