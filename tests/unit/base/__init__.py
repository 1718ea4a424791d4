"""Tests of callahead.base."""
