"""Tests of callahead.frontends."""
